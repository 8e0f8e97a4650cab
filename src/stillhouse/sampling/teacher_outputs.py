"""The teacher-output store: zstd Parquet shards plus the stage manifest.

One row per (prompt, sample): ``prompt_id``, ``split`` (train/eval), ``sample_index``,
``response_text``, ``response_token_ids`` and, for white-box runs, per generated position the teacher's
top-k ids, their log-probs and the tail (the log of the mass outside the k ids), taken from its full
distribution at temperature 1. Each shard is written under a temporary name and renamed when complete,
so a killed run resumes at shard level.

`read_teacher_outputs` gives every shard back in one shape, whatever format wrote it: per row,
``top_k_ids`` an int32 array ``[positions, k]``, ``top_k_logprobs`` a float32 array ``[positions, k]`` and
``tail_logprobs`` a float32 array ``[positions]`` (None for rows without top-k).

Format 2 (written now; the Parquet file's metadata says ``stillhouse.format: 2``), about 2/3 of format 1's size:

- log-probs are fixed-point, in steps of `LOGPROB_STEP` (1/512): each within 1/1024 (< 1e-3) of the
  teacher's, at any magnitude (float16, format 1, is off by up to 4e-3 below -8). Per position the top-1
  is stored as ``top_k_logprob_first`` (``round(-logprob / step)``) and the others as the steps from one
  rank to the next (``top_k_logprob_steps``, k - 1 small non-negative integers: top-k comes best first).
  The tail is ``tail_logprob_steps`` the same way. ``-inf`` is stored as `NEG_INF`.
- ids are lossless codes (``top_k_id_codes``): the `FREQUENT_IDS` ids most frequent in the shard become
  0, 1, ... in order of frequency, the others follow in id order; the frequent ids are listed in the
  file's metadata. Frequent tokens then cost one byte, not two.
- integer columns use Parquet's BYTE_STREAM_SPLIT encoding (the low and high bytes compress apart) and zstd.

Format 1 (written before): ``top_k_ids`` int32, ``top_k_logprobs`` float16, ``tail_logprobs`` float16.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from stillhouse.sampling.engine import Generation

FORMAT_VERSION = 2
LOGPROB_STEP = 1 / 512  # a power of two: exact in binary; the largest error is half a step, 0.00098
NEG_INF = 2**31 - 1  # the fixed-point code of a log-prob of -inf (nothing left outside the top k)
FREQUENT_ID_COUNT = 16  # ids seen this often in a shard get codes by frequency (listing one costs ~1 byte)
STEP_COLUMNS = (1, 2, 4, 8, 16, 32, 64)  # the rank each column of log-prob steps starts at: own zstd tables each
ZSTD_LEVEL = 1  # on these near-random bytes, higher levels find spurious matches: 3 was 1.5% larger, 9 2%

SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("split", pa.string()),
        ("sample_index", pa.int32()),
        ("response_text", pa.string()),
        ("response_token_ids", pa.list_(pa.int32())),
        ("top_k_id_codes", pa.list_(pa.int32())),
        ("top_k_logprob_first", pa.list_(pa.int32())),
        *[(f"top_k_logprob_steps_{start}", pa.list_(pa.int32())) for start in STEP_COLUMNS],
        ("tail_logprob_steps", pa.list_(pa.int32())),
    ]
)
# Format 1, as written before: read, never written.
SCHEMA_V1 = pa.schema(
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
BYTE_STREAM_SPLIT = {
    "response_token_ids.list.element": "BYTE_STREAM_SPLIT",
    "top_k_id_codes.list.element": "BYTE_STREAM_SPLIT",
    "top_k_logprob_first.list.element": "BYTE_STREAM_SPLIT",
    **{f"top_k_logprob_steps_{start}.list.element": "BYTE_STREAM_SPLIT" for start in STEP_COLUMNS},
    "tail_logprob_steps.list.element": "BYTE_STREAM_SPLIT",
}


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def logprob_codes(values: np.ndarray, where: str) -> np.ndarray:
    """Fixed-point codes ``round(-logprob / LOGPROB_STEP)`` (int64); -inf becomes `NEG_INF`."""
    values = np.asarray(values, dtype=np.float64)
    if np.isnan(values).any() or np.isposinf(values).any():
        raise ValueError(f"{where}: the teacher gave NaN or +inf log-probs; check the teacher's weights and dtype")
    # A log-prob above 0 (a server's rounding) is stored as 0; anything below -4e6 is -inf in all but name.
    codes = np.clip(np.round(-values / LOGPROB_STEP), 0, NEG_INF - 1).astype(np.int64)
    codes[np.isneginf(values)] = NEG_INF
    return codes


def logprobs_from_codes(codes: np.ndarray) -> np.ndarray:
    """float32 log-probs from fixed-point codes; `NEG_INF` (or past it) becomes -inf."""
    values = (-LOGPROB_STEP * codes.astype(np.float64)).astype(np.float32)
    values[codes >= NEG_INF] = -np.inf
    return values


def frequent_ids(ids: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """The ids seen at least `FREQUENT_ID_COUNT` times in ``ids``, in code order, and how many of them are in each
    frequency octave: the most frequent octave (``floor(log2(count))``) first, ascending ids within one."""
    distinct, counts = np.unique(ids, return_counts=True)
    kept = counts >= FREQUENT_ID_COUNT
    distinct, octave = distinct[kept], np.floor(np.log2(counts[kept])).astype(np.int64)
    order = np.lexsort((distinct, -octave))
    return distinct[order], [int(size) for size in np.unique(-octave, return_counts=True)[1]]


def pack_frequent_ids(frequent: np.ndarray, octaves: list[int]) -> bytes:
    """zstd bytes of the frequent ids, each octave's ascending ids as gaps (small numbers)."""
    blocks = np.split(frequent, np.cumsum(octaves)[:-1]) if octaves else []
    gaps = np.concatenate([np.diff(block, prepend=0) for block in blocks]) if blocks else np.zeros(0)
    return pa.Codec("zstd", compression_level=19).compress(gaps.astype(np.int32).tobytes(), asbytes=True)


