"""Preflight fails fast on an MLflow server that doesn't answer, before any model loads."""

import time

import pytest
from servers import free_port

from stillhouse.errors import StillhouseError
from stillhouse.preflight import check_tracking_server


def test_an_unreachable_tracking_server_is_named_within_seconds():
    uri = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(StillhouseError, match=f"MLflow tracking server at {uri} does not answer"):
        check_tracking_server(uri, timeout_s=5)
    assert time.monotonic() - started < 30


def test_local_tracking_uris_need_no_server():
    check_tracking_server("sqlite:///nowhere/mlflow.db")  # no exception: nothing to reach
