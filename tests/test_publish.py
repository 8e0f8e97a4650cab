"""Publishing against the loopback Hub with the unmodified huggingface_hub client.

Create, upload as one commit, tag, read the card back through model_info, snapshot_download and
from_pretrained; visibility and tokens; a transient 503 on the commit; a commit whose answer is lost;
a license override written into the card. A card written from the user's own local teacher, base model and
data: public names instead of paths, refused without them, nothing private pushed, both models' terms, the
training prompts counted, the MLflow run that trained the student, no placeholder project link.

    .venv/bin/python -m pytest tests/test_publish.py -q
"""

import json
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_model
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import RepositoryNotFoundError
from transformers import AutoModelForCausalLM

from stillhouse.config import ConfigError, parse_config
from stillhouse.errors import InputError, StillhouseError
from stillhouse.licenses import check_pipeline_licenses
from stillhouse.public_names import check_public_names, private_lines
from stillhouse.refs import DatasetRef, EvalReport, ModelRef, SamplesRef
from stillhouse.registry.card import project_link
from stillhouse.registry.hub import push_folder
from stillhouse.registry.publish import check_folder_is_public, training_run, write_publish_folder

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


# The public names a user gives the teacher and data they read from local folders (pipeline_raw's are under tmp_path).
PUBLIC_NAMES = {"teacher_name": "alice/tiny-teacher", "dataset_names": ["alice/tiny-prompts"]}


def publish_config(pipeline_raw, hub, **publish):
    pipeline_raw["publish"] = {
        "repo_id": REPO,
        "endpoint": hub.url,
        "retry_backoff_s": 0.01,
        **PUBLIC_NAMES,
        **publish,
    }
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
        "id": "alice/tiny-teacher",
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
    pipeline_raw["publish"] = {"repo_id": REPO, "endpoint": hub.url, **PUBLIC_NAMES}
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


# A card written from the user's own folders: teacher, base model and data under tmp_path (absolute local paths) ----

OWN_NAMES = {
    "teacher_name": "alice/tiny-teacher",
    "base_model_name": "alice/tiny-base",
    "dataset_names": ["alice/tiny-prompts", "support tickets, not released"],
}


@pytest.fixture
def own_folders(tmp_path, pipeline_raw, prompts_jsonl):
    """pipeline_raw reading the user's own teacher (MIT), base model (Apache 2.0) and data file, all under tmp_path."""
    teacher = build_tiny_model(tmp_path / "models" / "my-teacher", hidden_size=16, seed=6)
    (teacher / "README.md").write_text("---\nlicense: mit\n---\n# my teacher\n")
    base = build_tiny_model(tmp_path / "models" / "my-base", hidden_size=16, seed=7)
    data = tmp_path / "data" / "my-prompts.jsonl"
    data.parent.mkdir()
    data.write_bytes(prompts_jsonl.read_bytes())
    pipeline_raw["sample"]["teacher"] = str(teacher)
    pipeline_raw["train"]["student"] = str(base)
    del pipeline_raw["train"]["architecture"]
    pipeline_raw["curate"]["source"] = str(data)
    return pipeline_raw


def published_text(folder) -> str:
    return "\n".join(path.read_text() for path in sorted(folder.iterdir()) if path.suffix in (".md", ".json"))


def test_a_push_of_local_folders_is_refused_until_they_have_public_names(tmp_path, own_folders, hub):
    config = publish_config(own_folders, hub, teacher_name=None, dataset_names=[])
    with pytest.raises(InputError) as refused:
        check_public_names(config)
    message = str(refused.value)
    assert f"publish.teacher_name: the teacher (sample.teacher) was read from a local folder ({tmp_path}" in message
    assert "set publish.teacher_name to its public name, e.g. Qwen/Qwen2.5-1.5B-Instruct" in message
    assert "publish.base_model_name: the base model (train.student) was read from a local folder" in message
    assert "publish.dataset_names: the data (curate.source) was read from local files" in message

    check_public_names(publish_config(own_folders, hub, **OWN_NAMES))  # named: nothing to refuse
    check_public_names(publish_config(own_folders, hub, repo_id=None))  # nothing is pushed: nothing to refuse


def test_validate_refuses_a_push_that_would_name_local_paths(tmp_path, own_folders, capsys):
    import yaml

    from stillhouse.flows.cli import main

    own_folders["publish"] = {"repo_id": REPO}
    config_path = tmp_path / "own.yaml"
    config_path.write_text(yaml.safe_dump(own_folders))
    assert main(["validate", str(config_path)]) == 2
    error = capsys.readouterr().err
    assert "publish.teacher_name" in error and "publish.base_model_name" in error and "publish.dataset_names" in error
    assert not (tmp_path / "store").exists()

    own_folders["publish"].update(OWN_NAMES)
    config_path.write_text(yaml.safe_dump(own_folders))
    assert main(["validate", str(config_path)]) == 0


