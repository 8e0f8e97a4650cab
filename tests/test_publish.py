"""Publishing against the loopback Hub with the unmodified huggingface_hub client.

Create, upload as one commit, tag, read the card back through model_info, snapshot_download and
from_pretrained; visibility and tokens; a transient 503 on the commit; a commit whose answer is lost;
a license override written into the card.

    .venv/bin/python -m pytest tests/test_publish.py -q
"""

import json

import pytest
import torch
from conftest import build_tiny_model
from huggingface_hub import HfApi
from huggingface_hub.errors import RepositoryNotFoundError
from transformers import AutoModelForCausalLM

from stillhouse.config import parse_config
from stillhouse.errors import InputError, StillhouseError
from stillhouse.licenses import check_pipeline_licenses
from stillhouse.refs import DatasetRef, EvalReport, ModelRef, SamplesRef
from stillhouse.registry.hub import push_folder
from stillhouse.registry.publish import write_publish_folder

TOKEN = "hf_test_token"
REPO = "alice/tiny-student"


@pytest.fixture(scope="module")
def tiny_student(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("student"), hidden_size=16, seed=3)


def refs(student_path):
    dataset = DatasetRef(
        stage="curate",
        fingerprint="d" * 16,
        path="/x",
        cached=True,
        train_rows=96,
        eval_rows=24,
        has_references=True,
        counts={},
    )
    samples = SamplesRef(
        stage="sample",
        fingerprint="s" * 16,
        path="/x",
        cached=True,
        rows=120,
        teacher="t",
        teacher_revision="local-sha256:abc",
        tokenizer_fingerprint="tok123",
        top_k_logprobs=4,
        generated_tokens=960,
    )
    student = ModelRef(
        stage="train",
        fingerprint="m" * 16,
        path="/x",
        cached=True,
        model_path=str(student_path),
        parameters=1234,
        train_seconds=12.5,
        final_loss=1.0,
    )
    report = EvalReport(
        stage="evaluate",
        fingerprint="e" * 16,
        path="/x",
        cached=True,
        metrics={
            "student_exact_match": 0.5,
            "teacher_exact_match": 0.9,
            "parameter_ratio": 0.25,
            "student_perplexity": 3.2,
        },
    )
    return dataset, samples, student, report


LINEAGE = {
    "mlflow_run_id": "run123",
    "mlflow_run_url": "http://mlflow.example/#/experiments/1/runs/run123",
    "prefect_flow_run_id": "flow-run-9",
    "code_version": "0.1.0+gabc",
}


def publish_config(pipeline_raw, hub, **publish):
    pipeline_raw["publish"] = {"repo_id": REPO, "endpoint": hub.url, "retry_backoff_s": 0.01, **publish}
    return parse_config(pipeline_raw)


def write_folder(tmp_path, config, student_path, name="out"):
    check = check_pipeline_licenses(config)
    return write_publish_folder(tmp_path / name, config, *refs(student_path), check, LINEAGE)


def test_push_without_a_token_names_the_variable(tmp_path, pipeline_raw, monkeypatch):
    monkeypatch.delenv("MY_HUB_TOKEN", raising=False)
    pipeline_raw["publish"] = {"repo_id": "alice/x", "token_env": "MY_HUB_TOKEN", "endpoint": "http://127.0.0.1:9"}
    with pytest.raises(InputError, match=r"\$MY_HUB_TOKEN is empty"):
        push_folder(tmp_path, parse_config(pipeline_raw))


