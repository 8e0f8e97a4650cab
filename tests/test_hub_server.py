"""The loopback Hub against the real huggingface_hub client (2.4.0): upload, download, tags, auth.

.venv/bin/python -m pytest tests/test_hub_server.py -q
"""

import os

# Must be set before huggingface_hub is imported: with xet on, LFS uploads go to a xet storage
# service the loopback Hub does not offer. (The fixture below also patches the constant, in case
# another test module imported the client first.)
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

import hashlib
import http.client
import json

import httpx2
import pytest
from hub_server import LoopbackHub
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, constants
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

TOKEN = "hf_test_token"
REPO_ID = "alice/tiny-student"
README = """---
license: apache-2.0
tags:
- distillation
- stillhouse
---
# tiny-student

A 2-layer student distilled for the loopback Hub tests.
"""


@pytest.fixture(autouse=True)
def isolated_hf_home(tmp_path, monkeypatch):
    """No test reads or writes the real ~/.cache/huggingface, a stored token, or the network."""
    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    # huggingface_hub reads these at import time; the client looks them up on `constants` per call.
    for name, value in {
        "HF_HOME": home,
        "HF_HUB_CACHE": home / "hub",
        "HF_ASSETS_CACHE": home / "assets",
        "HF_XET_CACHE": home / "xet",
        "HF_TOKEN_PATH": home / "token",
        "HF_STORED_TOKENS_PATH": home / "stored_tokens",
    }.items():
        monkeypatch.setattr(constants, name, str(value))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def hub():
    with LoopbackHub(tokens={TOKEN: "alice", "hf_bob_token": "bob"}) as hub:
        yield hub
        assert hub.server_errors == []


@pytest.fixture
def api(hub):
    return HfApi(endpoint=hub.url, token=TOKEN)


@pytest.fixture
def model_folder(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "README.md").write_text(README)
    (folder / "config.json").write_text('{"n_layer": 2, "n_embd": 32}\n')
    # ~2 MB of incompressible bytes: small, but sent through LFS like any .safetensors file.
    (folder / "model.safetensors").write_bytes(hashlib.shake_256(b"stillhouse").digest(2_000_000))
    return folder


