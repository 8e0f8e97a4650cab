"""An in-process loopback stand-in for the Hugging Face Hub, for tests that publish models.

A test double for the Hub's *private* HTTP API, pinned to what the unmodified `huggingface_hub`
2.4.0 client sends (measured against that client: hf_xet off, plain LFS): enough to create a repo, upload a
folder in one commit (small files inline, weights through Git LFS "basic" transfers), read it back
(model_info, list_repo_tree, hf_hub_download, snapshot_download), tag it and list refs and commits.
State lives in memory. The endpoints are private API and change between client versions: when a
newer client breaks the tests, measure it again rather than loosening the server.

Faults for tests of retries and atomicity: ``hub.inject("POST", r"/commit/", status=503)`` answers the
next matching request with an error; ``drop=True`` closes the connection halfway through the
request body, and ``after_handling=True`` applies the request and then drops the answer.
``hub.hold("POST", r"/tag/")`` keeps matching requests waiting, unanswered, until the test releases
them (``hold.release()``: they and any later match are dropped, never applied, until
``hub.unhold(hold)``), so a test can stop a client at an exact point, e.g. to kill it between a commit
and its tag.

Set HF_HUB_DISABLE_XET=1 before importing huggingface_hub, or the client sends LFS files to a xet
storage service this server does not offer. Downloads need nothing: the server never sends
X-Xet-Hash, so the client downloads over plain HTTP.

    with LoopbackHub(tokens={"hf_test_token": "alice"}) as hub:
        api = HfApi(endpoint=hub.url, token="hf_test_token")
        api.create_repo("alice/tiny")
        api.upload_folder(repo_id="alice/tiny", folder_path=out_dir)
        assert hub.files("alice/tiny")["config.json"] == b"..."
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import itertools
import json
import re
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import NamedTuple
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
# The real Hub picks LFS from .gitattributes and content sniffing; these rules cover our uploads.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".onnx", ".msgpack", ".h5", ".zip")
LFS_MIN_SIZE = 10 * 1024 * 1024
INVALID_TOKEN = "Invalid credentials in Authorization header"  # the client matches this exact text
NO_TOKEN = "You must be authenticated to do this: send Authorization: Bearer <token>"

# Routes match the raw path: revisions arrive quoted with safe="" (a "/" in a branch name is %2F).
API_ROUTE = re.compile(
    r"^/api/(models|datasets|spaces)/([^/]+)/([^/]+)"
    r"(?:/(revision|preupload|commit|tree|paths-info|refs|commits|tag|branch)(?:/([^/]+))?(?:/(.+))?)?$"
)
FILE_ROUTE = re.compile(
    r"^/(?:(datasets|spaces)/)?([^/]+)/([^/]+?)(?:\.git/info/lfs/objects/batch|/resolve/([^/]+)/(.+))$"
)
LFS_TRANSFER_ROUTE = re.compile(r"^/_lfs/([0-9a-f]{64})/(upload/[\w-]+|verify)$")
_commit_counter = itertools.count()


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob: the Hub's oid and ETag of a regular file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(data: bytes) -> bytes:
    oid = hashlib.sha256(data).hexdigest()
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {len(data)}\n".encode()


def front_matter(readme: str) -> dict | None:
    """The YAML block between a README's leading '---' lines: what the Hub serves as cardData."""
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", readme, re.DOTALL)
    data = yaml.safe_load(match.group(1)) if match else None
    return data if isinstance(data, dict) else None


def iso(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(timestamp))


def _json(payload, status: int = 200) -> tuple[int, dict, bytes]:
    return status, {"Content-Type": "application/json"}, json.dumps(payload, default=str).encode()


