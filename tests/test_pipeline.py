"""End to end: the Prefect flow with MLflow on sqlite, publishing to a loopback Hub, and the cache."""

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from transformers import AutoModelForCausalLM, AutoTokenizer

from stillhouse.config import parse_config
from stillhouse.flows.distill import distill

TOKEN = "hf_test_token"

pytestmark = pytest.mark.slow


def all_text(folder: Path) -> str:
    return "\n".join(p.read_bytes().decode("utf-8", "replace") for p in folder.rglob("*") if p.is_file())


def by_stage_after(client, result) -> dict:
    runs = client.search_runs([result.experiment_id], f"tags.mlflow.parentRunId = '{result.mlflow_run_id}'")
    return {run.data.tags["stillhouse.stage"]: run for run in runs}


def test_pipeline_end_to_end_then_from_cache(prefect_harness, pipeline_raw, hub, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    pipeline_raw["publish"] = {
        "repo_id": "alice/tiny-student",
        "endpoint": hub.url,
        "teacher_name": "alice/tiny-teacher",  # the teacher is a local folder: the card names it by its public name
        "dataset_names": ["alice/tiny-prompts"],
    }
    config = parse_config(pipeline_raw)
    result = distill(config)

    # Stage outputs, each sealed by its manifest in the store.
    store = Path(config.store.root)
    for ref in (result.dataset, result.samples, result.student, result.report):
        assert (store / ref.stage / ref.fingerprint / "manifest.json").is_file()
        assert not ref.cached
    assert result.samples.rows == result.dataset.train_rows + result.dataset.eval_rows
    assert set(result.seconds) == {"curate", "sample", "train", "evaluate", "register", "gate", "publish"}

    # MLflow: a parent run, a nested run per stage, params, metrics, and a registered version with alias.
    client = MlflowClient(config.tracking.uri)
    parent = client.get_run(result.mlflow_run_id)
    assert parent.data.params["train.method"] == "kd" and parent.data.params["sample.top_k_logprobs"] == "4"
    assert "student_exact_match" in parent.data.metrics and parent.data.tags["prefect.flow_run_id"]
    children = client.search_runs([result.experiment_id], f"tags.mlflow.parentRunId = '{result.mlflow_run_id}'")
    by_stage = {run.data.tags["stillhouse.stage"]: run for run in children}
    assert set(by_stage) == {"curate", "sample", "train", "evaluate", "register", "gate", "publish"}
    assert by_stage["train"].data.tags["stillhouse.fingerprint"] == result.student.fingerprint
    assert len(client.get_metric_history(by_stage["train"].info.run_id, "train_loss")) == 3
    assert by_stage["evaluate"].data.metrics["kl_teacher_student"] > 0
    # One key per config value, section-prefixed in the parent run and the nested runs alike.
    assert by_stage["train"].data.params["train.kd.temperature"] == parent.data.params["train.kd.temperature"] == "1.0"
    assert (
        by_stage["gate"].data.params["evaluate.gate.champion_alias"]
        == parent.data.params["evaluate.gate.champion_alias"]
    )
    assert not any(key.startswith("kd.") for key in by_stage["train"].data.params)
    # A metric has the report's name in MLflow too (the terminal table and the card render the same rows).
    assert "student_exact_match/reverse" in by_stage["evaluate"].data.metrics
    version = client.get_model_version_by_alias("tiny-student", "candidate")
    assert str(version.version) == result.registered.version and version.run_id == by_stage["register"].info.run_id
    # The first candidate has no champion to beat: it passes the gate, becomes @champion and is published.
    assert (
        result.verdict.passed
        and str(client.get_model_version_by_alias("tiny-student", "champion").version) == result.registered.version
    )

    # The published folder loads with plain transformers and generates; the Hub got it in one commit.
    folder = Path(result.published.folder)
    assert {
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "README.md",
        "stillhouse.json",
    } <= {p.name for p in folder.iterdir()}
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "reverse: abc"}], tokenize=False, add_generation_prompt=True
    )
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    assert model.generate(**inputs, max_new_tokens=4).shape[1] > inputs["input_ids"].shape[1]
    card = (folder / "README.md").read_text()
    assert "license: apache-2.0" in card and "stillhouse" in card and "alice/tiny-teacher" in card
    assert str(config.sample.teacher) not in card
    provenance = json.loads((folder / "stillhouse.json").read_text())
    assert (
        provenance["mlflow_run_id"] == result.mlflow_run_id
        and provenance["fingerprints"]["train"] == result.student.fingerprint
    )
    assert hub.files("alice/tiny-student").keys() >= {"model.safetensors", "README.md", "stillhouse.json"}
    assert [c["message"] for c in hub.commits("alice/tiny-student")][0].startswith("Stillhouse: publish tiny v1")
    assert result.published.commit_oid == hub.commits("alice/tiny-student")[0]["sha"]
    # The run links to the Hub revision, the card back to the run; the round trip from a fresh cache matched.
    linked = client.get_run(result.mlflow_run_id).data.tags
    assert (
        linked["stillhouse.hub.commit"] == result.published.commit_oid
        and linked["stillhouse.hub.tag"] == f"v{result.registered.version}"
    )
    assert linked["stillhouse.round_trip"] == "passed" and result.mlflow_run_id in card
    assert (
        by_stage_after(client, result)["publish"].data.metrics["round_trip_matching"]
        == config.publish.round_trip_prompts
    )
    # The registering run names what the student learned from: the curated prompts and the teacher's outputs.
    inputs = {(d.dataset.name, d.dataset.digest) for d in client.get_run(version.run_id).inputs.dataset_inputs}
    assert inputs == {("tiny-train", result.dataset.fingerprint), ("tiny-teacher-outputs", result.samples.fingerprint)}

    # The token reached the Hub and nowhere else: not the folder, the store, or MLflow.
    assert any(request.token == TOKEN for request in hub.requests)
    assert TOKEN not in all_text(store)
    assert TOKEN not in (tmp_path / "mlflow.db").read_bytes().decode("utf-8", "replace")

    # A rerun of the unchanged config reuses every stage and registers no new version.
    rerun = distill(config)
    assert all(rerun.cached[stage] for stage in ("curate", "sample", "train", "evaluate"))
    assert rerun.registered.cached and rerun.registered.version == result.registered.version and rerun.cached["publish"]
    assert len(hub.commits("alice/tiny-student")) == 2  # the repo's initial commit + one publish commit

    # Changing only the training section reuses curation and sampling.
    pipeline_raw["train"]["max_steps"] = 4
    changed = distill(parse_config(pipeline_raw), until="train")
    assert changed.cached == {"curate": True, "sample": True, "train": False}
    assert changed.report is None