def unpack_frequent_ids(packed: bytes, octaves: list[int]) -> np.ndarray:
    gaps = np.frombuffer(pa.Codec("zstd").decompress(pa.py_buffer(packed), 4 * sum(octaves)), dtype=np.int32)
    blocks = np.split(gaps.astype(np.int64), np.cumsum(octaves)[:-1]) if octaves else []
    return np.concatenate([block.cumsum() for block in blocks]) if blocks else np.zeros(0, dtype=np.int64)


def encode_ids(ids: np.ndarray, frequent: np.ndarray) -> np.ndarray:
    """Codes for ``ids``: an id's place in ``frequent`` if it is there, else ``len(frequent)`` + its rank among the
    ids that are not (counting up from 0, in id order)."""
    if len(frequent) == 0:
        return ids.copy()
    ranked_order = np.argsort(frequent, kind="stable")  # ranked[j] is frequent[ranked_order[j]]
    ranked = frequent[ranked_order]
    position = np.searchsorted(ranked, ids)
    found = (position < len(ranked)) & (ranked[np.minimum(position, len(ranked) - 1)] == ids)
    codes = len(frequent) + ids - position  # ids below this one that are frequent don't count
    codes[found] = ranked_order[position[found]]
    return codes


def decode_ids(codes: np.ndarray, frequent: np.ndarray) -> np.ndarray:
    """The inverse of `encode_ids`."""
    ids = np.empty(codes.shape, dtype=np.int64)
    is_frequent = codes < len(frequent)
    ids[is_frequent] = frequent[codes[is_frequent]]
    # A rare id is its rank among rare ids plus the frequent ids below it: with the frequent ids sorted,
    # ranked[i] - i counts the rare ids below ranked[i], so a search over it finds how many to add.
    ranked = np.sort(frequent)
    rare = codes[~is_frequent] - len(frequent)
    ids[~is_frequent] = rare + np.searchsorted(ranked - np.arange(len(ranked)), rare, side="right")
    return ids


def _list_column(rows: list[np.ndarray | None]) -> pa.Array:
    """A list<int32> column from per-row arrays (2-D ones flattened row-major); None rows are nulls. Built from
    offsets, not element by element."""
    present = [row.ravel() for row in rows if row is not None]
    lengths = [0 if row is None else row.size for row in rows]
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    values = pa.array(np.concatenate(present).astype(np.int32) if present else np.zeros(0, np.int32))
    return pa.ListArray.from_arrays(offsets, values, mask=pa.array([row is None for row in rows]))