class HubError(Exception):
    """An error answer: status, message, and the X-Error-Code the client maps to its exceptions."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


@dataclass
class Fault:
    """A failure the hub injects into matching requests: an error status, or a dropped connection.

    ``drop`` closes the connection without an answer, halfway through reading the request body
    (like a proxy or network failure mid-upload); with ``after_handling`` the request is applied
    first and only the answer is lost (the case a retried commit must not apply twice).
    """

    method: str
    path: re.Pattern
    status: int | None = None
    drop: bool = False
    after_handling: bool = False
    times: int = 1
    hits: int = 0


@dataclass
class Hold:
    """Requests matching one of ``methods`` and ``path`` wait, unanswered, until `release`; then they, and every
    later match until `LoopbackHub.unhold`, are dropped unapplied."""

    methods: frozenset[str]
    path: re.Pattern
    released: threading.Event = field(default_factory=threading.Event)
    arrived: threading.Event = field(default_factory=threading.Event)
    held: int = 0

    def wait_for_request(self, timeout_s: float) -> bool:
        """Whether a matching request has arrived (and is being held) within ``timeout_s``."""
        return self.arrived.wait(timeout_s)

    def release(self) -> None:
        self.released.set()


class LoggedRequest(NamedTuple):
    method: str
    path: str  # raw (still URL-quoted) path, without the query string
    token: str | None  # the bearer token sent, if any
    status: int


@dataclass
class Commit:
    sha: str
    parent: str | None
    message: str
    files: dict[str, bytes]  # the full tree at this commit: path -> content
    lfs_paths: frozenset[str]  # paths whose content was committed through LFS
    date: float = field(default_factory=time.time)


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    created: float = field(default_factory=time.time)
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit:
        sha = self.branches.get(revision) or self.tags.get(revision) or revision
        if sha not in self.commits:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return self.commits[sha]

    def add_commit(self, branch: str, message: str, files: dict[str, bytes], lfs_paths) -> Commit:
        parent = self.branches.get(branch)
        seed = json.dumps([self.repo_id, parent, message, sorted(files), next(_commit_counter), time.time()])
        commit = Commit(hashlib.sha1(seed.encode()).hexdigest(), parent, message, files, frozenset(lfs_paths))
        self.commits[commit.sha] = commit
        self.branches[branch] = commit.sha
        return commit

    def history(self, revision: str) -> list[Commit]:
        commit, history = self.resolve(revision), []
        while commit is not None:
            history.append(commit)
            commit = self.commits.get(commit.parent) if commit.parent else None
        return history


class LoopbackHub:
    """A Hub on 127.0.0.1 at a free port, served from a background thread; a context manager.

    Args:
        tokens: bearer token -> user name. A user may write to the namespace of the same name.
        orgs: organisation -> member user names; members may write to the organisation's namespace.
    """

    def __init__(self, tokens: dict[str, str] | None = None, orgs: dict[str, list[str]] | None = None):
        self.tokens = dict(tokens or {})
        self.orgs = {org: set(members) for org, members in (orgs or {}).items()}
        self.repos: dict[tuple[str, str], Repo] = {}  # (repo type, "namespace/name") -> Repo
        self.lfs_objects: dict[str, bytes] = {}  # sha256 oid -> content
        self.requests: list[LoggedRequest] = []
        self.server_errors: list[str] = []  # bugs in this server (answered with a 500)
        self.faults: list[Fault] = []
        self.holds: list[Hold] = []
        self.url = ""
        self._upload_tickets: dict[str, str] = {}  # one-time LFS upload ticket -> oid
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> LoopbackHub:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.hub = self  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        serve = {"target": self._server.serve_forever, "kwargs": {"poll_interval": 0.05}}
        self._thread = threading.Thread(**serve, name="loopback-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        for hold in self.holds:  # held requests end (dropped) before the server waits for its threads
            hold.release()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()
            self._server = self._thread = None

    def __enter__(self) -> LoopbackHub:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # -- for tests to break ---------------------------------------------------------------------
    def inject(
        self,
        method: str,
        path_regex: str,
        *,
        status: int | None = None,
        drop: bool = False,
        after_handling: bool = False,
        times: int = 1,
    ) -> Fault:
        """Make the next ``times`` requests matching ``method`` and the raw path regex fail (see `Fault`).

        hub.inject("POST", r"/commit/", status=503)            # one transient error on the next commit
        hub.inject("PUT", r"^/_lfs/", drop=True)               # a connection dropped during an LFS upload
        """
        if (status is None) == (not drop):
            raise ValueError("give either status= or drop=True")
        fault = Fault(method.upper(), re.compile(path_regex), status, drop, after_handling, times)
        with self._lock:
            self.faults.append(fault)
        return fault

    def hold(self, method: str, path_regex: str) -> Hold:
        """Keep every request matching ``method`` (``"GET|HEAD"`` for either) and the raw path regex waiting until
        ``hold.release()``, which drops them unapplied (the client sees a dropped connection, if it is still there).

        hold = hub.hold("POST", r"/tag/")      # a push stops after its commit, before its tag
        assert hold.wait_for_request(60)
        """
        hold = Hold(frozenset(method.upper().split("|")), re.compile(path_regex))
        with self._lock:
            self.holds.append(hold)
        return hold

    def unhold(self, hold: Hold) -> None:
        """Stop holding or dropping what ``hold`` matches (its held requests are dropped first)."""
        hold.release()
        with self._lock:
            self.holds.remove(hold)

    def _take_hold(self, method: str, path: str) -> Hold | None:
        with self._lock:
            for hold in self.holds:
                if method in hold.methods and hold.path.search(path):
                    hold.held += 1
                    hold.arrived.set()
                    return hold
        return None

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.hits < fault.times and fault.method == method and fault.path.search(path):
                    fault.hits += 1
                    return fault
        return None

    # -- for tests to inspect ------------------------------------------------------------------
    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        with self._lock:
            return dict(self.repos[(repo_type, repo_id)].resolve(revision).files)

    def commits(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> list[dict]:
        """The history of `revision`, newest first; the oldest is the repo's empty initial commit."""
        with self._lock:
            history = self.repos[(repo_type, repo_id)].history(revision)
            return [{"sha": c.sha, "parent": c.parent, "message": c.message, "files": sorted(c.files)} for c in history]

    # -- access control ------------------------------------------------------------------------
    def _user(self, token: str | None) -> str | None:
        if token is not None and token not in self.tokens:
            raise HubError(401, INVALID_TOKEN)  # like the Hub: an unknown token fails every request
        return self.tokens.get(token) if token else None

    def _may_write(self, user: str | None, namespace: str) -> bool:
        return user is not None and (user == namespace or user in self.orgs.get(namespace, ()))

    def _repo(self, repo_type: str, repo_id: str, user: str | None, write: bool = False) -> Repo:
        if write and user is None:
            raise HubError(401, NO_TOKEN)
        repo, namespace = self.repos.get((repo_type, repo_id)), repo_id.split("/")[0]
        if repo is None or (repo.private and not self._may_write(user, namespace)):
            raise HubError(404, "Repository not found", "RepoNotFound")
        if write and not self._may_write(user, namespace):
            raise HubError(403, f"{user} may not write to {repo_id}")
        return repo

    def _repo_url(self, repo: Repo) -> str:
        return f"{self.url}/{URL_PREFIX[repo.repo_type]}{repo.repo_id}"

    # -- routing -------------------------------------------------------------------------------
    def handle(self, method: str, path: str, query: dict, body: bytes, token: str | None) -> tuple:
        """Answer one request with (status, headers, body); errors are raised as HubError."""
        user = self._user(token)
        if match := LFS_TRANSFER_ROUTE.match(path):
            return self._lfs_transfer(method, match.group(1), match.group(2), body)
        if (method, path) == ("GET", "/api/whoami-v2"):
            if user is None:
                raise HubError(401, NO_TOKEN)
            orgs = [{"name": org, "type": "org"} for org, members in self.orgs.items() if user in members]
            return _json({"type": "user", "name": user, "fullname": user, "orgs": orgs})
        if (method, path) == ("POST", "/api/validate-yaml"):
            try:
                front_matter(json.loads(body)["content"])
            except yaml.YAMLError as error:
                return _json({"errors": [{"message": str(error)}], "warnings": []}, status=400)
            return _json({"errors": [], "warnings": []})
        if (method, path) in (("POST", "/api/repos/create"), ("DELETE", "/api/repos/delete")):
            return self._create_or_delete_repo(method == "POST", json.loads(body), user)
        if match := API_ROUTE.match(path):
            repo_type, repo_id = match.group(1)[:-1], f"{unquote(match.group(2))}/{unquote(match.group(3))}"
            action, revision, rest = match.group(4), unquote(match.group(5) or "main"), unquote(match.group(6) or "")
            return self._repo_api(method, repo_type, repo_id, action, revision, rest, query, body, user)
        if match := FILE_ROUTE.match(path):
            repo_type = {"datasets": "dataset", "spaces": "space"}.get(match.group(1), "model")
            repo_id = f"{unquote(match.group(2))}/{unquote(match.group(3))}"
            if match.group(4) is None and method == "POST":
                return self._lfs_batch(self._repo(repo_type, repo_id, user, write=True), json.loads(body))
            if match.group(4) is not None and method in ("GET", "HEAD"):
                repo, revision, filename = self._repo(repo_type, repo_id, user), match.group(4), match.group(5)
                return self._resolve(repo.resolve(unquote(revision)), unquote(filename))
        raise HubError(404, f"LoopbackHub does not implement {method} {path}")

    def _repo_api(self, method, repo_type, repo_id, action, revision, rest, query, body, user) -> tuple:
        write = method == "POST" and action in ("preupload", "commit", "tag", "branch")
        repo = self._repo(repo_type, repo_id, user, write=write)
        if method == "GET" and action in (None, "revision"):
            return self._repo_info(repo, repo.resolve(revision))
        if method == "GET" and action == "tree":
            recursive = query.get("recursive", "").lower() == "true"
            return _json(self._tree(repo.resolve(revision), rest.strip("/"), recursive))
        if method == "POST" and action == "paths-info":  # the client sends a form, paths=a&paths=b
            form = json.loads(body) if body.startswith(b"{") else parse_qs(body.decode())
            wanted = {p.strip("/") for p in ([form["paths"]] if isinstance(form["paths"], str) else form["paths"])}
            return _json([e for e in self._tree(repo.resolve(revision), "", True) if e["path"] in wanted])
        if method == "GET" and action == "refs":

            def refs(kind: str, names: dict) -> list[dict]:
                return [{"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": sha} for n, sha in sorted(names.items())]

            return _json(
                {
                    "branches": refs("heads", repo.branches),
                    "tags": refs("tags", repo.tags),
                    "converts": [],
                    "pullRequests": [],
                }
            )
        if method == "GET" and action == "commits":
            author = [{"user": repo_id.split("/")[0]}]
            return _json(
                [
                    {
                        "id": c.sha,
                        "title": c.message.split("\n")[0],
                        "message": c.message,
                        "date": iso(c.date),
                        "authors": author,
                    }
                    for c in repo.history(revision)
                ]
            )
        if method == "POST" and action in ("tag", "branch"):
            payload = json.loads(body or b"{}")
            refs, name = (repo.tags, payload["tag"]) if action == "tag" else (repo.branches, revision)
            start = repo.resolve(revision if action == "tag" else payload.get("startingPoint") or "main")
            if name in refs:
                raise HubError(409, f"{action} {name} already exists")
            refs[name] = start.sha
            return _json({})
        if method == "POST" and action == "preupload":
            return self._preupload(repo, revision, json.loads(body))
        if method == "POST" and action == "commit":
            if query.get("create_pr"):
                raise HubError(400, "LoopbackHub does not support pull requests (create_pr)")
            return self._commit(repo, revision, body)
        raise HubError(404, f"LoopbackHub does not implement {method} /api/{repo_type}s/{repo_id}/{action}")

    # -- endpoints -----------------------------------------------------------------------------
    def _create_or_delete_repo(self, create: bool, payload: dict, user: str | None) -> tuple:
        if user is None:
            raise HubError(401, NO_TOKEN)
        namespace = payload.get("organization") or user
        repo_type, repo_id = payload.get("type") or "model", f"{namespace}/{payload['name']}"
        if not self._may_write(user, namespace):
            raise HubError(403, f"{user} may not create or delete repos in {namespace}")
        if not create:
            self._repo(repo_type, repo_id, user, write=True)
            del self.repos[(repo_type, repo_id)]
            return _json({})
        if (repo_type, repo_id) in self.repos:  # the client reads "url" from the 409 with exist_ok=True
            url = self._repo_url(self.repos[(repo_type, repo_id)])
            return _json({"error": f"You already created this {repo_type} repo", "url": url}, status=409)
        # huggingface_hub 2.x sends "visibility"; older clients sent "private".
        private = payload.get("visibility", "private" if payload.get("private") else "public") != "public"
        repo = self.repos[(repo_type, repo_id)] = Repo(repo_type, repo_id, private)
        repo.add_commit("main", "initial commit", {}, ())
        return _json({"url": self._repo_url(repo), "name": repo_id})

    def _repo_info(self, repo: Repo, commit: Commit) -> tuple:
        readme = commit.files.get("README.md")
        card = front_matter(readme.decode(errors="replace")) if readme is not None else None
        tags = list((card or {}).get("tags") or [])
        if card and card.get("license"):
            tags.append(f"license:{card['license']}")
        siblings = []
        for entry in self._tree(commit, "", recursive=True):
            if entry["type"] == "file":
                sibling = {"rfilename": entry["path"], "size": entry["size"], "blobId": entry["oid"]}
                if lfs := entry.get("lfs"):
                    sibling["lfs"] = {"sha256": lfs["oid"], "size": lfs["size"], "pointerSize": lfs["pointerSize"]}
                siblings.append(sibling)
        return _json(
            {
                "_id": repo.repo_id,
                "id": repo.repo_id,
                "author": repo.repo_id.split("/")[0],
                "sha": commit.sha,
                "private": repo.private,
                "gated": False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "createdAt": iso(repo.created),
                "lastModified": iso(commit.date),
                "tags": tags,
                "cardData": card,
                "siblings": siblings,
            }
        )

    def _tree(self, commit: Commit, folder: str, recursive: bool) -> list[dict]:
        prefix = f"{folder}/" if folder else ""
        under = {path: data for path, data in commit.files.items() if path.startswith(prefix)}
        if folder and not under:
            raise HubError(404, f"{folder} not found", "EntryNotFound", {"X-Repo-Commit": commit.sha})
        entries: dict[str, dict] = {}
        for path, data in under.items():
            parts = path[len(prefix) :].split("/")
            for depth in range(1, len(parts) if recursive else min(2, len(parts))):
                directory = prefix + "/".join(parts[:depth])
                directory_oid = hashlib.sha1(directory.encode()).hexdigest()  # not a real tree hash
                entries[directory] = {"type": "directory", "oid": directory_oid, "size": 0, "path": directory}
            if len(parts) > 1 and not recursive:
                continue
            entries[path] = {"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": path}
            if path in commit.lfs_paths:  # git stores the pointer; the oid is the pointer's blob id
                pointer = lfs_pointer(data)
                entries[path]["oid"] = git_blob_sha1(pointer)
                entries[path]["lfs"] = {
                    "oid": hashlib.sha256(data).hexdigest(),
                    "size": len(data),
                    "pointerSize": len(pointer),
                }
        return [entries[path] for path in sorted(entries)]

    def _resolve(self, commit: Commit, path: str) -> tuple:
        if path not in commit.files:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit.sha})
        data = commit.files[path]
        headers = {"X-Repo-Commit": commit.sha, "Content-Type": "application/octet-stream"}
        if path in commit.lfs_paths:  # for LFS files the client keys its cache on the sha256
            oid = hashlib.sha256(data).hexdigest()
            headers.update({"ETag": f'"{oid}"', "X-Linked-Etag": f'"{oid}"', "X-Linked-Size": str(len(data))})
        else:
            headers["ETag"] = f'"{git_blob_sha1(data)}"'
        return 200, headers, data

    def _preupload(self, repo: Repo, revision: str, payload: dict) -> tuple:
        if revision not in repo.branches:
            raise HubError(404, f"Invalid rev id: {revision} (uploads go to branches)", "RevisionNotFound")
        head, answers = repo.resolve(revision), []
        for entry in payload["files"]:
            path, sample = entry["path"], base64.b64decode(entry.get("sample", ""))
            lfs = entry["size"] >= LFS_MIN_SIZE or path.endswith(LFS_SUFFIXES) or b"\0" in sample
            answer = {"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False}
            if path in head.files and (path in head.lfs_paths) == lfs:  # lets the client skip unchanged files
                data = head.files[path]
                answer["oid"] = hashlib.sha256(data).hexdigest() if lfs else git_blob_sha1(data)
            answers.append(answer)
        return _json({"files": answers})

    def _lfs_batch(self, repo: Repo, payload: dict) -> tuple:
        if payload.get("operation") != "upload":
            raise HubError(400, "LoopbackHub's LFS batch endpoint only supports uploads")
        objects = []
        for obj in payload["objects"]:
            oid, size = obj["oid"], obj["size"]
            if oid in self.lfs_objects and len(self.lfs_objects[oid]) == size:
                objects.append({"oid": oid, "size": size})  # stored already: no actions, the client skips it
                continue
            ticket = secrets.token_urlsafe(16)
            self._upload_tickets[ticket] = oid
            actions = {
                "upload": {"href": f"{self.url}/_lfs/{oid}/upload/{ticket}"},
                "verify": {"href": f"{self.url}/_lfs/{oid}/verify"},
            }
            objects.append({"oid": oid, "size": size, "authenticated": True, "actions": actions})
        body = json.dumps({"transfer": "basic", "objects": objects}).encode()
        return 200, {"Content-Type": "application/vnd.git-lfs+json"}, body

    def _lfs_transfer(self, method: str, oid: str, action: str, body: bytes) -> tuple:
        # The upload href plays a presigned storage URL: the client PUTs to it without a token.
        if method == "PUT" and action.startswith("upload/"):
            if self._upload_tickets.pop(action.removeprefix("upload/"), None) != oid:
                raise HubError(403, "Unknown or already used LFS upload ticket")
            if hashlib.sha256(body).hexdigest() != oid:
                raise HubError(400, f"Uploaded content does not match sha256 {oid}")
            self.lfs_objects[oid] = body
            return 200, {}, b""
        if method == "POST" and action == "verify":
            if oid not in self.lfs_objects or len(self.lfs_objects[oid]) != json.loads(body)["size"]:
                raise HubError(404, f"LFS object {oid} was not uploaded")
            return _json({"success": True})
        raise HubError(405, f"{method} is not allowed on {action}")

    def _commit(self, repo: Repo, revision: str, body: bytes) -> tuple:
        if revision not in repo.branches:
            raise HubError(404, f"Invalid rev id: {revision} (commits go to branches)", "RevisionNotFound")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The first line of a commit must be its header")
        header, head = lines[0]["value"], repo.resolve(revision)
        if header.get("parentCommit") and header["parentCommit"] != head.sha:
            raise HubError(412, f"{revision} has moved on from {header['parentCommit']} to {head.sha}")
        # Work on copies so that a bad operation leaves the repo untouched: all of a commit or none.
        files, lfs_paths = dict(head.files), set(head.lfs_paths)
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            path = value["path"].strip("/")
            if key == "file":
                content = value["content"]
                files[path] = base64.b64decode(content) if value.get("encoding") == "base64" else content.encode()
                lfs_paths.discard(path)
            elif key == "lfsFile":
                if value["oid"] not in self.lfs_objects:
                    raise HubError(400, f"LFS object {value['oid']} for {path} was never uploaded")
                files[path] = self.lfs_objects[value["oid"]]
                lfs_paths.add(path)
            elif key == "deletedFile":
                if files.pop(path, None) is None:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            elif key == "deletedFolder":
                doomed = [p for p in files if p.startswith(path + "/")]
                if not doomed:
                    raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                for p in doomed:
                    del files[p]
            else:
                raise HubError(400, f"LoopbackHub does not support the commit operation {key!r}")
        message = header["summary"] + (f"\n\n{header['description']}" if header.get("description") else "")
        commit = repo.add_commit(revision, message, files, lfs_paths & set(files))
        return _json(
            {
                "commitUrl": f"{self._repo_url(repo)}/commit/{commit.sha}",
                "commitOid": commit.sha,
                "pullRequestUrl": None,
            }
        )


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, which the client's connection pool relies on
    timeout = 30  # seconds before an idle keep-alive connection is closed

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))
        chunks = []
        while (size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)) > 0:
            chunks.append(self.rfile.read(size))
            self.rfile.readline()  # the CRLF after each chunk
        while self.rfile.readline().strip():  # trailers, up to the blank line
            pass
        return b"".join(chunks)

    def _drop_connection(self) -> None:
        """Close the socket without an answer: the client sees a dropped connection."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def _handle(self) -> None:
        hub: LoopbackHub = self.server.hub  # type: ignore[attr-defined]
        url = urlsplit(self.path)
        auth = self.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ").strip() if auth.startswith("Bearer ") else None
        hold = hub._take_hold(self.command, url.path)
        if hold is not None:
            hold.released.wait(timeout=600)
            hub.requests.append(LoggedRequest(self.command, url.path, token, 0))
            self._drop_connection()
            return
        fault = hub._take_fault(self.command, url.path)
        if fault is not None and fault.drop and not fault.after_handling:
            self.rfile.read(
                int(self.headers.get("Content-Length") or 0) // 2
            )  # half the upload arrives, then the line goes dead
            hub.requests.append(LoggedRequest(self.command, url.path, token, 0))
            self._drop_connection()
            return
        body = self._read_body()  # always, errors included, or the connection's next request breaks
        query = {key: values[-1] for key, values in parse_qs(url.query).items()}
        try:
            if fault is not None and fault.status is not None:
                raise HubError(fault.status, f"LoopbackHub injected fault: HTTP {fault.status}")
            with hub._lock:
                status, headers, payload = hub.handle(self.command, url.path, query, body, token)
            if fault is not None and fault.after_handling:  # applied, but the answer is lost
                hub.requests.append(LoggedRequest(self.command, url.path, token, 0))
                self._drop_connection()
                return
        except HubError as error:
            status, headers, payload = _json({"error": error.message}, status=error.status)
            headers.update({"X-Error-Message": error.message, **error.headers})
            if error.code:
                headers["X-Error-Code"] = error.code
        except Exception as error:  # a bug in this server: answer 500 and keep it for the test to see
            hub.server_errors.append(f"{self.command} {self.path}: {error!r}")
            status, headers, payload = _json({"error": repr(error)}, status=500)
        hub.requests.append(LoggedRequest(self.command, url.path, token, status))
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _handle

    def log_message(self, format, *args) -> None:  # keep test output quiet
        pass
