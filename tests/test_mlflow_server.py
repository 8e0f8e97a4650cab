"""Against a real `mlflow server` on 127.0.0.1: the pipeline tracks, logs the student and registers it."""

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from servers import mlflow_server as running_mlflow_server

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def mlflow_server(tmp_path):
    with running_mlflow_server(tmp_path) as url:
        yield url


def test_pipeline_registers_the_student_on_a_real_tracking_server(
    prefect_harness, mlflow_server, pipeline_raw, tmp_path
):
    from stillhouse.config import parse_config
    from stillhouse.flows.distill import distill

    pipeline_raw["tracking"]["uri"] = mlflow_server
    result = distill(parse_config(pipeline_raw), until="register")
    client = MlflowClient(mlflow_server)
    version = client.get_model_version_by_alias("tiny-student", "candidate")
    assert str(version.version) == result.registered.version
    assert version.tags["stillhouse.train_fingerprint"] == result.student.fingerprint
    import mlflow.artifacts

    downloaded = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri="models:/tiny-student@candidate",
            dst_path=str(tmp_path / "download"),
            tracking_uri=mlflow_server,
        )
    )
    assert list(downloaded.rglob("model.safetensors")), "the logged student's weights are on the server"
    assert any((tmp_path / "mlflow-artifacts").iterdir())  # artifacts went through the server, not to a local ./mlruns
