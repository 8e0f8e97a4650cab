"""The Hub transport: the client, the token, the retry policy, the one-commit push, the tag, the download.

The push uses the real ``huggingface_hub`` client: ``create_repo`` with the configured visibility,
then the whole folder as **one commit** (``create_commit``, pinned to the branch head it was
prepared against, so a retried commit can never land twice), then a git tag for the version.
Each of those calls is retried with backoff on 429/5xx answers and dropped connections; nothing
else is retried. The token is read from the environment (``publish.token_env``) and never written
anywhere.

Publishing is idempotent: before committing, the push reads ``stillhouse.json`` at the tag (when it
exists) and at the branch head; when either holds this folder's ``content_sha256`` and exactly this
folder's files (git blob ids and LFS sha256, but for README.md, stillhouse.json and model.sig, which
name the run that pushed them), that commit *is* this publish: an earlier run pushed it and was
stopped before it finished. The push then tags it if needed and returns it, instead of committing
again or failing on the tag.

    revision = push_folder(folder, config, tag="v3")
    snapshot = download_revision(config, revision.repo_id, revision.commit_oid, cache_dir)

What goes into the folder (the card, ``stillhouse.json``) is `stillhouse.registry.card`'s business and
the stage that ties them together is `stillhouse.registry.publish`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import httpx2  # huggingface_hub 2's HTTP client: its TransportError is what a dropped connection raises
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, constants
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RevisionNotFoundError
from huggingface_hub.hf_api import RepoFile
from pydantic import BaseModel

from stillhouse.config import PipelineConfig
from stillhouse.errors import InputError, StillhouseError
from stillhouse.registry.card import PROVENANCE_FILE, RUN_SPECIFIC_FILES
from stillhouse.store import file_sha256

TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
Result = TypeVar("Result")


class HubRevision(BaseModel):
    """What one push left on the Hub: the commit, its tag, and where to see them."""

    repo_id: str
    commit_oid: str
    commit_url: str
    tag: str | None = None
    revision_url: str


# -- the retry policy -------------------------------------------------------------------------------


def hub_failure(error: BaseException | None) -> HfHubHTTPError | httpx2.TransportError | None:
    """The Hub's answer or the network error behind ``error``; the client wraps LFS upload failures in a
    RuntimeError."""
    while error is not None:
        if isinstance(error, (HfHubHTTPError, httpx2.TransportError)):
            return error
        error = error.__cause__
    return None


def is_transient(error: BaseException) -> bool:
    """429 and 5xx answers, timeouts and dropped connections: worth another try. A 4xx is an answer, not a hiccup."""
    failure = hub_failure(error)
    if isinstance(failure, HfHubHTTPError) and failure.response is not None:
        return failure.response.status_code in TRANSIENT_STATUS
    return isinstance(failure, httpx2.TransportError)


def with_retries(
    step: str, call: Callable[[], Result], retries: int, backoff_s: float, log: Callable[[str], None] = print
) -> Result:
    """``call()``, retried up to ``retries`` times on transient errors, waiting backoff_s, 2x, 4x ... Only for
    idempotent steps."""
    for attempt in range(retries + 1):
        try:
            return call()
        except Exception as error:
            if not is_transient(error) or attempt == retries:
                raise
            wait = backoff_s * 2**attempt
            log(f"Hub {step}: {describe_hub_error(error)}; retry {attempt + 1}/{retries} in {wait:.1f}s")
            time.sleep(wait)
    raise AssertionError("unreachable")


def describe_hub_error(error: BaseException) -> str:
    failure = hub_failure(error) or error
    context = (
        f"{error} " if failure is not error else ""
    )  # e.g. "Error while uploading 'model.safetensors' to the Hub."
    if isinstance(failure, HfHubHTTPError) and failure.response is not None:
        return (
            f"{context}HTTP {failure.response.status_code} "
            f"{failure.response.headers.get('X-Error-Message') or failure.response.reason_phrase}"
        )
    return f"{context}{type(failure).__name__}: {failure}"


# -- the client -------------------------------------------------------------------------------------


def hub_token(config: PipelineConfig) -> str:
    token = os.environ.get(config.publish.token_env)
    if not token:
        raise InputError(
            f"publish.repo_id is set but ${config.publish.token_env} is empty; export a Hub token with write access in "
            f"{config.publish.token_env}, or set publish.repo_id: null"
        )
    return token


def hub_api(endpoint: str | None, token: str | bool | None) -> HfApi:
    if endpoint and "huggingface.co" not in endpoint:
        # A self-hosted Hub speaks plain LFS, not xet; the client reads this constant on every call.
        constants.HF_HUB_DISABLE_XET = True
    return HfApi(endpoint=endpoint, token=token)


# -- the push ---------------------------------------------------------------------------------------


def commit_operations(api: HfApi, folder: Path, repo_id: str, head: str) -> list:
    """Every file of the folder, and deletions of files the previous revision has that this one doesn't."""
    local = sorted(path.name for path in folder.iterdir() if path.is_file())
    remote = [
        entry.path
        for entry in api.list_repo_tree(repo_id, revision=head, recursive=True)
        if isinstance(entry, RepoFile)
    ]
    stale = [path for path in remote if path not in local and path != ".gitattributes"]
    return [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name in local] + [
        CommitOperationDelete(path_in_repo=path) for path in stale
    ]


