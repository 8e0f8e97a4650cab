"""An MLflow server that can't be reached at start: `stillhouse run` fails within 30 s, naming the URI,
before curation, sampling or any model load.

Two ways a server is unreachable: nothing listens on the port (connection refused, from the config),
and a port that accepts connections but never answers (a hung server or a black-holing proxy, from
$MLFLOW_TRACKING_URI). The real CLI runs in a subprocess, as a user would start it.
"""

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow  # the real CLI in a subprocess: ~10-17 s per case

REPO = Path(__file__).parents[2]


def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def silent_server():
    """A port that accepts TCP connections (the kernel's backlog) and never sends a byte."""
    listener = socket.socket()
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()


@pytest.mark.parametrize("how", ["refused, from tracking.uri", "silent, from $MLFLOW_TRACKING_URI"])
def test_run_fails_fast_naming_the_tracking_uri_before_any_stage(tmp_path, pipeline_raw, silent_server, how):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PREFECT_HOME": str(tmp_path / "prefect")}
    if how.startswith("refused"):
        uri = f"http://127.0.0.1:{unused_port()}"
        pipeline_raw["tracking"]["uri"] = uri
    else:
        uri = silent_server
        del pipeline_raw["tracking"]["uri"]
        env["MLFLOW_TRACKING_URI"] = uri
    # A teacher whose config and tokenizer are fine but whose weights are garbage: had anything tried
    # to load the model, the error would be about safetensors, not about the tracking server.
    teacher = Path(shutil.copytree(pipeline_raw["sample"]["teacher"], tmp_path / "teacher"))
    (teacher / "model.safetensors").write_bytes(b"not weights")
    pipeline_raw["sample"]["teacher"] = str(teacher)
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump(pipeline_raw))
    started = time.monotonic()
    completed = subprocess.run(
        [sys.executable, "-m", "stillhouse.flows.cli", "run", str(config)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    seconds = time.monotonic() - started
    assert completed.returncode == 2, completed.stderr[-3000:]
    assert f"the MLflow tracking server at {uri} does not answer" in completed.stderr
    assert "fix tracking.uri / $MLFLOW_TRACKING_URI" in completed.stderr
    assert "Traceback" not in completed.stderr
    assert seconds < 30, f"took {seconds:.1f} s"
    print(f"{how}: exit 2 after {seconds:.1f} s")
    assert "safetensors" not in completed.stderr
    # Nothing ran: no store, no Prefect database, no MLflow files.
    assert not (tmp_path / "store").exists() and not (tmp_path / "prefect").exists()
    assert not (tmp_path / "mlflow.db").exists()
