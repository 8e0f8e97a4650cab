"""The content-addressed artifact store: a local folder, or any fsspec URL such as ``s3://bucket/prefix``.

A stage's output lives at ``<root>/<stage>/<fingerprint>/`` and is complete only once
``manifest.json`` has been written, last. The fingerprint hashes the stage's config section, the
fingerprints of its inputs and the version of the code that computes it, so a rerun with the same
fingerprint reuses the output: this is both the cache and the resume mechanism, and it needs no
Prefect server.

    store = Store(".stillhouse/store")            # a folder
    store = Store("s3://bucket/stillhouse")       # S3 (or MinIO: set AWS_ENDPOINT_URL), through s3fs

On a remote store, stages still compute into a local folder (the cache, ``$STILLHOUSE_STORE_CACHE``,
default ``.stillhouse/cache``); a finished output is uploaded file by file and its manifest last, and
reading a completed output downloads it into the cache. Sampling uploads each shard as it finishes
(`upload_partial`), so a run interrupted on one machine resumes on another.

Two runs of the same config at once: computing an output holds a per-output file lock, so the
second run waits and then reuses what the first wrote. (On a remote store the lock lives in the local
cache, so it orders runs on one machine; runs on two machines may both compute an output, and each
uploads the same content with its manifest last.)
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from pydantic import BaseModel

import stillhouse
from stillhouse.errors import StillhouseError

MANIFEST = "manifest.json"
CACHE_ENV = "STILLHOUSE_STORE_CACHE"
# The errors that mean "this store can't be written", not "the stage's code is wrong".
STORAGE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EFBIG, errno.EDQUOT}

log = logging.getLogger(__name__)


class StoreWriteError(StillhouseError):
    """The store refused a write (read-only, no permission, disk full); nothing was marked complete."""


def fingerprint(stage: str, config: BaseModel | dict[str, Any], inputs: dict[str, str], code_version: int) -> str:
    """A 16-hex-digit hash of what determines a stage's output."""
    settings = config.model_dump(mode="json") if isinstance(config, BaseModel) else config
    payload = {
        "stage": stage,
        "config": settings,
        "inputs": inputs,
        "code": f"{stillhouse.__version__}/{code_version}",
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomic(path: Path, content: Any) -> None:
    """Write to a temporary name, then rename: readers never see half a file."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
    os.replace(temporary, path)


def storage_errno(error: BaseException) -> int | None:
    """The errno of an OSError, also when a library (pyarrow) only puts it in the message."""
    if isinstance(error, OSError) and error.errno:
        return error.errno
    found = re.search(r"\[errno (\d+)\]", str(error), flags=re.IGNORECASE)
    return int(found.group(1)) if found else None


@contextmanager
def storage_errors(where: str, folder: str | Path) -> Iterator[None]:
    """Turn "read-only", "permission denied" and "disk full" while writing ``where`` into a StoreWriteError
    naming it and the fix."""
    try:
        yield
    except OSError as error:
        code = storage_errno(error)
        if code not in STORAGE_ERRNOS:
            raise
        raise StoreWriteError(
            f"cannot write the store output {where}: {os.strerror(code)} ({type(error).__name__}: {str(error)[:300]}); "
            f"nothing was marked complete. Free space or make {folder} writable for this user, or set `store:` "
            "in the config to a writable folder (or an s3:// URL)"
        ) from error


@dataclass(frozen=True)
class StageOutput:
    path: Path
    manifest: dict[str, Any]
    cached: bool


# One lock object per output per process: `claim` and `build` of the same output share it (re-entrant),
# and threads of one run (Prefect's thread pool) may use it on each other's behalf.
_locks: dict[Path, FileLock] = {}
_locks_guard = threading.Lock()


class Store:
    """Stage outputs under a local folder or a remote fsspec URL (``s3://...``), with a local cache."""

    def __init__(self, root: str | Path, cache: str | Path | None = None, verify: str = "full"):
        location = str(root)
        self.verify = verify  # how much of a stored output is checked before reuse: "full" or "sizes"
        self.url: str | None = None
        self.fs = None
        if "://" in location and not location.startswith("file://"):
            import fsspec

            self.url = location.rstrip("/")
            self.fs, self.remote_root = fsspec.core.url_to_fs(self.url)
            self.remote_root = self.remote_root.rstrip("/")
            protocol = self.url.split("://", 1)[0]
            cache_root = Path(cache or os.environ.get(CACHE_ENV, ".stillhouse/cache")).expanduser().resolve()
            self.root = cache_root / protocol / self.remote_root
        else:
            self.root = Path(location.removeprefix("file://")).expanduser().resolve()

    @classmethod
    def from_config(cls, settings) -> Store:
        """The store a `StoreConfig` describes (its root and how far reuse is verified)."""
        return cls(settings.root, verify=settings.verify)

    @property
    def remote(self) -> bool:
        return self.fs is not None

    def __repr__(self) -> str:
        return f"Store({self.url or str(self.root)!r})"

    def path(self, stage: str, stage_fingerprint: str) -> Path:
        """The output's local folder (on a remote store: its place in the local cache)."""
        return self.root / stage / stage_fingerprint

    def location(self, stage: str, stage_fingerprint: str) -> str:
        """Where the output lives for good: the local folder, or its remote URL."""
        if self.remote:
            return f"{self.url}/{stage}/{stage_fingerprint}"
        return str(self.path(stage, stage_fingerprint))

    def _remote_path(self, stage: str, stage_fingerprint: str, name: str = "") -> str:
        return f"{self.remote_root}/{stage}/{stage_fingerprint}" + (f"/{name}" if name else "")

    def manifest(self, stage: str, stage_fingerprint: str) -> dict[str, Any] | None:
        """The manifest of a completed output, or None when the output is absent or incomplete.

        On a remote store a completed output is downloaded into the local cache first, so that
        ``path(...)`` holds its files when this returns.
        """
        if self.remote:
            return self._fetch_completed(stage, stage_fingerprint)
        manifest_path = self.path(stage, stage_fingerprint) / MANIFEST
        if not manifest_path.is_file():
            return None
        return json.loads(manifest_path.read_text())

    def claim(self, stage: str, stage_fingerprint: str) -> dict[str, Any] | None:
        """Take the output's lock before computing it piece by piece (sampling shards); `build` releases it.

        Returns the manifest instead, holding nothing, when the output is complete, also when it was
        completed by another run while this one waited for the lock. On a remote store the pieces an
        interrupted run already uploaded are downloaded into the local folder.
        """
        existing = self.manifest(stage, stage_fingerprint)
        if existing is not None:
            return existing
        self._acquire(stage, stage_fingerprint)
        existing = self.manifest(stage, stage_fingerprint)
        if existing is not None:
            self.release(stage, stage_fingerprint)
            return existing
        if self.remote:
            self._check_bucket()
            self._download(stage, stage_fingerprint, include_manifest=False)
        return None

    def build(self, stage: str, stage_fingerprint: str, compute: Callable[[Path], dict[str, Any]]) -> StageOutput:
        """Reuse a completed output, or run ``compute(folder)`` and seal the folder with its manifest.

        ``compute`` writes its files into the folder and returns the manifest's content. A folder
        left without a manifest by a killed run is incomplete; ``compute`` decides what in it can be
        reused (sampling resumes at shard level), everything else is overwritten. While it computes,
        this run holds the output's lock: a second run of the same output waits, then reuses it.
        """
        existing = self.manifest(stage, stage_fingerprint)
        if existing is not None:
            self.release(stage, stage_fingerprint)  # a claim taken by `claim` ends here too
            return StageOutput(self.path(stage, stage_fingerprint), existing, cached=True)
        folder = self.path(stage, stage_fingerprint)
        try:
            with storage_errors(self._describe(stage, stage_fingerprint), self.root):
                self._acquire(stage, stage_fingerprint)
                existing = self.manifest(stage, stage_fingerprint)  # computed by another run while this one waited
                if existing is not None:
                    return StageOutput(folder, existing, cached=True)
                folder.mkdir(parents=True, exist_ok=True)
                self._check_bucket()  # before computing, not after
                manifest = {
                    "stage": stage,
                    "fingerprint": stage_fingerprint,
                    "stillhouse_version": stillhouse.__version__,
                }
                manifest.update(compute(folder))
                if self.remote:
                    self._upload(stage, stage_fingerprint, manifest)
                write_json_atomic(folder / MANIFEST, manifest)
        finally:
            self.release(stage, stage_fingerprint)
        return StageOutput(folder, manifest, cached=False)

    def upload_partial(self, stage: str, stage_fingerprint: str, file: Path) -> None:
        """Upload one finished piece of an incomplete output (a sampling shard),
        so a rerun elsewhere resumes from it."""
        if self.remote:
            self.fs.put_file(str(file), self._remote_path(stage, stage_fingerprint, Path(file).name))

    def release(self, stage: str, stage_fingerprint: str) -> None:
        """Drop this process's lock on an output (no-op when it holds none)."""
        lock = _locks.get(self._lock_path(stage, stage_fingerprint))
        if lock is not None and lock.is_locked:
            lock.release(force=True)

    def discard(self, stage: str, stage_fingerprint: str) -> None:
        shutil.rmtree(self.path(stage, stage_fingerprint), ignore_errors=True)
        if self.remote and self.fs.exists(self._remote_path(stage, stage_fingerprint)):
            self.fs.rm(self._remote_path(stage, stage_fingerprint), recursive=True)

    # -- locking ---------------------------------------------------------------------------------

    def _lock_path(self, stage: str, stage_fingerprint: str) -> Path:
        return self.root / ".locks" / f"{stage}-{stage_fingerprint}.lock"  # beside the outputs, not among them

    def _acquire(self, stage: str, stage_fingerprint: str) -> None:
        path = self._lock_path(stage, stage_fingerprint)
        with storage_errors(self._describe(stage, stage_fingerprint), self.root):
            path.parent.mkdir(parents=True, exist_ok=True)
            with _locks_guard:
                lock = _locks.setdefault(path, FileLock(path, thread_local=False))
            try:
                lock.acquire(timeout=0)
            except Timeout:
                log.warning(
                    "another run is computing %s; waiting for it to finish (lock %s)",
                    self.location(stage, stage_fingerprint),
                    path,
                )
                lock.acquire()

    def _describe(self, stage: str, stage_fingerprint: str) -> str:
        where = self.location(stage, stage_fingerprint)
        return f"{where} (local cache {self.path(stage, stage_fingerprint)})" if self.remote else where

    # -- remote transfers ------------------------------------------------------------------------

    def _check_bucket(self) -> None:
        if not self.remote:
            return
        bucket = self.remote_root.split("/", 1)[0]
        if not self.fs.exists(bucket):
            endpoint = (
                os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "the default endpoint"
            )
            raise StoreWriteError(
                f"store {self.url}: the bucket {bucket!r} does not exist at {endpoint}; create it "
                f"(e.g. `aws s3 mb s3://{bucket}` or MinIO's `mc mb`) or fix `store:` / $AWS_ENDPOINT_URL"
            )

    def _fetch_completed(self, stage: str, stage_fingerprint: str) -> dict[str, Any] | None:
        try:
            remote_manifest = json.loads(self.fs.cat_file(self._remote_path(stage, stage_fingerprint, MANIFEST)))
        except FileNotFoundError:
            return None
        local_manifest = self.path(stage, stage_fingerprint) / MANIFEST
        if local_manifest.is_file() and json.loads(local_manifest.read_text()) == remote_manifest:
            return remote_manifest
        self._download(stage, stage_fingerprint, include_manifest=True)
        return remote_manifest

    def _download(self, stage: str, stage_fingerprint: str, include_manifest: bool) -> None:
        """Copy the output's remote files into the local folder, the manifest last; files already here are kept."""
        folder = self.path(stage, stage_fingerprint)
        prefix = self._remote_path(stage, stage_fingerprint)
        self.fs.invalidate_cache(prefix)
        remote_files = self.fs.find(prefix, detail=True)
        manifest_key = f"{prefix}/{MANIFEST}"
        for key, info in sorted(remote_files.items(), key=lambda item: item[0] == manifest_key):
            if key == manifest_key and not include_manifest:
                continue
            local = folder / key[len(prefix) + 1 :]
            if key != manifest_key and local.is_file() and local.stat().st_size == info["size"]:
                continue
            local.parent.mkdir(parents=True, exist_ok=True)
            partial = local.with_name(f".{local.name}.download")
            self.fs.get_file(key, str(partial))
            os.replace(partial, local)

    def _upload(self, stage: str, stage_fingerprint: str, manifest: dict[str, Any]) -> None:
        """Upload every file of the local folder the remote lacks, then the manifest, last."""
        folder = self.path(stage, stage_fingerprint)
        prefix = self._remote_path(stage, stage_fingerprint)
        self.fs.invalidate_cache(prefix)
        present = {key: info["size"] for key, info in self.fs.find(prefix, detail=True).items()}
        for local in sorted(folder.rglob("*")):
            relative = local.relative_to(folder).as_posix()
            if not local.is_file() or relative == MANIFEST or local.name.startswith("."):  # temporary and lock files
                continue
            key = f"{prefix}/{relative}"
            if present.get(key) != local.stat().st_size:
                self.fs.put_file(str(local), key)
        self.fs.pipe_file(f"{prefix}/{MANIFEST}", (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