def read_folder(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_upload_folder_in_one_commit_and_download_it_back(hub, api, model_folder, tmp_path):
    api.create_repo(REPO_ID)
    commits_before = hub.commits(REPO_ID)

    info = api.upload_folder(repo_id=REPO_ID, folder_path=model_folder, commit_message="Publish tiny student")

    commits = hub.commits(REPO_ID)
    assert len(commits) == len(commits_before) + 1
    assert commits[0]["sha"] == info.oid and commits[0]["message"] == "Publish tiny student"
    uploaded = read_folder(model_folder)
    assert hub.files(REPO_ID) == uploaded
    # The weights went through LFS (batch, PUT, verify), the small files inline in the commit.
    weights_oid = hashlib.sha256(uploaded["model.safetensors"]).hexdigest()
    assert hub.lfs_objects[weights_oid] == uploaded["model.safetensors"]
    methods = [(r.method, r.path) for r in hub.requests]
    assert ("POST", f"/{REPO_ID}.git/info/lfs/objects/batch") in methods
    assert ("PUT", f"/_lfs/{weights_oid}/upload/") in [(m, p[: p.rfind("/") + 1]) for m, p in methods]
    assert all(r.token == TOKEN for r in hub.requests if r.path.startswith("/api/"))

    local_dir = api.snapshot_download(REPO_ID, local_dir=tmp_path / "download", cache_dir=tmp_path / "cache")
    assert read_folder(tmp_path / "download") == uploaded
    assert os.path.samefile(local_dir, tmp_path / "download")

    model = api.model_info(REPO_ID)
    assert model.sha == info.oid
    assert model.private is False
    assert model.card_data.license == "apache-2.0"
    assert model.card_data.tags == ["distillation", "stillhouse"]
    assert {s.rfilename for s in model.siblings} == set(uploaded)
    siblings = {s.rfilename: s for s in api.model_info(REPO_ID, files_metadata=True).siblings}
    weights = siblings["model.safetensors"]
    assert weights.lfs.sha256 == weights_oid and weights.size == len(uploaded["model.safetensors"])

    cached = api.hf_hub_download(REPO_ID, "config.json", cache_dir=tmp_path / "cache")
    with open(cached, "rb") as file:
        assert file.read() == uploaded["config.json"]


def test_uploading_the_same_folder_again_is_harmless(hub, api, model_folder):
    api.create_repo(REPO_ID)
    first = api.upload_folder(repo_id=REPO_ID, folder_path=model_folder)

    assert api.create_repo(REPO_ID, exist_ok=True) == f"{hub.url}/{REPO_ID}"
    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_repo(REPO_ID)
    assert conflict.value.response.status_code == 409
    second = api.upload_folder(repo_id=REPO_ID, folder_path=model_folder)

    # preupload reports the stored oids, so the client sees nothing changed and makes no commit.
    assert second.oid == first.oid
    assert len(hub.commits(REPO_ID)) == 2  # the repo's initial commit + the upload
    assert hub.files(REPO_ID) == read_folder(model_folder)


def test_a_bad_token_is_refused_and_changes_nothing(hub, api, model_folder):
    intruder = HfApi(endpoint=hub.url, token="hf_not_a_real_token")
    with pytest.raises(HfHubHTTPError) as refused:
        intruder.create_repo(REPO_ID, exist_ok=True)
    assert refused.value.response.status_code == 401
    assert refused.value.response.headers["X-Error-Message"] == "Invalid credentials in Authorization header"
    assert hub.repos == {}

    api.create_repo(REPO_ID)
    with pytest.raises(HfHubHTTPError):
        intruder.upload_folder(repo_id=REPO_ID, folder_path=model_folder)
    assert hub.files(REPO_ID) == {} and len(hub.commits(REPO_ID)) == 1
    assert hub.lfs_objects == {}

    # Another valid user may read alice's public repo but not write to it.
    with pytest.raises(HfHubHTTPError) as forbidden:
        HfApi(endpoint=hub.url, token="hf_bob_token").upload_folder(repo_id=REPO_ID, folder_path=model_folder)
    assert forbidden.value.response.status_code == 403
    assert api.whoami()["name"] == "alice"


def test_a_private_repo_is_visible_only_to_its_owner(hub, api, model_folder, tmp_path):
    api.create_repo(REPO_ID, private=True)
    api.upload_folder(repo_id=REPO_ID, folder_path=model_folder)
    assert api.model_info(REPO_ID).private is True

    anonymous = HfApi(endpoint=hub.url, token=False)
    with pytest.raises(RepositoryNotFoundError):
        anonymous.model_info(REPO_ID)
    with pytest.raises(RepositoryNotFoundError):
        anonymous.hf_hub_download(REPO_ID, "config.json", cache_dir=tmp_path / "cache")
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.url, token="hf_bob_token").model_info(REPO_ID)


def test_a_tag_pins_a_revision(hub, api, model_folder, tmp_path):
    api.create_repo(REPO_ID)
    v1 = api.upload_folder(repo_id=REPO_ID, folder_path=model_folder)
    api.create_tag(REPO_ID, tag="v1.0", tag_message="first student")
    (model_folder / "config.json").write_text('{"n_layer": 4}\n')
    v2 = api.upload_folder(repo_id=REPO_ID, folder_path=model_folder)

    refs = api.list_repo_refs(REPO_ID)
    assert [(t.name, t.ref, t.target_commit) for t in refs.tags] == [("v1.0", "refs/tags/v1.0", v1.oid)]
    assert [(b.name, b.target_commit) for b in refs.branches] == [("main", v2.oid)]
    with pytest.raises(HfHubHTTPError) as exists:
        api.create_tag(REPO_ID, tag="v1.0")
    assert exists.value.response.status_code == 409

    old = api.snapshot_download(REPO_ID, revision="v1.0", cache_dir=tmp_path / "cache")
    with open(os.path.join(old, "config.json")) as file:
        assert file.read() == '{"n_layer": 2, "n_embd": 32}\n'
    new = api.hf_hub_download(REPO_ID, "config.json", cache_dir=tmp_path / "cache")
    with open(new) as file:
        assert file.read() == '{"n_layer": 4}\n'
    assert [c.commit_id for c in api.list_repo_commits(REPO_ID)][:2] == [v2.oid, v1.oid]


