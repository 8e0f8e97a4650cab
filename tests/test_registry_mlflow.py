"""The MLflow side of a student: lineage tags on runs and versions, and loading the champion with mlflow.transformers.

.venv/bin/python -m pytest tests/test_registry_mlflow.py -q
"""

import os

import mlflow
import pytest
from conftest import build_tiny_model
from mlflow.tracking import MlflowClient
from test_publish import refs

from stillhouse.config import parse_config
from stillhouse.registry.model_registry import register_student
from stillhouse.registry.promotion import find_champion, promote
from stillhouse.registry.tracking import code_version, lineage_tags, log_stage, start_pipeline_run

pytestmark = pytest.mark.slow  # mlflow.transformers.log_model writes and reads a model: ~10 s


def test_a_registered_student_carries_its_lineage_and_loads_as_champion(tmp_path, pipeline_raw):
    config = parse_config(pipeline_raw)
    tracking = start_pipeline_run(config, "flow-run-1", "http://127.0.0.1:4200/flow-runs/flow-run/flow-run-1")
    client = MlflowClient(tracking.tracking_uri)
    parent = client.get_run(tracking.parent_run_id).data.tags
    assert parent["prefect.flow_run_id"] == "flow-run-1" and parent["prefect.flow_run_url"].endswith(
        "/flow-run/flow-run-1"
    )
    assert parent["stillhouse.code_version"] == code_version() and code_version().startswith("0.")
    assert parent["stillhouse.teacher"] == config.sample.teacher and parent["stillhouse.method"] == "kd"

    dataset, samples, student, _ = refs(build_tiny_model(tmp_path / "student", hidden_size=16, seed=4))
    lineage = lineage_tags(config, tracking, dataset, samples)
    run_id = log_stage(tracking, "register", fingerprint=student.fingerprint, cached=False, seconds=0.0, tags=lineage)
    registered = register_student(config.registry, tracking, student, run_id, tags=lineage, license="apache-2.0")
    version = client.get_model_version(registered.name, registered.version)
    assert version.tags["stillhouse.teacher_revision"] == "local-sha256:abc"
    assert (
        version.tags["stillhouse.data_fingerprint"] == dataset.fingerprint
        and version.tags["stillhouse.samples_fingerprint"] == samples.fingerprint
    )
    assert version.tags["stillhouse.method"] == "kd" and version.tags["prefect.flow_run_id"] == "flow-run-1"
    assert (
        version.tags["stillhouse.code_version"] == code_version()
        and version.tags["stillhouse.train_fingerprint"] == student.fingerprint
    )

    promote(tracking, registered.name, registered.version, "champion")
    assert find_champion(tracking, registered.name, "champion").version == registered.version
    mlflow.set_tracking_uri(tracking.tracking_uri)
    components = mlflow.transformers.load_model(f"models:/{registered.name}@champion", return_type="components")
    tokenizer, model = components["tokenizer"], components["model"]
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "reverse: ab"}], tokenize=False, add_generation_prompt=True
    )
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert inputs["input_ids"].shape[1] < generated.shape[1] <= inputs["input_ids"].shape[1] + 3

    # The same student again (same train fingerprint) reuses the version instead of piling up copies.
    again = register_student(config.registry, tracking, student, run_id, tags=lineage, license="apache-2.0")
    assert again.cached and again.version == registered.version


def test_two_first_runs_of_a_fresh_project_share_the_new_database(tmp_path):
    """Two processes start on a project with no MLflow database yet: MLflow's schema migrations would collide
    (`table _alembic_tmp_experiments already exists`) without `prepare_database`'s lock; both get the one
    experiment."""
    import subprocess
    import sys

    script = (
        "import sys; from stillhouse.registry.tracking import ensure_experiment; "
        "print(ensure_experiment('first', sys.argv[1]))"
    )
    for attempt in range(2):
        uri = f"sqlite:///{tmp_path / f'project-{attempt}' / 'mlflow.db'}"
        runs = [
            subprocess.Popen(
                [sys.executable, "-c", script, uri], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            for _ in range(2)
        ]
        results = [run.communicate(timeout=120) for run in runs]
        assert [run.returncode for run in runs] == [0, 0], [err[-2000:] for _, err in results]
        assert len({out.strip() for out, _ in results}) == 1  # the same experiment id


def test_tracking_into_one_server_leaves_the_next_runs_default_alone(tmp_path, monkeypatch):
    """mlflow.set_tracking_uri exports $MLFLOW_TRACKING_URI; in a process running several pipelines (serve, a
    worker) the next config without tracking.uri would then track into the previous run's server."""
    from stillhouse.config import TrackingConfig
    from stillhouse.registry.tracking import ensure_experiment, tracking_uri, use_tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ensure_experiment("first", f"sqlite:///{tmp_path / 'first.db'}")
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert tracking_uri(TrackingConfig()).endswith(".stillhouse/mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")  # the user's own choice is kept
    use_tracking_uri(f"sqlite:///{tmp_path / 'second.db'}")
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000"
