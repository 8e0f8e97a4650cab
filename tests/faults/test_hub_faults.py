"""The Hub failing while a student is published: retried where safe, and the previous revision always intact.

Faults are injected by the loopback Hub (tests/hub_server.py) into the real client's requests:
a commit answered 500 until the retries run out, an LFS upload refused halfway through a push, a
connection dropped during an LFS upload, and the same through the whole `stillhouse run`.

    .venv/bin/python -m pytest tests/faults/test_hub_faults.py -q
"""

from pathlib import Path

import pytest
import torch
import yaml
from conftest import build_tiny_model
from huggingface_hub import HfApi
from mlflow.tracking import MlflowClient
from test_publish import LINEAGE, refs
from transformers import AutoModelForCausalLM

from stillhouse.config import parse_config
from stillhouse.errors import StillhouseError
from stillhouse.flows.cli import main
from stillhouse.licenses import check_pipeline_licenses
from stillhouse.registry.hub import push_folder
from stillhouse.registry.publish import write_publish_folder

TOKEN = "hf_test_token"
REPO = "alice/tiny-student"


@pytest.fixture
def first_release(tmp_path, pipeline_raw, hub, monkeypatch):
    """(config, v1 commit, v1 files): a student published as tag v1, and a config for the next push."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    pipeline_raw["publish"] = {
        "repo_id": REPO,
        "endpoint": hub.url,
        "hub_retries": 2,
        "retry_backoff_s": 0.01,
        "teacher_name": "alice/tiny-teacher",
        "dataset_names": ["alice/tiny-prompts"],
    }
    config = parse_config(pipeline_raw)
    v1 = build_tiny_model(tmp_path / "v1", hidden_size=16, seed=1)
    folder = write_publish_folder(tmp_path / "out-v1", config, *refs(v1), check_pipeline_licenses(config), LINEAGE)
    published = push_folder(folder, config, tag="v1")
    return config, published.commit_oid, hub.files(REPO)


def second_folder(tmp_path, config):
    v2 = build_tiny_model(tmp_path / "v2", hidden_size=16, seed=2)
    return write_publish_folder(tmp_path / "out-v2", config, *refs(v2), check_pipeline_licenses(config), LINEAGE)


def assert_still_v1(hub, tmp_path, v1_commit, v1_files):
    assert hub.commits(REPO)[0]["sha"] == v1_commit and hub.files(REPO) == v1_files
    api = HfApi(endpoint=hub.url, token=TOKEN)
    assert [(t.name, t.target_commit) for t in api.list_repo_refs(REPO).tags] == [("v1", v1_commit)]
    downloaded = AutoModelForCausalLM.from_pretrained(api.snapshot_download(REPO, cache_dir=tmp_path / "check-cache"))
    original = AutoModelForCausalLM.from_pretrained(tmp_path / "v1")
    assert all(torch.equal(a, b) for a, b in zip(downloaded.state_dict().values(), original.state_dict().values()))


def test_a_commit_failing_for_good_is_retried_then_leaves_the_previous_revision(first_release, hub, tmp_path):
    config, v1_commit, v1_files = first_release
    hub.inject("POST", r"/commit/", status=500, times=100)
    with pytest.raises(
        StillhouseError,
        match=r"publishing alice/tiny-student .* failed after 2 retries: HTTP 500 .*previous revision is unchanged",
    ):
        push_folder(second_folder(tmp_path, config), config, tag="v2")
    assert [r.status for r in hub.requests if r.path.endswith("/commit/main")][-3:] == [
        500,
        500,
        500,
    ]  # first try + hub_retries
    assert_still_v1(hub, tmp_path, v1_commit, v1_files)


def test_an_upload_refused_halfway_leaves_the_previous_revision(first_release, hub, tmp_path):
    config, v1_commit, v1_files = first_release
    hub.inject(
        "PUT", r"^/_lfs/", status=400, times=100
    )  # the weights never arrive; the small files would go in the commit
    folder, before = second_folder(tmp_path, config), len(hub.requests)
    with pytest.raises(
        StillhouseError,
        match="Error while uploading 'model.safetensors' to the Hub. HTTP 400 .*previous revision is unchanged",
    ):
        push_folder(folder, config, tag="v2")
    assert not any(
        r.path.endswith("/commit/main") for r in hub.requests[before:]
    )  # no commit was attempted without its weights
    assert_still_v1(hub, tmp_path, v1_commit, v1_files)


def test_a_connection_dropped_during_an_lfs_upload_is_retried(first_release, hub, tmp_path):
    config, v1_commit, _ = first_release
    hub.inject("PUT", r"^/_lfs/", drop=True)
    folder = second_folder(tmp_path, config)
    published = push_folder(folder, config, tag="v2")
    uploads = [r.status for r in hub.requests if r.method == "PUT" and r.path.startswith("/_lfs/")]
    assert uploads[-2:] == [0, 200]  # dropped, then the client's retry went through
    assert hub.commits(REPO)[0]["sha"] == published.commit_oid != v1_commit
    assert hub.files(REPO)["model.safetensors"] == (folder / "model.safetensors").read_bytes()


@pytest.mark.slow
def test_the_flow_fails_with_a_clear_message_and_the_run_is_marked_failed(
    prefect_harness, pipeline_raw, hub, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    pipeline_raw["publish"] = {
        "repo_id": REPO,
        "endpoint": hub.url,
        "hub_retries": 1,
        "retry_backoff_s": 0.01,
        "teacher_name": "alice/tiny-teacher",
        "dataset_names": ["alice/tiny-prompts"],
    }
    config_path = tmp_path / "broken-hub.yaml"
    config_path.write_text(yaml.safe_dump(pipeline_raw))
    hub.inject("POST", r"/commit/", status=503, times=100)

    assert main(["run", str(config_path)]) == 2
    error = capsys.readouterr().err
    assert (
        "publishing alice/tiny-student" in error and "HTTP 503" in error and "previous revision is unchanged" in error
    )
    assert TOKEN not in error
    assert [commit["message"] for commit in hub.commits(REPO)] == [
        "initial commit"
    ]  # the repo exists, nothing was committed
    client = MlflowClient(pipeline_raw["tracking"]["uri"])
    (run,) = client.search_runs(
        client.get_experiment_by_name("tests").experiment_id,
        "tags.stillhouse.pipeline = 'tiny' and attributes.status = 'FAILED'",
    )
    assert run.data.tags.get("stillhouse.hub.commit") is None  # the run links to no revision that doesn't exist
    assert not list(
        (Path(pipeline_raw["store"]) / "publish").glob("*/manifest.json")
    )  # nothing sealed: a rerun pushes again
