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

Verification. Sealing an output lists every file in it (recursively) with its size and sha256 in the
manifest (``files``), and the manifest carries a checksum of its own content (``sealed_sha256``).
Reusing an output checks it first: sizes always; sha256 with ``verify="full"`` (the default), and with
``verify="sizes"`` still for files under `SMALL_FILE_BYTES` and for every file of the publish stage. A
file missing, added, resized or changed, a symlink or special file anywhere in the output (the folder
itself included), or a manifest that is unreadable, edited or without a file list makes the output
invalid: one warning names the folder and what was wrong, the manifest and the bad files move to
``<root>/.invalid/<stage>/<fingerprint>-<time>/`` (kept, not deleted), and the stage recomputes the
output; the files that verified stay, so sampling resumes at shard level. Outputs written before
verification existed have no file list: each is treated as invalid once and recomputed. `verify_store`
checks a whole store without changing it (``stillhouse store verify``).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
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
# With `verify: sizes`, files below this are still hashed: configs, tokenizers and small shards cost
# little to read, and a flipped byte in one of them breaks a stage as surely as one in the weights.
SMALL_FILE_BYTES = 16 << 20
# Stages whose outputs are hashed in full whatever `verify` says: what they hold leaves for the Hub.
ALWAYS_HASHED = frozenset({"publish"})
QUARANTINE = ".invalid"  # <root>/.invalid/<stage>/<fingerprint>-<time>/: what an invalid output held
SEAL_KEY = "sealed_sha256"
HEX64 = re.compile(r"^[0-9a-f]{64}$")

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


def manifest_text(content: Any) -> str:
    """How a manifest is written, locally and remotely: the same bytes in both places."""
    return json.dumps(content, indent=2, sort_keys=True) + "\n"


def write_json_atomic(path: Path, content: Any) -> None:
    """Write to a temporary name, then rename: readers never see half a file."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(manifest_text(content))
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


# -- what a sealed output holds, and checking it -----------------------------------------------------


def is_temporary(name: str) -> bool:
    """A file being written or downloaded (``.x.tmp``, ``.x.download``): never part of an output."""
    return name.startswith(".") and name.endswith((".tmp", ".download"))


def scan_output(folder: Path) -> tuple[dict[str, os.stat_result], dict[str, str]]:
    """(every regular file under ``folder`` by relative POSIX path, what else is there: symlinks and special files,
    each with what it is).

    Links are never followed: a symlinked directory is reported, not entered. The manifest and
    temporaries are left out.
    """
    files: dict[str, os.stat_result] = {}
    strange: dict[str, str] = {}
    for directory, subfolders, names in os.walk(folder):  # followlinks=False
        base = Path(directory)
        for name in sorted(subfolders + names):
            path = base / name
            relative = path.relative_to(folder).as_posix()
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode):
                strange[relative] = f"a symlink to {os.readlink(path)} (outputs hold regular files only)"
            elif stat.S_ISREG(info.st_mode):
                if relative != MANIFEST and not is_temporary(name):
                    files[relative] = info
            elif not stat.S_ISDIR(info.st_mode):
                strange[relative] = "not a regular file (outputs hold regular files only)"
    return files, strange


def list_output_files(folder: Path) -> dict[str, dict[str, Any]]:
    """The manifest's ``files``: every file of a just-computed output with its size and sha256."""
    files, strange = scan_output(folder)
    if strange:  # the stage's own code put it there: a bug to fix, not something to seal
        what = "; ".join(f"{name}: {why}" for name, why in strange.items())
        raise StillhouseError(f"the output {folder} can't be sealed: {what}")
    return {name: {"size": info.st_size, "sha256": file_sha256(folder / name)} for name, info in sorted(files.items())}


def seal_checksum(content: dict[str, Any]) -> str:
    """The sha256 of a manifest without its own checksum: an edited or half-written manifest shows."""
    rest = {key: value for key, value in content.items() if key != SEAL_KEY}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()