def content_of(folder: Path) -> str | None:
    """The ``content_sha256`` of a publish folder's stillhouse.json (None: not a Stillhouse publish folder)."""
    try:
        return json.loads((folder / PROVENANCE_FILE).read_text()).get("content_sha256")
    except (OSError, ValueError, AttributeError):
        return None


def published_content(api: HfApi, repo_id: str, revision: str) -> str | None:
    """The ``content_sha256`` of stillhouse.json at ``revision`` on the Hub; None when it has none."""
    with tempfile.TemporaryDirectory(prefix="stillhouse-hub-check-") as cache:
        try:
            path = api.hf_hub_download(repo_id, PROVENANCE_FILE, revision=revision, cache_dir=cache)
            recorded = json.loads(Path(path).read_text())
        except (EntryNotFoundError, RevisionNotFoundError, ValueError):
            return None
    return recorded.get("content_sha256") if isinstance(recorded, dict) else None


def git_blob_sha1(path: Path) -> str:
    """Git's object id of a file: what the Hub reports for a file stored without LFS."""
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def holds_folder(api: HfApi, repo_id: str, commit: str, folder: Path) -> bool:
    """Whether ``commit`` holds exactly the files of ``folder`` (but the run-specific ones), byte for byte."""
    remote = {
        entry.path: entry
        for entry in api.list_repo_tree(repo_id, revision=commit, recursive=True)
        if isinstance(entry, RepoFile) and entry.path != ".gitattributes" and entry.path not in RUN_SPECIFIC_FILES
    }
    local = {p.name: p for p in folder.iterdir() if p.is_file() and p.name not in RUN_SPECIFIC_FILES}
    if set(remote) != set(local):
        return False
    for name, entry in remote.items():
        expected = entry.lfs.sha256 if entry.lfs is not None else entry.blob_id
        actual = file_sha256(local[name]) if entry.lfs is not None else git_blob_sha1(local[name])
        if expected != actual:
            return False
    return True


def find_landed_publish(api: HfApi, repo_id: str, tag: str | None, head: str, folder: Path, retries, backoff, log):
    """The commit, at ``tag`` or at the branch ``head``, that holds this publish: the ``content_sha256`` of the
    folder's stillhouse.json in its own, and the folder's files; else None."""
    content = content_of(folder)
    if content is None:
        return None
    tags = with_retries("read refs", lambda: api.list_repo_refs(repo_id).tags, retries, backoff, log) if tag else []
    candidates = [ref.target_commit for ref in tags if ref.name == tag] + [head]
    for commit in dict.fromkeys(candidates):

        def read(commit=commit):
            return published_content(api, repo_id, commit)

        def same_files(commit=commit):
            return holds_folder(api, repo_id, commit, folder)

        if with_retries("read stillhouse.json", read, retries, backoff, log) == content and with_retries(
            "list files", same_files, retries, backoff, log
        ):
            return commit
    return None


