"""The curation report (counts, histograms, examples), the MLflow dataset input, and the Prefect task."""

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from test_curation_formats import filler, write_jsonl

from stillhouse.config import CurateConfig, parse_config
from stillhouse.data.curate import curate
from stillhouse.registry.datasets import log_curated_dataset
from stillhouse.registry.tracking import TrackingContext, ensure_experiment
from stillhouse.store import Store


@pytest.fixture
def dataset(tmp_path):
    rows = [{"prompt": t} for t in filler(60)] + [{"prompt": filler(1)[0]}, {"prompt": ""}, {"prompt": "x" * 400}]
    config = CurateConfig(
        source=str(write_jsonl(tmp_path / "p.jsonl", rows)),
        reference_column=None,
        filters={"length": {"max_chars": 300}},
    )
    return curate(config, Store(tmp_path / "store"))


def test_report_has_counts_sources_histograms_and_examples(dataset):
    folder = Path(dataset.path) / "report"
    report = json.loads((folder / "report.json").read_text())
    assert report["counts"]["dropped_duplicate"] == 1 and report["counts"]["dropped_empty"] == 1
    assert report["counts"]["dropped_too_long_chars"] == 1 and report["sources"]["p"]["rows_out"] == 60
    assert set(report["examples"]) == {"dropped_duplicate", "dropped_empty", "dropped_too_long_chars"}
    assert (folder / "length_chars.png").read_bytes()[:4] == b"\x89PNG"
    markdown = (folder / "report.md").read_text()
    assert (
        "exact duplicate (normalized text) (`dropped_duplicate`) | 1 |" in markdown
        and "### Removed: more characters than max_chars" in markdown
    )
    manifest = json.loads((Path(dataset.path) / "manifest.json").read_text())
    assert "report/length_chars.png" in manifest["report"] and manifest["columns"][-1] == "source"
    assert not (Path(dataset.path) / ".work").exists()


def test_a_rerun_reuses_the_versioned_output(tmp_path, dataset):
    config = CurateConfig(
        source=str(tmp_path / "p.jsonl"), reference_column=None, filters={"length": {"max_chars": 300}}
    )
    again = curate(config, Store(tmp_path / "store"))
    assert again.cached and again.fingerprint == dataset.fingerprint
    changed = curate(config.model_copy(update={"split_salt": "other"}), Store(tmp_path / "store"))
    assert not changed.cached and changed.fingerprint != dataset.fingerprint


def test_the_dataset_is_logged_to_mlflow_as_inputs_with_its_digest_and_report(tmp_path, dataset):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment_id = ensure_experiment("tests", uri)
    client = MlflowClient(uri)
    run_id = client.create_run(experiment_id).info.run_id
    log_curated_dataset(
        TrackingContext(tracking_uri=uri, experiment_id=experiment_id, parent_run_id=run_id),
        run_id,
        dataset,
        name="tiny",
    )
    inputs = client.get_run(run_id).inputs.dataset_inputs
    by_name = {i.dataset.name: i for i in inputs}
    assert set(by_name) == {"tiny-train", "tiny-eval"}
    assert {i.dataset.digest for i in inputs} == {dataset.fingerprint}
    assert {tag.value for i in inputs for tag in i.tags} == {"training", "evaluation"}
    assert "train.parquet" in by_name["tiny-train"].dataset.source
    artifacts = {a.path for a in client.list_artifacts(run_id, "curation_report")}
    assert {"curation_report/report.md", "curation_report/length_chars.png"} <= artifacts


@pytest.mark.slow
def test_the_curate_task_logs_the_dataset_and_the_report(prefect_harness, pipeline_raw):
    from prefect import flow

    from stillhouse.registry.tracking import start_pipeline_run
    from stillhouse.tasks.curate import curate_task

    config = parse_config(pipeline_raw)

    @flow
    def only_curate():
        tracking = start_pipeline_run(config, None)
        return curate_task(config, tracking), tracking

    dataset, tracking = only_curate()
    client = MlflowClient(config.tracking.uri)
    child = client.search_runs([tracking.experiment_id], f"tags.mlflow.parentRunId = '{tracking.parent_run_id}'")[0]
    assert child.data.metrics["dropped_duplicate"] >= 1
    assert {i.dataset.digest for i in child.inputs.dataset_inputs} == {dataset.fingerprint}


def test_progress_is_reported_from_zero_to_one(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": t} for t in filler(450)])
    fractions = []
    curate(
        CurateConfig(source=str(path), reference_column=None, batch_rows=100),
        Store(tmp_path / "store"),
        progress=fractions.append,
    )
    assert len(fractions) >= 6 and fractions == sorted(fractions) and fractions[-1] == 1.0 and 0 < fractions[0] < 0.5