def parse_manifest(text: str, stage: str, stage_fingerprint: str) -> tuple[dict[str, Any] | None, str | None]:
    """(the manifest, None), or (None, what is wrong with it)."""
    try:
        content = json.loads(text)
    except json.JSONDecodeError as error:
        return None, f"{MANIFEST} is not valid JSON ({error.msg} at line {error.lineno}): truncated or overwritten"
    if not isinstance(content, dict) or not content:
        return None, f"{MANIFEST} holds {type(content).__name__} {str(content)[:40]}, not a manifest"
    if not isinstance(content.get("files"), dict):
        return None, (
            f"{MANIFEST} has no file list: written before the store verified outputs (treated as invalid once), "
            "or not by the store"
        )
    if content.get(SEAL_KEY) != seal_checksum(content):
        return None, f"{MANIFEST} was edited after it was sealed (its {SEAL_KEY} doesn't match its content)"
    if (content.get("stage"), content.get("fingerprint")) != (stage, stage_fingerprint):
        return None, f"{MANIFEST} belongs to {content.get('stage')}/{content.get('fingerprint')}"
    for name, entry in content["files"].items():
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("size"), int)
            and isinstance(entry.get("sha256"), str)
            and HEX64.match(entry["sha256"])
        ):
            return None, f"{MANIFEST}: the entry of {name} is not {{size, sha256}}"
    return content, None


@dataclass
class OutputCheck:
    """One output checked against its manifest.

    ``status``: ``ok``; ``invalid`` (``problems`` say why); ``incomplete`` (no manifest: a run is
    computing it or was interrupted, and the next run resumes it).
    """

    stage: str
    fingerprint: str
    path: str
    status: str
    problems: list[str] = field(default_factory=list)
    files: int = 0
    bytes: int = 0
    hashed: int = 0  # files whose sha256 was compared, not only their size
    manifest: dict[str, Any] | None = None
    bad_files: list[str] = field(default_factory=list)  # relative paths that failed (to move aside)
    whole: bool = False  # nothing in the folder can be trusted: the manifest is unusable or the folder a symlink

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def line(self) -> str:
        where = f"{self.stage}/{self.fingerprint}"
        if self.status == "ok":
            return f"ok          {where}  {self.files} files, {self.bytes / 1e6:.1f} MB, {self.hashed} hashed"
        if self.status == "incomplete":
            return f"incomplete  {where}  no {MANIFEST}: being computed, or interrupted (the next run resumes it)"
        return f"INVALID     {where}  {'; '.join(self.problems)}"


def check_output_folder(
    folder: Path, stage: str, stage_fingerprint: str, hash_file: Callable[[int], bool]
) -> OutputCheck:
    """Check ``folder`` against its manifest without changing anything; ``hash_file(size)`` says which files are
    hashed (all are size-checked)."""
    result = OutputCheck(stage, stage_fingerprint, str(folder), "ok")
    if folder.is_symlink():
        result.status, result.whole = "invalid", True
        result.problems.append(f"the folder is a symlink to {os.readlink(folder)} (outputs hold regular files only)")
        return result
    manifest_path = folder / MANIFEST
    if not manifest_path.is_symlink() and not manifest_path.is_file():
        result.status = "incomplete"
        return result
    if manifest_path.is_symlink():
        text, error = None, f"{MANIFEST} is a symlink to {os.readlink(manifest_path)}"
    else:
        try:
            text, error = manifest_path.read_text(), None
        except (OSError, UnicodeDecodeError) as failure:
            text, error = None, f"{MANIFEST} can't be read ({type(failure).__name__}: {failure})"
    manifest = None
    if text is not None:
        manifest, error = parse_manifest(text, stage, stage_fingerprint)
    if manifest is None:
        result.status, result.whole = "invalid", True
        result.problems.append(error)
        return result
    result.manifest = manifest
    files, strange = scan_output(folder)
    result.problems.extend(f"{name}: {why}" for name, why in strange.items())
    result.bad_files.extend(strange)
    recorded = manifest["files"]
    for name in sorted(set(files) - set(recorded)):
        result.problems.append(f"{name}: not in the manifest (added after the output was sealed)")
        result.bad_files.append(name)
    for name, entry in sorted(recorded.items()):
        info = files.get(name)
        if info is None:
            result.problems.append(f"{name}: missing")
            continue
        result.files += 1
        result.bytes += info.st_size
        if info.st_size != entry["size"]:
            result.problems.append(f"{name}: {info.st_size} bytes, the manifest records {entry['size']}")
            result.bad_files.append(name)
        elif hash_file(info.st_size):
            result.hashed += 1
            actual = file_sha256(folder / name)
            if actual != entry["sha256"]:
                result.problems.append(
                    f"{name}: sha256 {actual[:16]}…, the manifest records {entry['sha256'][:16]}… "
                    "(changed after sealing)"
                )
                result.bad_files.append(name)
    if result.problems:
        result.status = "invalid"
    return result