def push_folder(
    folder: Path,
    config: PipelineConfig,
    tag: str | None = None,
    description: str = "",
    log: Callable[[str], None] = print,
) -> HubRevision:
    """Create the repo if needed, upload the folder as one commit, tag it; each Hub call retried on transient errors.

    Raises `StillhouseError` with the Hub's answer when the push fails for good; the repo's previous
    revision is untouched then, since a commit is applied whole or not at all.
    """
    settings = config.publish
    api = hub_api(settings.endpoint, hub_token(config))
    repo_id, retries, backoff = settings.repo_id, settings.hub_retries, settings.retry_backoff_s
    message = f"Stillhouse: publish {config.name}" + (f" {tag}" if tag else "")
    try:
        with_retries(
            "create repo",
            lambda: api.create_repo(repo_id, private=settings.private, exist_ok=True, repo_type="model"),
            retries,
            backoff,
            log,
        )
        head = with_retries("read head", lambda: api.model_info(repo_id, revision="main").sha, retries, backoff, log)
        landed = find_landed_publish(api, repo_id, tag, head, folder, retries, backoff, log)
        if landed is not None:
            log(
                f"Hub: {repo_id}@{landed[:12]} already holds this publish (content_sha256 "
                f"{content_of(folder)[:16]}…), pushed by a run that stopped before it finished; completing it "
                "instead of committing again"
            )
            if tag:
                create_tag(api, repo_id, tag, landed, message, retries, backoff, log)
            return HubRevision(
                repo_id=repo_id,
                commit_oid=landed,
                commit_url=f"{api.endpoint}/{repo_id}/commit/{landed}",
                tag=tag,
                revision_url=f"{api.endpoint}/{repo_id}/tree/{landed}",
            )

        def commit():
            # Pinned to `head`: if an earlier try did land, this one is refused (412) instead of committing twice.
            return api.create_commit(
                repo_id,
                operations=commit_operations(api, folder, repo_id, head),
                commit_message=message,
                commit_description=description,
                parent_commit=head,
            )

        try:
            info = with_retries("commit", commit, retries, backoff, log)
            commit_oid, commit_url = info.oid, info.commit_url
        except HfHubHTTPError as error:
            latest = (
                api.list_repo_commits(repo_id)[0]
                if error.response is not None and error.response.status_code == 412
                else None
            )
            if latest is None or latest.title != message or description.strip() not in (latest.message or ""):
                raise
            commit_oid, commit_url = (
                latest.commit_id,
                f"{api.endpoint}/{repo_id}/commit/{latest.commit_id}",
            )  # an earlier try landed
        if tag:
            create_tag(api, repo_id, tag, commit_oid, message, retries, backoff, log)
    except (HfHubHTTPError, httpx2.TransportError, RuntimeError) as error:
        failure = hub_failure(error)
        if failure is None:  # a RuntimeError that isn't the Hub's: a bug, not a failed push
            raise
        status = (
            failure.response.status_code
            if isinstance(failure, HfHubHTTPError) and failure.response is not None
            else None
        )
        hint = {
            401: (
                f"the Hub refused the token in ${settings.token_env} (invalid credentials); "
                "create a new token with write access"
            ),
            403: (
                f"the token in ${settings.token_env} may not write to {repo_id}; "
                "use a token of that namespace or change publish.repo_id"
            ),
        }.get(status)
        tries = f" after {retries} retries" if is_transient(error) else ""
        raise StillhouseError(
            f"publishing {repo_id} to {api.endpoint} failed{tries}: {describe_hub_error(error)}; "
            + (hint or "the repo's previous revision is unchanged (a commit is applied whole or not at all)")
        ) from error
    return HubRevision(
        repo_id=repo_id,
        commit_oid=commit_oid,
        commit_url=commit_url,
        tag=tag,
        revision_url=f"{api.endpoint}/{repo_id}/tree/{commit_oid}",
    )


def create_tag(
    api: HfApi, repo_id: str, tag: str, commit_oid: str, message: str, retries: int, backoff: float, log
) -> None:
    """Tag ``commit_oid``; an existing tag on the same commit is fine (a retry, or an unchanged rerun), on another one
    an error."""
    try:
        with_retries(
            "tag",
            lambda: api.create_tag(repo_id, tag=tag, revision=commit_oid, tag_message=message),
            retries,
            backoff,
            log,
        )
    except HfHubHTTPError as error:
        if error.response is None or error.response.status_code != 409:
            raise
        existing = {ref.name: ref.target_commit for ref in api.list_repo_refs(repo_id).tags}
        if existing.get(tag) != commit_oid:
            raise StillhouseError(
                f"the Hub repo {repo_id} already has tag {tag!r} on commit {existing.get(tag)}, "
                f"not on this publish ({commit_oid}); "
                "register a new version or change publish.tag (e.g. 'v{version}-{name}')"
            ) from error


# -- the download -----------------------------------------------------------------------------------


def download_revision(config: PipelineConfig, repo_id: str, revision: str, cache_dir: str) -> str:
    """Download ``repo_id`` at ``revision`` into ``cache_dir``; the local folder of the snapshot.

    The token is optional here (a public repo needs none), unlike for the push.
    """
    api = hub_api(config.publish.endpoint, os.environ.get(config.publish.token_env) or None)
    return api.snapshot_download(repo_id, revision=revision, cache_dir=cache_dir)
