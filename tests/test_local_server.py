"""The temporary Prefect server of `stillhouse run`: it answers, yields the CPU to the run, leaves nothing behind."""

import json
import os
import sys
import urllib.request
from pathlib import Path

import pytest

from stillhouse.flows.local_server import SERVER_NICENESS, TemporaryServer


def niceness(thread_stat: Path) -> int:
    # /proc/PID/task/TID/stat: the command name is in parentheses and may hold spaces; nice is field 19.
    fields = thread_stat.read_text().rsplit(")", 1)[1].split()
    return int(fields[16])


@pytest.mark.integration
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are read from /proc")
def test_the_started_server_runs_every_thread_at_a_lower_priority_and_stops_completely(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    server = TemporaryServer()
    try:
        url = server.wait()
        with urllib.request.urlopen(f"{url}/health", timeout=10) as answer:
            assert json.loads(answer.read()) is True
        threads = list(Path(f"/proc/{server.process.pid}/task").glob("*/stat"))
        assert len(threads) > 1  # uvicorn's loop, the database's and docket's threads
        assert {niceness(stat) for stat in threads} == {min(19, os.nice(0) + SERVER_NICENESS)}
        # A thread the server starts later inherits its creator's value: ask the API for work that runs in a thread.
        with urllib.request.urlopen(f"{url}/version", timeout=10) as answer:
            assert answer.status == 200
        assert {niceness(stat) for stat in Path(f"/proc/{server.process.pid}/task").glob("*/stat")} == {
            min(19, os.nice(0) + SERVER_NICENESS)
        }
    finally:
        server.stop()
    assert server.process.poll() is not None