def test_publish_creates_uploads_tags_and_reads_back(tmp_path, pipeline_raw, hub, monkeypatch, tiny_student):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    config = publish_config(pipeline_raw, hub)
    folder = write_folder(tmp_path, config, tiny_student)
    published = push_folder(folder, config, tag="v1", description="publish fingerprint p1")

    commits = hub.commits(REPO)
    assert (
        len(commits) == 2 and commits[0]["sha"] == published.commit_oid
    )  # the repo's initial commit + one publish commit
    assert set(commits[0]["files"]) == {p.name for p in folder.iterdir()}
    api = HfApi(endpoint=hub.url, token=TOKEN)
    assert [(t.name, t.target_commit) for t in api.list_repo_refs(REPO).tags] == [("v1", published.commit_oid)]
    assert published.revision_url == f"{hub.url}/{REPO}/tree/{published.commit_oid}"

    info = api.model_info(REPO, revision="v1")
    assert info.private is True  # publish.private defaults to true
    card = info.card_data
    assert card.license == "apache-2.0" and card.library_name == "transformers"
    assert {"distillation", "stillhouse", "kd"} <= set(card.tags)
    results = {r.metric_name: r.metric_value for r in card.eval_results}
    assert results == {"teacher exact_match": 0.9, "student exact_match": 0.5, "student perplexity": 3.2}
    assert card.model_name == "tiny-student"
    readme = (folder / "README.md").read_text()
    assert (
        "run123" in readme and "http://mlflow.example/#/experiments/1/runs/run123" in readme
    )  # the card links back to the run
    assert "## Intended use" in readme and "## Limitations" in readme and "12 s of training" in readme

    provenance = json.loads((folder / "stillhouse.json").read_text())
    assert provenance["teacher"] == {
        "id": config.sample.teacher,
        "revision": "local-sha256:abc",
        "tokenizer_fingerprint": "tok123",
    }
    assert provenance["mlflow_run_id"] == "run123" and provenance["prefect_flow_run_id"] == "flow-run-9"
    assert provenance["fingerprints"]["curate"] == "d" * 16 and provenance["config"]["publish"]["repo_id"] == REPO
    assert set(provenance["files"]) == {
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "README.md",
        "chat_template.jinja",
    } & {p.name for p in folder.iterdir()} | {"model.safetensors"}

    downloaded = api.snapshot_download(REPO, revision="v1", cache_dir=tmp_path / "fresh-cache")
    remote, local = AutoModelForCausalLM.from_pretrained(downloaded), AutoModelForCausalLM.from_pretrained(tiny_student)
    assert all(torch.equal(a, b) for a, b in zip(remote.state_dict().values(), local.state_dict().values()))


def test_a_private_repo_is_refused_without_a_token(tmp_path, pipeline_raw, hub, monkeypatch, tiny_student):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    config = publish_config(pipeline_raw, hub, private=True)
    push_folder(write_folder(tmp_path, config, tiny_student), config)
    anonymous = HfApi(endpoint=hub.url, token=False)
    with pytest.raises(RepositoryNotFoundError):
        anonymous.model_info(REPO)
    with pytest.raises(RepositoryNotFoundError):
        anonymous.snapshot_download(REPO, cache_dir=tmp_path / "anon-cache")

    public = publish_config(pipeline_raw, hub, private=False, repo_id="alice/public-student")
    push_folder(write_folder(tmp_path, public, tiny_student, "public"), public)
    assert anonymous.model_info("alice/public-student").private is False


def test_a_wrong_token_fails_with_a_clear_message(tmp_path, pipeline_raw, hub, monkeypatch, tiny_student):
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    config = publish_config(pipeline_raw, hub)
    with pytest.raises(
        StillhouseError, match=r"HTTP 401 Invalid credentials.*refused the token in \$HF_TOKEN"
    ) as failure:
        push_folder(write_folder(tmp_path, config, tiny_student), config)
    assert "hf_wrong" not in str(failure.value)
    assert not hub.repos


def test_a_transient_503_on_the_commit_is_retried(tmp_path, pipeline_raw, hub, monkeypatch, tiny_student):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    config = publish_config(pipeline_raw, hub)
    hub.inject("POST", r"/commit/", status=503)
    messages = []
    published = push_folder(write_folder(tmp_path, config, tiny_student), config, tag="v1", log=messages.append)

    assert [r.status for r in hub.requests if r.path.endswith("/commit/main")] == [503, 200]
    assert len(hub.commits(REPO)) == 2 and hub.commits(REPO)[0]["sha"] == published.commit_oid
    assert messages == [
        f"Hub commit: HTTP 503 LoopbackHub injected fault: HTTP 503; retry 1/{config.publish.hub_retries} in 0.0s"
    ]