def stat_signature(folder: Path) -> tuple:
    """What changes whenever a file of the output is added, removed, written or replaced (ctime can't be set back by a
    user): cheap, no file is read."""
    files, strange = scan_output(folder)
    manifest = (folder / MANIFEST).lstat()
    return (
        tuple((name, i.st_size, i.st_mtime_ns, i.st_ctime_ns, i.st_ino) for name, i in sorted(files.items())),
        tuple(sorted(strange)),
        (manifest.st_size, manifest.st_mtime_ns, manifest.st_ctime_ns, manifest.st_ino),
    )


# Outputs this process verified: path -> (manifest checksum, hashed everything?, stat signature). A second
# reuse in the same process (sampling's `claim`, then `build`) skips rehashing files nobody touched since.
_verified: dict[Path, tuple[str, bool, tuple]] = {}
_verified_guard = threading.Lock()


@dataclass(frozen=True)
class StageOutput:
    path: Path
    manifest: dict[str, Any]
    cached: bool


@dataclass
class StoreReport:
    """`verify_store`'s answer: every output of the store (or of one stage), checked."""

    root: str
    outputs: list[OutputCheck]

    @property
    def ok(self) -> bool:
        """No output is invalid (incomplete ones are a normal state: the next run resumes them)."""
        return all(output.status != "invalid" for output in self.outputs)

    def summary(self) -> str:
        counts = {status: sum(o.status == status for o in self.outputs) for status in ("ok", "invalid", "incomplete")}
        return (
            f"store {self.root}: {len(self.outputs)} outputs, {counts['ok']} ok, {counts['invalid']} invalid, "
            f"{counts['incomplete']} incomplete"
        )

    def text(self) -> str:
        """What `stillhouse store verify` prints: one line per output, then the summary (and the fix, if needed)."""
        lines = [output.line() for output in self.outputs] + [self.summary()]
        if not self.ok:
            lines.append("the next run that needs an invalid output moves it aside and recomputes it")
        return "\n".join(lines)


# One lock object per output per process: `claim` and `build` of the same output share it (re-entrant),
# and threads of one run (Prefect's thread pool) may use it on each other's behalf.
_locks: dict[Path, FileLock] = {}
_locks_guard = threading.Lock()