def test_missing_things_raise_the_clients_own_errors(hub, api, tmp_path):
    api.create_repo(REPO_ID)
    api.upload_file(path_or_fileobj=b"hello\n", path_in_repo="docs/notes.txt", repo_id=REPO_ID)
    with pytest.raises(EntryNotFoundError):
        api.hf_hub_download(REPO_ID, "nope.txt", cache_dir=tmp_path / "cache")
    with pytest.raises(RevisionNotFoundError):
        api.model_info(REPO_ID, revision="no-such-branch")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("alice/never-created")
    assert [f.path for f in api.list_repo_tree(REPO_ID, recursive=True)] == ["docs", "docs/notes.txt"]
    assert [f.path for f in api.get_paths_info(REPO_ID, ["docs/notes.txt", "missing"])] == ["docs/notes.txt"]


def test_a_failing_commit_changes_nothing(hub, api):
    api.create_repo(REPO_ID)
    api.upload_file(path_or_fileobj=b"v1\n", path_in_repo="notes.txt", repo_id=REPO_ID)
    with pytest.raises(EntryNotFoundError):
        api.create_commit(
            REPO_ID,
            operations=[
                CommitOperationAdd(path_in_repo="notes.txt", path_or_fileobj=b"v2\n"),
                CommitOperationDelete(path_in_repo="not-there.txt"),
            ],
            commit_message="half a commit",
        )
    assert hub.files(REPO_ID) == {"notes.txt": b"v1\n"}
    assert len(hub.commits(REPO_ID)) == 2

    api.delete_repo(REPO_ID)
    assert hub.repos == {}


def test_chunked_bodies_and_keep_alive_after_errors(hub):
    """Error answers still consume the request body, so the next request on the connection works."""
    connection = http.client.HTTPConnection("127.0.0.1", int(hub.url.rsplit(":", 1)[1]), timeout=10)
    bad_token = {"Authorization": "Bearer hf_not_a_real_token", "Content-Type": "application/json"}
    connection.request("POST", "/api/repos/create", body=b'{"name": "x", "organization": null}', headers=bad_token)
    refused = connection.getresponse()
    assert refused.status == 401
    assert refused.getheader("X-Error-Message") == "Invalid credentials in Authorization header"
    refused.read()

    readme = json.dumps({"content": README, "repoType": "model"}).encode()
    connection.request(
        "POST",
        "/api/validate-yaml",
        body=iter([readme[:10], readme[10:]]),
        encode_chunked=True,
        headers={"Content-Type": "application/json"},
    )
    validated = connection.getresponse()
    assert (validated.status, json.loads(validated.read())) == (200, {"errors": [], "warnings": []})
    connection.close()


def test_injected_faults_hit_only_matching_requests_and_only_so_often(hub, api, model_folder):
    api.create_repo(REPO_ID)
    hub.inject("POST", r"/commit/", status=503, times=2)
    with pytest.raises(HfHubHTTPError) as first:
        api.upload_file(path_or_fileobj=b"a\n", path_in_repo="a.txt", repo_id=REPO_ID)
    assert first.value.response.status_code == 503
    assert api.model_info(REPO_ID).sha == hub.commits(REPO_ID)[0]["sha"]  # other requests are untouched
    with pytest.raises(HfHubHTTPError):
        api.upload_file(path_or_fileobj=b"a\n", path_in_repo="a.txt", repo_id=REPO_ID)
    api.upload_file(
        path_or_fileobj=b"a\n", path_in_repo="a.txt", repo_id=REPO_ID
    )  # the third try: the fault is used up
    assert hub.files(REPO_ID) == {"a.txt": b"a\n"} and len(hub.commits(REPO_ID)) == 2

    hub.inject("POST", r"/commit/", drop=True, after_handling=True)
    with pytest.raises(httpx2.RemoteProtocolError):  # the answer is lost ...
        api.create_commit(
            REPO_ID,
            operations=[CommitOperationAdd(path_in_repo="b.txt", path_or_fileobj=b"b\n")],
            commit_message="lost answer",
        )
    assert hub.files(REPO_ID)["b.txt"] == b"b\n"  # ... but the commit was applied
    with pytest.raises(ValueError):
        hub.inject("GET", "x")
