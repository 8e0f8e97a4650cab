"""The teacher-output store: zstd Parquet shards plus the stage manifest.

One row per (prompt, sample): ``prompt_id``, ``split`` (train/eval), ``sample_index``,
``response_text``, ``response_token_ids`` and, for white-box runs, ``top_k_ids`` (int32),
``top_k_logprobs`` (float16) and ``tail_logprobs`` (float16: the log of the mass outside the k ids)
per generated position, taken from the teacher's full distribution at temperature 1. Each shard is
written under a temporary name and renamed when complete, so a killed run resumes at shard level.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from stillhouse.sampling.engine import Generation

SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("split", pa.string()),
        ("sample_index", pa.int32()),
        ("response_text", pa.string()),
        ("response_token_ids", pa.list_(pa.int32())),
        ("top_k_ids", pa.list_(pa.list_(pa.int32()))),
        ("top_k_logprobs", pa.list_(pa.list_(pa.float16()))),
        ("tail_logprobs", pa.list_(pa.float16())),
    ]
)


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def _float16(values):
    # float16 keeps 3 significant digits of a log-prob: plenty for a KL target, half the bytes.
    return None if values is None else np.asarray(values, dtype=np.float16)


def write_shard(path: Path, prompt_ids: list[str], splits: list[str], generations: list[Generation]) -> None:
    """Write one shard atomically: a temporary file in the same folder, renamed when complete.

    ``prompt_ids[i]`` and ``splits[i]`` belong to ``generations[i]`` (one entry per row).
    """
    columns = {
        "prompt_id": prompt_ids,
        "split": splits,
        "sample_index": [g.sample_index for g in generations],
        "response_text": [g.text for g in generations],
        "response_token_ids": [g.token_ids for g in generations],
        "top_k_ids": [g.top_k_ids for g in generations],
        "top_k_logprobs": [None if g.top_k_logprobs is None else list(_float16(g.top_k_logprobs)) for g in generations],
        "tail_logprobs": [_float16(g.tail_logprobs) for g in generations],
    }
    table = pa.table(columns, schema=SCHEMA)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # per process: two writers never share one
    pq.write_table(table, temporary, compression="zstd")
    os.replace(temporary, path)


def remove_partial_shards(folder: Path) -> int:
    """Delete temporary shard files a killed run left behind; returns how many there were."""
    partial = list(Path(folder).glob(".shard-*.tmp"))
    for path in partial:
        path.unlink(missing_ok=True)
    return len(partial)


def read_teacher_outputs(folder: str | Path, split: str | None = None) -> pd.DataFrame:
    """All rows of a teacher-output folder (optionally one split), in shard order."""
    shards = sorted(Path(folder).glob("shard-*.parquet"))
    frame = pd.concat([pq.read_table(shard).to_pandas() for shard in shards], ignore_index=True)
    return frame if split is None else frame[frame["split"] == split].reset_index(drop=True)