class Store:
    """Stage outputs under a local folder or a remote fsspec URL (``s3://...``), with a local cache."""

    def __init__(self, root: str | Path, cache: str | Path | None = None, verify: str = "full"):
        location = str(root)
        if verify not in ("full", "sizes"):
            raise ValueError(f"store verify must be 'full' or 'sizes', not {verify!r}")
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

    # -- verification ----------------------------------------------------------------------------

    def hashes(self, stage: str, full: bool | None = None) -> Callable[[int], bool]:
        """Which files of a ``stage`` output get their sha256 checked, by size (sizes are always checked)."""
        if full is None:
            full = self.verify == "full" or stage in ALWAYS_HASHED
        return (lambda size: True) if full else (lambda size: size < SMALL_FILE_BYTES)

    def inspect(
        self, stage: str, stage_fingerprint: str, full: bool | None = None, remembered: bool = True
    ) -> OutputCheck:
        """Check one output against its manifest, changing nothing (on a remote store: its copy in the local cache).

        ``full=True`` hashes every file whatever ``verify`` says; None follows ``verify``. With
        ``remembered``, an output this process verified (or sealed) before and whose files nobody has
        touched since (same sizes, times and inodes) is not hashed again.
        """
        folder = self.path(stage, stage_fingerprint)
        hash_everything = full if full is not None else (self.verify == "full" or stage in ALWAYS_HASHED)
        manifest_path = folder / MANIFEST
        if remembered and not folder.is_symlink() and manifest_path.is_file() and not manifest_path.is_symlink():
            try:
                remembered = _verified.get(folder)
                text = manifest_path.read_text()
                if remembered is not None and (remembered[1] or not hash_everything):
                    manifest = json.loads(text)
                    if remembered[0] == manifest.get(SEAL_KEY) and remembered[2] == stat_signature(folder):
                        sizes = [entry["size"] for entry in manifest["files"].values()]
                        return OutputCheck(
                            stage, stage_fingerprint, str(folder), "ok", [], len(sizes), sum(sizes), 0, manifest
                        )
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                pass  # checked in full below
        result = check_output_folder(folder, stage, stage_fingerprint, self.hashes(stage, full))
        if result.ok:
            with _verified_guard:
                _verified[folder] = (
                    result.manifest[SEAL_KEY],
                    result.hashed == result.files,
                    stat_signature(folder),
                )
        return result

    def manifest(self, stage: str, stage_fingerprint: str) -> dict[str, Any] | None:
        """The manifest of a completed output that verifies, or None when the output is absent, incomplete or invalid.

        An invalid output is moved aside (see the module's docstring) with one warning, so the caller
        recomputes it. On a remote store a completed output is downloaded into the local cache first,
        so that ``path(...)`` holds its files when this returns.
        """
        for _ in range(3):  # again only if another run resealed the output while this one checked it
            if self.remote:
                check = self._inspect_remote(stage, stage_fingerprint)
            else:
                check = self.inspect(stage, stage_fingerprint)
            if check.status != "invalid":
                return check.manifest if check.ok else None
            if not self._invalidate(check):
                return None
        return None

    def verify_output(self, stage: str, stage_fingerprint: str, what: str) -> OutputCheck:
        """Hash every file of a completed output and raise unless all match: for outputs that leave the store
        (the student the publish stage pushes). ``what`` names the output in the error."""
        if self.remote:
            self._fetch_completed(stage, stage_fingerprint)
        check = self.inspect(stage, stage_fingerprint, full=True, remembered=False)  # read every byte, now
        if not check.ok:
            why = "; ".join(check.problems) if check.problems else f"it has no {MANIFEST} (never completed)"
            raise StillhouseError(
                f"{what} {self.location(stage, stage_fingerprint)} does not match its manifest: {why}. Nothing was "
                f"used from it; rerun the pipeline to recompute it (`stillhouse store verify --stage {stage}` lists "
                "every invalid output)"
            )
        return check

    def _invalidate(self, check: OutputCheck) -> bool:
        """Move an invalid output's manifest and bad files aside, under its lock; one warning says what was wrong.

        The warning comes first, so a store that can't be written (read-only) still says why it was about
        to write. Returns True when, meanwhile, another run had resealed the output (check again instead).
        """
        stage, stage_fingerprint, folder = check.stage, check.fingerprint, Path(check.path)
        quarantine = self.root / QUARANTINE / stage / f"{stage_fingerprint}-{time.strftime('%Y%m%dT%H%M%S')}"
        shown = "; ".join(check.problems[:5]) + (
            f"; and {len(check.problems) - 5} more" if len(check.problems) > 5 else ""
        )
        log.warning(
            "store: %s is invalid (%s); recomputing it, what it held is kept in %s",
            self.location(stage, stage_fingerprint),
            shown.replace("\n", " "),
            quarantine,
        )
        lock = self._lock(stage, stage_fingerprint)
        with storage_errors(self._describe(stage, stage_fingerprint), self.root):
            self._acquire(stage, stage_fingerprint)
            try:
                manifest_path = folder / MANIFEST
                current = manifest_path.read_bytes() if manifest_path.is_file() else None
                if check.manifest is not None and current != manifest_text(check.manifest).encode():
                    return current is not None  # resealed by another run: check that; removed: nothing to do
                quarantine.mkdir(parents=True, exist_ok=True)
                if check.whole:
                    os.replace(folder, quarantine / "output")  # renames a symlink itself, never its target
                else:
                    if manifest_path.is_file():  # first: from here on the output is incomplete
                        os.replace(manifest_path, quarantine / MANIFEST)
                    for name in check.bad_files:
                        source = folder / name
                        if source.is_symlink() or source.exists():
                            (quarantine / name).parent.mkdir(parents=True, exist_ok=True)
                            os.replace(source, quarantine / name)
                if self.remote:
                    self._invalidate_remote(check)
                with _verified_guard:
                    _verified.pop(folder, None)
            finally:
                if lock.is_locked:
                    lock.release()
        return False

    # -- reuse and sealing -----------------------------------------------------------------------

    def claim(self, stage: str, stage_fingerprint: str) -> dict[str, Any] | None:
        """Take the output's lock before computing it piece by piece (sampling shards); `build` releases it.

        Returns the manifest instead, holding nothing, when the output is complete (and verifies), also
        when it was completed by another run while this one waited for the lock. On a remote store the
        pieces an interrupted run already uploaded are downloaded into the local folder. Symlinks and
        special files in an incomplete output are moved aside before anything resumes from it.
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
        self._clear_links(stage, stage_fingerprint)
        return None

    def build(self, stage: str, stage_fingerprint: str, compute: Callable[[Path], dict[str, Any]]) -> StageOutput:
        """Reuse a completed output that verifies, or run ``compute(folder)`` and seal the folder with its manifest.

        ``compute`` writes its files into the folder and returns the manifest's content; the store adds
        the list of files with their sizes and sha256. A folder left without a manifest by a killed run is
        incomplete; ``compute`` decides what in it can be reused (sampling resumes at shard level),
        everything else is overwritten. While it computes, this run holds the output's lock: a second run
        of the same output waits, then reuses it.
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
                self._clear_links(stage, stage_fingerprint)
                folder.mkdir(parents=True, exist_ok=True)
                self._check_bucket()  # before computing, not after
                manifest = {
                    "stage": stage,
                    "fingerprint": stage_fingerprint,
                    "stillhouse_version": stillhouse.__version__,
                }
                manifest.update(compute(folder))
                manifest["files"] = list_output_files(folder)
                manifest[SEAL_KEY] = seal_checksum(manifest)
                if self.remote:
                    self._upload(stage, stage_fingerprint, manifest)
                write_json_atomic(folder / MANIFEST, manifest)
                with _verified_guard:  # just hashed while sealing: the next reuse in this process needn't rehash
                    _verified[folder] = (manifest[SEAL_KEY], True, stat_signature(folder))
        finally:
            self.release(stage, stage_fingerprint)
        return StageOutput(folder, manifest, cached=False)

    def _clear_links(self, stage: str, stage_fingerprint: str) -> None:
        """Before computing into an incomplete output: move aside a symlinked folder, and symlinks or special files
        in it, so nothing resumes from (or writes through) a link."""
        folder = self.path(stage, stage_fingerprint)
        check = OutputCheck(stage, stage_fingerprint, str(folder), "invalid")
        if folder.is_symlink():
            check.whole = True
            check.problems.append(f"the folder is a symlink to {os.readlink(folder)}")
        elif folder.is_dir():
            _, strange = scan_output(folder)
            check.problems.extend(f"{name}: {why}" for name, why in strange.items())
            check.bad_files.extend(strange)
        if check.problems:
            self._invalidate(check)

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
        folder = self.path(stage, stage_fingerprint)
        if folder.is_symlink():
            folder.unlink()  # the link, never what it points at
        else:
            shutil.rmtree(folder, ignore_errors=True)
        with _verified_guard:
            _verified.pop(folder, None)
        if self.remote and self.fs.exists(self._remote_path(stage, stage_fingerprint)):
            self.fs.rm(self._remote_path(stage, stage_fingerprint), recursive=True)

    # -- locking ---------------------------------------------------------------------------------

    def _lock_path(self, stage: str, stage_fingerprint: str) -> Path:
        return self.root / ".locks" / f"{stage}-{stage_fingerprint}.lock"  # beside the outputs, not among them

    def _lock(self, stage: str, stage_fingerprint: str) -> FileLock:
        path = self._lock_path(stage, stage_fingerprint)
        with _locks_guard:
            return _locks.setdefault(path, FileLock(path, thread_local=False))

    def _acquire(self, stage: str, stage_fingerprint: str) -> None:
        path = self._lock_path(stage, stage_fingerprint)
        with storage_errors(self._describe(stage, stage_fingerprint), self.root):
            path.parent.mkdir(parents=True, exist_ok=True)
            lock = self._lock(stage, stage_fingerprint)
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

    def _inspect_remote(self, stage: str, stage_fingerprint: str, full: bool | None = None) -> OutputCheck:
        """Check a remote output through its local copy; a bad local copy (the cache) is fetched again first."""
        if not self._fetch_completed(stage, stage_fingerprint):
            return OutputCheck(stage, stage_fingerprint, str(self.path(stage, stage_fingerprint)), "incomplete")
        check = self.inspect(stage, stage_fingerprint, full)
        if check.ok or check.whole and self.path(stage, stage_fingerprint).is_symlink():
            return check
        folder = self.path(stage, stage_fingerprint)
        for name in [MANIFEST, *check.bad_files]:
            if (folder / name).is_symlink() or (folder / name).is_file():
                (folder / name).unlink()
        self._download(stage, stage_fingerprint, include_manifest=True)
        return self.inspect(stage, stage_fingerprint, full)

    def _invalidate_remote(self, check: OutputCheck) -> None:
        """Remove the remote manifest (the output is incomplete from then on) and the remote files that failed, so
        the recomputed ones replace them (uploads skip files of the same size)."""
        if check.whole:  # nothing of it can be trusted; the local copy moved aside keeps what it held
            self.fs.rm(self._remote_path(check.stage, check.fingerprint), recursive=True)
            return
        self.fs.rm_file(self._remote_path(check.stage, check.fingerprint, MANIFEST))
        for name in check.bad_files:
            key = self._remote_path(check.stage, check.fingerprint, name)
            if self.fs.exists(key):
                self.fs.rm_file(key)

    def _fetch_completed(self, stage: str, stage_fingerprint: str) -> bool:
        """Whether the remote output is sealed; if so its files are in the local cache (fetched unless the cached
        manifest is the remote one, byte for byte)."""
        key = self._remote_path(stage, stage_fingerprint, MANIFEST)
        try:
            remote_manifest = self.fs.cat_file(key)
        except FileNotFoundError:
            return False
        local_manifest = self.path(stage, stage_fingerprint) / MANIFEST
        if (
            local_manifest.is_symlink()
            or not local_manifest.is_file()
            or local_manifest.read_bytes() != remote_manifest
        ):
            self._download(stage, stage_fingerprint, include_manifest=True)
        return True

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
        """Upload every file of the manifest the remote lacks, then the manifest, last."""
        folder = self.path(stage, stage_fingerprint)
        prefix = self._remote_path(stage, stage_fingerprint)
        self.fs.invalidate_cache(prefix)
        present = {key: info["size"] for key, info in self.fs.find(prefix, detail=True).items()}
        for relative, entry in sorted(manifest["files"].items()):
            key = f"{prefix}/{relative}"
            if present.get(key) != entry["size"]:
                self.fs.put_file(str(folder / relative), key)
        self.fs.pipe_file(f"{prefix}/{MANIFEST}", manifest_text(manifest).encode())


