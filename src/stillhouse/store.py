"""The content-addressed artifact store.

A stage's output lives at ``<root>/<stage>/<fingerprint>/`` and is complete only once
``manifest.json`` has been written, last. The fingerprint hashes the stage's config section, the
fingerprints of its inputs and the version of the code that computes it, so a rerun with the same
fingerprint reuses the output: this is both the cache and the resume mechanism, and it needs no
Prefect server.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

import stillhouse

MANIFEST = "manifest.json"


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


@dataclass(frozen=True)
class StageOutput:
    path: Path
    manifest: dict[str, Any]
    cached: bool


class Store:
    """A local folder of stage outputs (fsspec URLs come with the cluster work)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()

    def path(self, stage: str, stage_fingerprint: str) -> Path:
        return self.root / stage / stage_fingerprint

    def manifest(self, stage: str, stage_fingerprint: str) -> dict[str, Any] | None:
        """The manifest of a completed output, or None when the output is absent or incomplete."""
        manifest_path = self.path(stage, stage_fingerprint) / MANIFEST
        if not manifest_path.is_file():
            return None
        return json.loads(manifest_path.read_text())

    def build(self, stage: str, stage_fingerprint: str, compute: Callable[[Path], dict[str, Any]]) -> StageOutput:
        """Reuse a completed output, or run ``compute(folder)`` and seal the folder with its manifest.

        ``compute`` writes its files into the folder and returns the manifest's content. A folder
        left without a manifest by a killed run is incomplete; ``compute`` decides what in it can be
        reused (sampling resumes at shard level), everything else is overwritten.
        """
        existing = self.manifest(stage, stage_fingerprint)
        if existing is not None:
            return StageOutput(self.path(stage, stage_fingerprint), existing, cached=True)
        folder = self.path(stage, stage_fingerprint)
        folder.mkdir(parents=True, exist_ok=True)
        manifest = {"stage": stage, "fingerprint": stage_fingerprint, "stillhouse_version": stillhouse.__version__}
        manifest.update(compute(folder))
        write_json_atomic(folder / MANIFEST, manifest)
        return StageOutput(folder, manifest, cached=False)

    def discard(self, stage: str, stage_fingerprint: str) -> None:
        shutil.rmtree(self.path(stage, stage_fingerprint), ignore_errors=True)