def _step_widths(k: int) -> list[int]:
    """How many log-prob steps of a position each `STEP_COLUMNS` column holds, for top-k width ``k``."""
    ends = (*STEP_COLUMNS[1:], k)
    return [max(0, min(end, k) - start) for start, end in zip(STEP_COLUMNS, ends)]


def write_shard(path: Path, prompt_ids: list[str], splits: list[str], generations: list[Generation]) -> None:
    """Write one shard (format `FORMAT_VERSION`) atomically: a temporary file in the same folder, renamed when done.

    ``prompt_ids[i]`` and ``splits[i]`` belong to ``generations[i]`` (one entry per row). Every row with top-k
    has the same k.
    """
    top_ids = [None if g.top_k_ids is None else np.asarray(g.top_k_ids, dtype=np.int64) for g in generations]
    k = max((ids.shape[-1] for ids in top_ids if ids is not None and ids.ndim == 2), default=0)
    top_ids = [None if ids is None else ids.reshape(len(ids), k) for ids in top_ids]  # [positions, k], even if empty
    present = [ids.ravel() for ids in top_ids if ids is not None]
    frequent, octaves = frequent_ids(np.concatenate(present) if present else np.zeros(0, dtype=np.int64))
    tokens, codes, first, steps, tails = [], [], [], [[] for _ in STEP_COLUMNS], []
    for row, (generation, ids) in enumerate(zip(generations, top_ids)):
        where = f"{path.name}, row {row} ({prompt_ids[row]!r})"
        token_ids = np.asarray(generation.token_ids, dtype=np.int64)
        if ids is not None and k and len(ids) == len(token_ids):
            token_ids = token_ids - ids[:, 0]  # 0 wherever the answer took the teacher's argmax (greedy: always)
        tokens.append(token_ids)
        if ids is None:
            codes.append(None)
            first.append(None)
            for column in steps:
                column.append(None)
        else:
            values = logprob_codes(generation.top_k_logprobs, where).reshape(ids.shape)
            codes.append(encode_ids(ids, frequent))
            first.append(values[:, 0] if k else np.zeros(len(ids), dtype=np.int64))
            differences = np.diff(values, axis=1)  # codes lie in [0, NEG_INF]: every step fits in int32
            for column, start, width in zip(steps, STEP_COLUMNS, _step_widths(k)):
                column.append(differences[:, start - 1 : start - 1 + width])
        tails.append(None if generation.tail_logprobs is None else logprob_codes(generation.tail_logprobs, where))
    columns = [
        pa.array(prompt_ids, type=pa.string()),
        pa.array(splits, type=pa.string()),
        pa.array([g.sample_index for g in generations], type=pa.int32()),
        pa.array([g.text for g in generations], type=pa.string()),
        _list_column(tokens),
        _list_column(codes),
        _list_column(first),
        *[_list_column(column) for column in steps],
        _list_column(tails),
    ]
    metadata = {
        b"stillhouse.format": str(FORMAT_VERSION).encode(),
        b"stillhouse.top_k": str(k).encode(),
        b"stillhouse.logprob_step": repr(LOGPROB_STEP).encode(),
        b"stillhouse.frequent_id_octaves": ",".join(map(str, octaves)).encode(),
        b"stillhouse.frequent_ids": pack_frequent_ids(frequent, octaves),
    }
    table = pa.Table.from_arrays(columns, schema=SCHEMA)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # per process: two writers never share one
    with pq.ParquetWriter(
        temporary,
        SCHEMA,
        compression="zstd",
        compression_level=ZSTD_LEVEL,
        use_dictionary=["prompt_id", "split"],
        column_encoding=BYTE_STREAM_SPLIT,
        store_schema=False,  # the Arrow schema would repeat the metadata; the Parquet types hold all of it
    ) as writer:
        writer.write_table(table)
        writer.add_key_value_metadata(metadata)
    os.replace(temporary, path)


def remove_partial_shards(folder: Path) -> int:
    """Delete temporary shard files a killed run left behind; returns how many there were."""
    partial = list(Path(folder).glob(".shard-*.tmp"))
    for path in partial:
        path.unlink(missing_ok=True)
    return len(partial)


def shard_format(schema: pa.Schema) -> int:
    """The format a shard was written in: 1 (float16 log-probs, int32 ids) or 2 (see the module docstring)."""
    metadata = schema.metadata or {}
    if b"stillhouse.format" in metadata:
        return int(metadata[b"stillhouse.format"])
    return 1