def verify_store(store: Store, stage: str | None = None, full: bool = True) -> StoreReport:
    """Check every output of ``store`` (or of one ``stage``) against its manifest, changing nothing.

    ``full`` hashes every file (the default: a check on demand should be thorough); False follows the
    store's ``verify`` setting. A remote store's outputs are fetched into the local cache and checked
    there. `StoreReport.text()` is what `stillhouse store verify` prints; exit 1 when not ``ok``.
    """
    outputs: list[OutputCheck] = []
    if store.remote:
        store.fs.invalidate_cache(store.remote_root)
        found = sorted(
            {tuple(key[len(store.remote_root) + 1 :].split("/")[:2]) for key in store.fs.find(store.remote_root)}
        )
        pairs = [(s, fp) for s, fp in (pair for pair in found if len(pair) == 2) if not s.startswith(".")]
    elif not store.root.is_dir():
        pairs = []
    else:
        stages = [store.root / stage] if stage else sorted(p for p in store.root.iterdir() if p.is_dir())
        pairs = [
            (folder.name, output.name)
            for folder in stages
            if folder.is_dir() and not folder.name.startswith(".")
            for output in sorted(folder.iterdir())
            if not output.name.startswith(".")
        ]
    for stage_name, stage_fingerprint in pairs:
        if stage is not None and stage_name != stage:
            continue
        if store.remote and not store._fetch_completed(stage_name, stage_fingerprint):
            outputs.append(
                OutputCheck(stage_name, stage_fingerprint, store.location(stage_name, stage_fingerprint), "incomplete")
            )
            continue
        outputs.append(store.inspect(stage_name, stage_fingerprint, full=True if full else None, remembered=False))
    return StoreReport(root=store.url or str(store.root), outputs=outputs)
