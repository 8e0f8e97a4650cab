"""Curation: load prompts, normalize them to chat messages, drop empty and duplicate ones, split.

Output: ``train.parquet`` and ``eval.parquet`` in the store, columns ``prompt_id`` (hash of the
normalized prompt), ``messages`` (JSON list of ``{role, content}``), ``reference`` (or null) and
``category`` (or null).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pandas as pd

from stillhouse.config import DEMO_SOURCE, CurateConfig
from stillhouse.errors import InputError
from stillhouse.refs import DatasetRef
from stillhouse.store import Store, fingerprint

CODE_VERSION = 1
FILE_READERS = {".jsonl": lambda path: pd.read_json(path, lines=True), ".json": lambda path: pd.read_json(path, lines=True),
                ".parquet": pd.read_parquet, ".csv": pd.read_csv}


def source_kind(source: str) -> str:
    """`demo`, `file`, `datasets-folder` or `hub`; raises for a local path that is not there."""
    if source == DEMO_SOURCE:
        return "demo"
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix.lower() not in FILE_READERS:
            raise InputError(f"curate.source: {source!r} has an unsupported extension; use .jsonl, .parquet or .csv")
        return "file"
    if path.is_dir():
        return "datasets-folder"
    if path.suffix.lower() in FILE_READERS or source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise InputError(f"curate.source: dataset file {source!r} does not exist; check the path (relative paths start from {Path.cwd()})")
    return "hub"


def load_source(config: CurateConfig) -> pd.DataFrame:
    kind = source_kind(config.source)
    if kind == "demo":
        from stillhouse.demo.tasks import make_examples

        return pd.DataFrame(make_examples(config.demo_rows, config.demo_seed))
    if kind == "file":
        path = Path(config.source).expanduser()
        try:
            return FILE_READERS[path.suffix.lower()](path)
        except ValueError as error:
            raise InputError(f"curate.source: could not read {path}: {error}") from None
    import datasets

    if kind == "datasets-folder":
        loaded = datasets.load_from_disk(config.source)
        if isinstance(loaded, datasets.DatasetDict):
            if config.split not in loaded:
                raise InputError(f"curate.split: {config.source} has splits {list(loaded)}, not {config.split!r}")
            loaded = loaded[config.split]
    else:
        loaded = datasets.load_dataset(config.source, split=config.split)
    return loaded.to_pandas()


def to_messages(value: Any) -> list[dict[str, str]]:
    """A prompt as chat messages: a plain string becomes one user turn; message lists are kept."""
    if isinstance(value, str):
        return [{"role": "user", "content": value.strip()}] if value.strip() else []
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        return [{"role": str(m["role"]), "content": str(m["content"])} for m in value if str(m["content"]).strip()]
    return []


def prompt_hash(messages: list[dict[str, str]], salt: str = "") -> str:
    normalized = json.dumps([[m["role"], " ".join(m["content"].split()).lower()] for m in messages])
    return hashlib.sha256((salt + normalized).encode()).hexdigest()


def check_columns(frame: pd.DataFrame, config: CurateConfig) -> None:
    columns = list(frame.columns)
    if frame.empty:
        raise InputError(f"curate.source: {config.source!r} has no rows; point it at a dataset with prompts")
    for field in ("prompt_column", "reference_column", "category_column"):
        column = getattr(config, field)
        if column is not None and column not in frame.columns:
            hint = "" if field == "prompt_column" else f", or set curate.{field}: null"
            raise InputError(f"curate.{field}: column {column!r} is not in {config.source!r} (columns: {columns}); name one of those{hint}")


def curate_frame(frame: pd.DataFrame, config: CurateConfig) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, int]]:
    """Normalize, filter and split; returns (train, eval, counts)."""
    check_columns(frame, config)
    counts = {"rows_in": len(frame), "dropped_empty": 0, "dropped_duplicate": 0}
    rows, seen = [], set()
    for record in frame.to_dict("records"):
        messages = to_messages(record[config.prompt_column])
        while messages and messages[-1]["role"] != "user":
            messages.pop()  # a full conversation: the teacher answers its last user turn
        if not messages:
            counts["dropped_empty"] += 1
            continue
        prompt_id = prompt_hash(messages)[:16]
        if prompt_id in seen:
            counts["dropped_duplicate"] += 1
            continue
        seen.add(prompt_id)
        reference = record.get(config.reference_column) if config.reference_column else None
        category = record.get(config.category_column) if config.category_column else None
        rows.append({
            "prompt_id": prompt_id,
            "messages": json.dumps(messages),
            "reference": None if reference is None or pd.isna(reference) else str(reference),
            "category": None if category is None or pd.isna(category) else str(category),
            # Position in [0, 1) from a salted hash of the prompt: stable across reruns and row order.
            "split_key": int(prompt_hash(messages, config.split_salt)[:15], 16) / 16**15,
        })
    if not rows:
        raise InputError(f"curate.source: every row of {config.source!r} was empty or had no user turn in column {config.prompt_column!r}")
    curated = pd.DataFrame(rows).sort_values("split_key", kind="stable")
    if config.max_rows is not None:
        curated = curated.head(config.max_rows)
    is_eval = curated["split_key"] < config.eval_fraction
    train, evaluation = curated[~is_eval].drop(columns="split_key"), curated[is_eval].drop(columns="split_key")
    if train.empty or evaluation.empty:
        raise InputError(f"curate: {len(curated)} prompts give an empty {'train' if train.empty else 'eval'} split; add data or change curate.eval_fraction")
    counts.update(train_rows=len(train), eval_rows=len(evaluation))
    return train.reset_index(drop=True), evaluation.reset_index(drop=True), counts


def source_identity(config: CurateConfig) -> str:
    """What the data is, for the fingerprint: a file's content hash, else the source string."""
    path = Path(config.source).expanduser()
    if path.is_file():
        from stillhouse.store import file_sha256

        return f"file-sha256:{file_sha256(path)}"
    return config.source


def curate(config: CurateConfig, store: Store) -> DatasetRef:
    source_kind(config.source)  # fail on a missing file before anything else
    stage_fingerprint = fingerprint("curate", config, {"source": source_identity(config)}, CODE_VERSION)

    def compute(folder: Path) -> dict:
        train, evaluation, counts = curate_frame(load_source(config), config)
        train.to_parquet(folder / "train.parquet", index=False)
        evaluation.to_parquet(folder / "eval.parquet", index=False)
        return {"counts": counts, "has_references": bool(train["reference"].notna().any())}

    output = store.build("curate", stage_fingerprint, compute)
    return DatasetRef(
        stage="curate", fingerprint=stage_fingerprint, path=str(output.path), cached=output.cached,
        train_rows=output.manifest["counts"]["train_rows"], eval_rows=output.manifest["counts"]["eval_rows"],
        has_references=output.manifest["has_references"], counts=output.manifest["counts"],
    )


def read_split(dataset: DatasetRef, split: str) -> pd.DataFrame:
    return pd.read_parquet(Path(dataset.path) / f"{split}.parquet")