def test_the_card_from_local_folders_shows_public_names_and_no_path(tmp_path, own_folders, hub, tiny_student):
    config = publish_config(own_folders, hub, **OWN_NAMES)
    folder = write_folder(tmp_path, config, tiny_student)
    text = published_text(folder)
    assert str(tmp_path) not in text and "/tmp/" not in text and "my-teacher" not in text and "my-base" not in text
    check_folder_is_public(folder, config)  # the last check before a push finds nothing

    card = ModelCard.load(folder / "README.md")
    assert card.data.base_model == "alice/tiny-base"
    assert card.data.datasets == ["alice/tiny-prompts"]  # a description is no Hub id: body only
    assert card.data.stillhouse["teacher"] == "alice/tiny-teacher"
    assert "from the teacher **alice/tiny-teacher**" in card.text and "fine-tuned from alice/tiny-base" in card.text
    assert "| data | alice/tiny-prompts, support tickets, not released |" in card.text

    provenance = json.loads((folder / "stillhouse.json").read_text())
    assert provenance["teacher"]["id"] == "alice/tiny-teacher"
    assert provenance["teacher"]["revision"] == "local-sha256:abc"  # the content fingerprint stays
    assert provenance["base_model"] == "alice/tiny-base" and provenance["data"]["sources"] == OWN_NAMES["dataset_names"]
    assert provenance["config"]["sample"]["teacher"] == "alice/tiny-teacher"
    assert provenance["config"]["train"]["student"] == "alice/tiny-base"
    assert provenance["config"]["curate"]["source"] == provenance["config"]["store"]["root"] == "<local path>"
    assert provenance["config"]["tracking"]["uri"] == "<local path>"  # sqlite:////tmp/.../mlflow.db


def test_a_folder_written_without_public_names_shows_folder_names_never_paths(tmp_path, own_folders, tiny_student):
    own_folders["publish"] = {}  # nothing is pushed, so nothing was refused
    config = parse_config(own_folders)
    folder = write_folder(tmp_path, config, tiny_student)
    text = published_text(folder)
    assert str(tmp_path) not in text and str(Path.home()) + "/" not in text
    card = (folder / "README.md").read_text()
    assert "from the teacher **my-teacher (local)**" in card and "fine-tuned from my-base (local)" in card
    assert "base_model:" not in card  # no Hub id to link


def test_terms_passed_on_name_the_teachers_and_the_base_models(tmp_path, own_folders, hub, tiny_student):
    config = publish_config(own_folders, hub, **OWN_NAMES)
    card = (write_folder(tmp_path, config, tiny_student) / "README.md").read_text()
    terms = card.split("Terms passed on from the teacher and base model:")[1].split("## How to load")[0]
    assert (
        "- The teacher alice/tiny-teacher is licensed under MIT License (https://opensource.org/license/mit); "
        "the student was trained on its outputs." in terms
    )
    assert "- The base model alice/tiny-base is licensed under Apache License 2.0" in terms


def test_the_card_counts_training_prompts_not_sampled_responses(tmp_path, pipeline_raw, hub, tiny_student):
    dataset, samples, *_ = refs(tiny_student)
    card = (write_folder(tmp_path, publish_config(pipeline_raw, hub), tiny_student) / "README.md").read_text()
    assert f"trained on the\nteacher's responses to {dataset.train_rows} training prompts only" in card
    assert f"{samples.rows} teacher responses" not in card


def test_the_project_link_is_the_declared_url_or_none(tmp_path, pipeline_raw, hub, tiny_student):
    import tomllib

    declared = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"].get("urls", {})
    card = (write_folder(tmp_path, publish_config(pipeline_raw, hub), tiny_student) / "README.md").read_text()
    assert "github.com/stillhouse)" not in card  # the old placeholder
    if not declared:
        assert "A student distilled by Stillhouse from the teacher" in card
    assert project_link(["Homepage, https://example.org/stillhouse"]) == "[Stillhouse](https://example.org/stillhouse)"
    assert project_link(["Bug Tracker, https://example.org/issues"]) == "Stillhouse"