def _flat(column: pa.ChunkedArray, dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A list column as (flat values, row offsets into them, null rows)."""
    rows = column.combine_chunks()
    values = rows.flatten()
    if pa.types.is_list(values.type):
        values = values.flatten()
    offsets = rows.offsets.to_numpy() - rows.offsets[0].as_py()
    return values.to_numpy(zero_copy_only=False).astype(dtype), offsets, rows.is_null().to_numpy(zero_copy_only=False)


def _per_row(values: np.ndarray, offsets: np.ndarray, nulls: np.ndarray) -> list:
    """Rows ``values[offsets[i] : offsets[i + 1]]`` (along the first axis), None for null rows."""
    return [None if null else values[offsets[row] : offsets[row + 1]] for row, null in enumerate(nulls)]


def _decode_shard(table: pa.Table) -> pd.DataFrame:
    """One shard's rows in the reader's shape (see the module docstring), from either format."""
    frame = table.select(["prompt_id", "split", "sample_index", "response_text"]).to_pandas()
    tokens, token_offsets, _ = _flat(table.column("response_token_ids"), np.int32)
    if shard_format(table.schema) == 1:
        id_rows = table.column("top_k_ids").combine_chunks()
        position_offsets = id_rows.offsets.to_numpy() - id_rows.offsets[0].as_py()
        nulls = id_rows.is_null().to_numpy(zero_copy_only=False)
        ids, _, _ = _flat(table.column("top_k_ids"), np.int32)
        positions = len(id_rows.flatten())
        k = len(ids) // positions if positions else 0
        ids = ids.reshape(positions, k)
        values = _flat(table.column("top_k_logprobs"), np.float32)[0].reshape(positions, k)
        tail_values, tail_offsets, tail_nulls = _flat(table.column("tail_logprobs"), np.float32)
    else:
        metadata = table.schema.metadata
        k = int(metadata[b"stillhouse.top_k"])
        octaves = [int(size) for size in metadata[b"stillhouse.frequent_id_octaves"].decode().split(",") if size]
        frequent = unpack_frequent_ids(metadata[b"stillhouse.frequent_ids"], octaves)
        first, position_offsets, nulls = _flat(table.column("top_k_logprob_first"), np.int64)
        codes, _, _ = _flat(table.column("top_k_id_codes"), np.int64)
        ids = decode_ids(codes, frequent).astype(np.int32).reshape(len(first), k)
        steps = [
            _flat(table.column(f"top_k_logprob_steps_{start}"), np.int64)[0].reshape(len(first), width)
            for start, width in zip(STEP_COLUMNS, _step_widths(k))
        ]
        # Every step fits in int32; their sums, up to NEG_INF, in int64.
        values = logprobs_from_codes(np.concatenate([first[:, None], *steps], axis=1).cumsum(axis=1)[:, :k])
        tail_codes, tail_offsets, tail_nulls = _flat(table.column("tail_logprob_steps"), np.int64)
        tail_values = logprobs_from_codes(tail_codes)
        for row, null in enumerate(nulls):  # tokens were stored relative to each position's top-1 id
            start, end = position_offsets[row], position_offsets[row + 1]
            if not null and k and token_offsets[row + 1] - token_offsets[row] == end - start:
                tokens[token_offsets[row] : token_offsets[row + 1]] += ids[start:end, 0]
    frame["response_token_ids"] = _per_row(tokens, token_offsets, np.zeros(len(frame), dtype=bool))
    frame["top_k_ids"] = _per_row(ids, position_offsets, nulls)
    frame["top_k_logprobs"] = _per_row(values, position_offsets, nulls)
    frame["tail_logprobs"] = _per_row(tail_values, tail_offsets, tail_nulls)
    return frame


def read_shard(path: str | Path) -> pd.DataFrame:
    """One shard's rows, in `read_teacher_outputs`' shape."""
    return _decode_shard(pq.read_table(path))


def read_teacher_outputs(folder: str | Path, split: str | None = None) -> pd.DataFrame:
    """All rows of a teacher-output folder (optionally one split), in shard order, from shards of any format."""
    shards = sorted(Path(folder).glob("shard-*.parquet"))
    frame = pd.concat([_decode_shard(pq.read_table(shard)) for shard in shards], ignore_index=True)
    return frame if split is None else frame[frame["split"] == split].reset_index(drop=True)
