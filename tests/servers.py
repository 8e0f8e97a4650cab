"""Real servers on 127.0.0.1 for integration tests: S3 (moto), `mlflow server`, `prefect server`.

Each is a context manager that yields the server's URL and stops it on the way out, also when the
test fails: a child process gets TERM, then INT, then KILL (a Prefect worker was measured to ignore
TERM once), each to its whole process group.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stop_process(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    """TERM, then INT, then KILL the process group started with ``start_new_session=True``."""
    for sent in (signal.SIGTERM, signal.SIGINT, signal.SIGKILL):
        if process.poll() is not None:
            return
        try:
            os.killpg(process.pid, sent)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace_s if sent != signal.SIGKILL else None)
            return
        except subprocess.TimeoutExpired:
            continue


def wait_until_healthy(url: str, process: subprocess.Popen, log_path: Path, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if urllib.request.urlopen(url, timeout=2).status == 200:
                return
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer (exit code {process.poll()}):\n{log_path.read_text()[-3000:]}")
        time.sleep(0.3)


class _PrefectRetries(httpx.HTTPTransport):
    """Retries the answers Prefect's own client retries (429, 502, 503; PREFECT_CLIENT_MAX_RETRIES), plus 500: a
    sqlite-backed server on a loaded 2-core machine answers "database is locked" as a 500 now and then."""

    retried = frozenset({429, 500, 502, 503})

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        for attempt in range(5):
            response = super().handle_request(request)
            if response.status_code not in self.retried or attempt == 4:
                return response
            response.read()
            response.close()
            time.sleep(2**attempt)
        raise AssertionError("unreachable")


def _raise_with_the_answer(response: httpx.Response) -> None:
    if response.is_error:
        response.read()
        raise AssertionError(
            f"{response.request.method} {response.request.url}: {response.status_code} {response.text}"
        )


def prefect_api_client(api_url: str, timeout_s: float = 30.0) -> httpx.Client:
    """An httpx client for a Prefect server's REST API that retries as Prefect's client does and fails on an error
    answer with the server's own words, so a test never reads an error body as data (a KeyError: 'id')."""
    return httpx.Client(
        base_url=api_url,
        timeout=timeout_s,
        transport=_PrefectRetries(),
        event_hooks={"response": [_raise_with_the_answer]},
    )


@contextmanager
def background(
    command: list[str], log_path: Path, env: dict[str, str] | None = None, cwd: Path | None = None
) -> Iterator[subprocess.Popen]:
    """A child process in its own session, output to ``log_path``, always stopped at the end."""
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
        )
        try:
            yield process
        finally:
            stop_process(process)


@contextmanager
def s3_server(bucket: str = "stillhouse") -> Iterator[dict[str, str]]:
    """moto's S3-compatible server in a thread; yields the AWS_* environment that points s3fs/boto3 at it, bucket
    created."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    try:
        import boto3

        boto3.client(
            "s3",
            endpoint_url=env["AWS_ENDPOINT_URL"],
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        ).create_bucket(Bucket=bucket)
        yield env
    finally:
        server.stop()


@contextmanager
def mlflow_server(folder: Path) -> Iterator[str]:
    """`mlflow server` on sqlite with served artifacts (job execution off: ~500 MB instead of ~1.2 GB)."""
    port = free_port()
    command = [
        str(BIN / "mlflow"),
        "server",
        "--backend-store-uri",
        f"sqlite:///{folder / 'mlflow-server.db'}",
        "--artifacts-destination",
        str(folder / "mlflow-artifacts"),
        "--serve-artifacts",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    with background(command, folder / "mlflow-server.log", env) as process:
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(f"{url}/health", process, folder / "mlflow-server.log")
        yield url


def prefect_env(home: Path, api_url: str | None = None) -> dict[str, str]:
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "PREFECT_LOGGING_LEVEL": "INFO",
    }
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


@contextmanager
def prefect_server(folder: Path) -> Iterator[str]:
    """`prefect server start` on sqlite in ``folder``; yields its API URL (…/api)."""
    port = free_port()
    home = folder / "prefect-home"
    home.mkdir(exist_ok=True)
    env = prefect_env(home)
    env["PREFECT_API_DATABASE_CONNECTION_URL"] = f"sqlite+aiosqlite:///{folder / 'prefect-server.db'}"
    env["PREFECT_UI_ENABLED"] = "true"
    env["PREFECT_UI_API_URL"] = f"http://127.0.0.1:{port}/api"  # the UI's default is port 4200
    command = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with background(command, folder / "prefect-server.log", env) as process:
        url = f"http://127.0.0.1:{port}/api"
        wait_until_healthy(f"{url}/health", process, folder / "prefect-server.log")
        yield url
