"""A publish killed with SIGTERM after its Hub push, before the publish stage was sealed: the rerun completes it.

`stillhouse run` publishes in a child process to the loopback Hub (tests/hub_server.py), which holds
one request unanswered so the child is stopped at an exact point: after the commit but before the tag,
or after the tag, during the round trip that downloads the revision again. The child's process group
gets a real SIGTERM there. The rerun (same config) must find its own commit on the Hub by the
``content_sha256`` in stillhouse.json and finish: exactly one publish commit, the tag on it; before the
fix every rerun failed on the tag, or added a commit.

    .venv/bin/python -m pytest tests/faults/test_publish_interrupted.py -q
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import tiny_pipeline_raw
from huggingface_hub import HfApi

from stillhouse.flows.cli import main
from stillhouse.store import MANIFEST

pytestmark = [pytest.mark.slow, pytest.mark.integration]
TOKEN = "hf_test_token"
REPO = "alice/tiny-student"


@pytest.fixture(scope="module")
def registered(prefect_harness, tmp_path_factory, tiny_teacher, prompts_jsonl) -> Path:
    """A folder holding a store and MLflow database with every stage up to register done; tests work on copies."""
    from stillhouse.config import parse_config
    from stillhouse.flows.distill import distill
    from stillhouse.refs import Stage

    folder = tmp_path_factory.mktemp("registered")
    distill(parse_config(tiny_pipeline_raw(folder, tiny_teacher, prompts_jsonl)), until=Stage.register)
    return folder


@pytest.fixture
def config_path(registered, tmp_path, tiny_teacher, prompts_jsonl, hub) -> Path:
    for name in ("store", "mlflow.db", "mlartifacts"):
        source = registered / name
        if source.is_dir():
            shutil.copytree(source, tmp_path / name, symlinks=True)
        elif source.exists():
            shutil.copy2(source, tmp_path / name)
    raw = tiny_pipeline_raw(tmp_path, tiny_teacher, prompts_jsonl)
    raw["publish"] = {
        "repo_id": REPO,
        "endpoint": hub.url,
        "retry_backoff_s": 0.01,
        "round_trip_prompts": 2,
        "teacher_name": "alice/tiny-teacher",
        "dataset_names": ["alice/tiny-prompts"],
    }
    path = tmp_path / "publish.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def publish_then_terminate(config_path: Path, hold, log_path: Path) -> int:
    """Run `stillhouse run` in a child (its own session, the test session's Prefect API); SIGTERM its process group
    once the hub holds its request; returns its exit code."""
    from prefect.settings import PREFECT_API_URL

    env = {
        **os.environ,
        "HF_TOKEN": TOKEN,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HOME": str(config_path.parent / "child-hf-home"),
        "OMP_NUM_THREADS": "1",
        "PREFECT_API_URL": PREFECT_API_URL.value(),
    }
    with open(log_path, "w") as log:
        child = subprocess.Popen(
            [sys.executable, "-m", "stillhouse.flows.cli", "run", str(config_path)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 300
            while not hold.wait_for_request(0.2):
                assert child.poll() is None and time.monotonic() < deadline, (
                    f"the child never got there:\n{log_path.read_text()[-3000:]}"
                )
            os.killpg(child.pid, signal.SIGTERM)
            # The held request, and any retry of it, is dropped unapplied: a thread of the child that waits on the
            # Hub (the round trip downloads in a thread pool) ends instead of keeping the terminated process alive.
            hold.release()
            return child.wait(timeout=180)
        finally:
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()


@pytest.mark.parametrize(
    "stop_at, method, path",
    [
        ("after the commit, before the tag", "POST", r"^/api/models/alice/tiny-student/tag/"),
        ("after the tag, in the round trip", "GET|HEAD", r"/resolve/[0-9a-f]{40}/config\.json$"),
    ],
    ids=["before-tag", "after-tag"],
)
def test_a_publish_terminated_after_its_push_completes_on_rerun_without_a_second_commit(
    config_path, hub, monkeypatch, capsys, stop_at, method, path
):
    hold = hub.hold(method, path)
    try:
        exit_code = publish_then_terminate(config_path, hold, config_path.parent / "child.log")
    finally:
        hub.unhold(hold)
    assert exit_code != 0, "the child was terminated"
    publish_commits = [c for c in hub.commits(REPO) if c["message"] != "initial commit"]
    assert len(publish_commits) == 1, f"the push landed before the SIGTERM ({stop_at})"
    (landed,) = publish_commits
    api = HfApi(endpoint=hub.url, token=TOKEN)
    tags_before = {t.name: t.target_commit for t in api.list_repo_refs(REPO).tags}
    assert tags_before == ({} if "before the tag" in stop_at else {"v1": landed["sha"]})
    store = config_path.parent / "store"
    assert not list(store.glob(f"publish/*/{MANIFEST}")), "the publish stage was not sealed"

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert main(["run", str(config_path)]) == 0, capsys.readouterr().err[-3000:]
    out = capsys.readouterr().out
    assert [c["sha"] for c in hub.commits(REPO) if c["message"] != "initial commit"] == [landed["sha"]]
    assert {t.name: t.target_commit for t in api.list_repo_refs(REPO).tags} == {"v1": landed["sha"]}
    (sealed,) = store.glob(f"publish/*/{MANIFEST}")
    assert json.loads(sealed.read_text())["commit_oid"] == landed["sha"]
    assert f"commit {landed['sha']}" in out

    # Once more: everything reused, nothing pushed.
    requests = len(hub.requests)
    assert main(["run", str(config_path)]) == 0
    assert len(hub.commits(REPO)) == 2
    assert not any(r.method == "POST" for r in hub.requests[requests:])
