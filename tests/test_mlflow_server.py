"""Against a real `mlflow server` on 127.0.0.1: the pipeline tracks, logs the student and registers it."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    log = open(tmp_path / "mlflow-server.log", "w")
    process = subprocess.Popen(
        [str(mlflow), "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination", str(tmp_path / "artifacts"),
         "--serve-artifacts", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                    break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail("mlflow server did not start:\n" + (tmp_path / "mlflow-server.log").read_text()[-3000:])
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


def test_pipeline_registers_the_student_on_a_real_tracking_server(prefect_harness, mlflow_server, pipeline_raw, tmp_path):
    from flows.distill import distill
    from stillhouse.config import parse_config

    pipeline_raw["tracking"]["uri"] = mlflow_server
    result = distill(parse_config(pipeline_raw), until="register")
    client = MlflowClient(mlflow_server)
    version = client.get_model_version_by_alias("tiny-student", "candidate")
    assert str(version.version) == result.registered.version
    assert version.tags["stillhouse.train_fingerprint"] == result.student.fingerprint
    import mlflow.artifacts

    downloaded = Path(mlflow.artifacts.download_artifacts(artifact_uri="models:/tiny-student@candidate", dst_path=str(tmp_path / "download"),
                                                          tracking_uri=mlflow_server))
    assert list(downloaded.rglob("model.safetensors")), "the logged student's weights are on the server"
    assert (tmp_path / "artifacts").exists()  # artifacts went through the server, not to a local ./mlruns