def test_the_push_is_refused_when_the_card_holds_the_login_name_or_home(tmp_path, pipeline_raw, hub, tiny_student):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LOGNAME", "carol")  # getpass reads it first: a user called carol
        pipeline_raw["name"] = "carol-run"
        config = publish_config(pipeline_raw, hub, repo_id="carol/tiny-student")
        folder = write_folder(tmp_path, config, tiny_student)
        with pytest.raises(StillhouseError, match=r"(?s)not pushing carol/tiny-student.*README.md: .*carol-run"):
            check_folder_is_public(folder, config)
        pipeline_raw["name"] = "tiny"  # the repo's namespace alone is the publisher's choice: not refused
        config = publish_config(pipeline_raw, hub, repo_id="carol/tiny-student")
        check_folder_is_public(write_folder(tmp_path, config, tiny_student, "plain"), config)

    config = publish_config(pipeline_raw, hub)
    folder = write_folder(tmp_path, config, tiny_student, "home")
    with (folder / "README.md").open("a") as card:
        card.write(f"\nWeights kept in {Path.home() / 'models' / 'student'}\n")
    with pytest.raises(StillhouseError, match=r"README.md: Weights kept in /"):
        check_folder_is_public(folder, config)


def test_public_names_that_are_local_paths_are_refused(pipeline_raw):
    for field, value in [("teacher_name", "/home/alice/teacher"), ("dataset_names", ["ok/data", "~/data.jsonl"])]:
        pipeline_raw["publish"] = {field: value}
        with pytest.raises(ConfigError, match=rf"publish.{field}: .* is a local path; write the public name"):
            parse_config(pipeline_raw)


def test_private_lines_leave_urls_hub_ids_and_fractions_alone():
    text = "\n".join(
        [
            "see https://www.apache.org/licenses/LICENSE-2.0 and alice/tiny-student",
            "| tokens/s | 1/4 | exact match / reverse |",
            '"root": "/srv/models/teacher"',
            "sqlite:////var/lib/mlflow.db",
        ]
    )
    assert private_lines(text, home="/home/nobody-here") == [
        '"root": "/srv/models/teacher"',
        "sqlite:////var/lib/mlflow.db",
    ]


@pytest.mark.slow
@pytest.mark.integration
def test_a_publish_only_rerun_names_the_run_that_trained_the_student(
    prefect_harness, tmp_path, own_folders, hub, monkeypatch
):
    """Trained (and registered) in one run, published by the next: the card links the first."""
    from huggingface_hub import HfApi

    from stillhouse.flows.distill import distill

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    trained = distill(parse_config(own_folders), until="register")
    config = publish_config(own_folders, hub, **OWN_NAMES)
    published = distill(config)
    assert published.cached["train"] and published.mlflow_run_id != trained.mlflow_run_id

    provenance = json.loads(hub.files(REPO)["stillhouse.json"])
    assert provenance["mlflow_run_id"] == trained.mlflow_run_id
    assert provenance["mlflow_publish_run_id"] == published.mlflow_run_id
    card = hub.files(REPO)["README.md"].decode()
    assert f"Trained in MLflow run\n`{trained.mlflow_run_id}`" in card
    assert f"published from MLflow run `{published.mlflow_run_id}`" in card
    assert f"responses to {trained.dataset.train_rows} training prompts" in card
    pushed = "\n".join(content.decode(errors="replace") for content in hub.files(REPO).values())
    assert str(tmp_path) not in pushed and "/tmp/" not in pushed
    assert HfApi(endpoint=hub.url, token=TOKEN).model_info(REPO).card_data.base_model == "alice/tiny-base"


@pytest.mark.slow
def test_the_training_run_is_found_from_a_later_run(pipeline_raw, tiny_student):
    """MLflow on sqlite: run A computed the student, run B reused it from the store; B publishes, A is named."""
    from stillhouse.registry.tracking import log_stage, start_pipeline_run

    config = parse_config(pipeline_raw)
    student = refs(tiny_student)[2]
    first = start_pipeline_run(config, "flow-a")
    log_stage(first, "train", fingerprint=student.fingerprint, cached=False, seconds=1.0)
    second = start_pipeline_run(config, "flow-b")
    log_stage(second, "train", fingerprint=student.fingerprint, cached=True, seconds=0.0)

    found = training_run(second, student, None)
    assert found["mlflow_run_id"] == first.parent_run_id and found["prefect_flow_run_id"] == "flow-a"
    other = student.model_copy(update={"fingerprint": "f" * 16})  # trained elsewhere: this run stands in
    assert training_run(second, other, None)["mlflow_run_id"] == second.parent_run_id