def test_a_commit_whose_answer_is_lost_is_not_applied_twice(tmp_path, pipeline_raw, hub, monkeypatch, tiny_student):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    config = publish_config(pipeline_raw, hub)
    hub.inject("POST", r"/commit/", drop=True, after_handling=True)
    published = push_folder(
        write_folder(tmp_path, config, tiny_student), config, tag="v1", description="fingerprint f1"
    )
    # The first commit landed; on the retry the client sees every file already there and commits nothing
    # (had anything differed, the retry's pin to the old head would have been refused with 412).
    assert [r.status for r in hub.requests if r.path.endswith("/commit/main")] == [0]
    assert len(hub.commits(REPO)) == 2 and published.commit_oid == hub.commits(REPO)[0]["sha"]


def test_a_license_override_is_written_into_the_card(tmp_path, pipeline_raw, hub, tiny_student):
    teacher_readme = "---\nlicense: llama3.1\n---\n"
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "config.json").write_text("{}")
    (teacher / "README.md").write_text(teacher_readme)
    pipeline_raw["sample"]["teacher"] = str(teacher)
    config = publish_config(
        pipeline_raw, hub, license_override="Meta granted us a naming exception in writing (ref 42)"
    )
    check = check_pipeline_licenses(config)
    assert not check.ok
    folder = write_publish_folder(tmp_path / "out", config, *refs(tiny_student), check, LINEAGE)
    readme = (folder / "README.md").read_text()
    assert "License override" in readme and "Meta granted us a naming exception in writing (ref 42)" in readme
    assert "include “Llama” at the beginning of any such AI model name" in readme and "Built with Llama" in readme


def test_a_license_violation_blocks_publishing_before_anything_runs(tmp_path, pipeline_raw, hub, monkeypatch, capsys):
    import yaml

    from stillhouse.flows.cli import main

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    teacher = build_tiny_model(tmp_path / "llama-teacher", hidden_size=16, seed=6)
    (teacher / "README.md").write_text("---\nlicense: llama3.1\n---\n# a Llama 3.1 derivative\n")
    pipeline_raw["sample"]["teacher"] = str(teacher)
    pipeline_raw["publish"] = {"repo_id": REPO, "endpoint": hub.url}
    config_path = tmp_path / "llama.yaml"
    config_path.write_text(yaml.safe_dump(pipeline_raw))

    assert main(["run", str(config_path)]) == 2
    error = capsys.readouterr().err
    assert "its name must start with “Llama”" in error and "rename publish.repo_id 'alice/tiny-student'" in error
    assert "you shall also include “Llama” at the beginning of any such AI model name" in error  # the clause, quoted
    assert not hub.requests and not (tmp_path / "store").exists()  # refused before curation, sampling or training

    pipeline_raw["publish"]["license_override"] = "Meta granted us a naming exception in writing (ref 42)"
    config_path.write_text(yaml.safe_dump(pipeline_raw))
    assert main(["validate", str(config_path)]) == 0


def test_a_retried_commit_refused_as_stale_is_recognised_as_landed(
    tmp_path, pipeline_raw, hub, monkeypatch, tiny_student
):
    """The retry of a commit that did land is pinned to the old head, so the Hub refuses it (412) rather than apply it
    twice."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    config = publish_config(pipeline_raw, hub)
    first = write_folder(tmp_path, config, tiny_student, "first")
    (first / "notes.txt").write_text("only in the first release\n")
    push_folder(first, config, tag="v1")
    hub.inject("POST", r"/commit/", drop=True, after_handling=True)
    second = write_folder(tmp_path, config, tiny_student, "second")  # same weights; notes.txt goes away
    published = push_folder(second, config, tag="v2", description="publish fingerprint f2")

    assert [r.status for r in hub.requests if r.path.endswith("/commit/main")][-2:] == [0, 412]
    assert (
        len(hub.commits(REPO)) == 3 and published.commit_oid == hub.commits(REPO)[0]["sha"]
    )  # initial, v1, v2: nothing twice
    assert "notes.txt" not in hub.files(REPO)
    refs_now = HfApi(endpoint=hub.url, token=TOKEN).list_repo_refs(REPO)
    assert {t.name: t.target_commit for t in refs_now.tags}["v2"] == published.commit_oid
