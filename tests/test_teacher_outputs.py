"""The teacher-output store: format 2 round-trips ids exactly and log-probs within 1e-3 at any magnitude, format-1
shards written before still read the same, and both come back in the shape the trainer reads."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from stillhouse.sampling.engine import Generation
from stillhouse.sampling.teacher_outputs import (
    FORMAT_VERSION,
    SCHEMA_V1,
    decode_ids,
    encode_ids,
    frequent_ids,
    read_teacher_outputs,
    shard_format,
    write_shard,
)


def teacher_generations(count: int, k: int, vocab: int, seed: int, sampled: bool = False) -> list[Generation]:
    """Top-k of real softmaxes over ``vocab`` (a Zipf-like prior plus noise), answers of mixed length (one empty)."""
    generator = torch.Generator().manual_seed(seed)
    prior = (
        -1.1 * torch.log(torch.arange(1, vocab + 1, dtype=torch.float32))[torch.randperm(vocab, generator=generator)]
    )
    generations = []
    for row in range(count):
        length = 0 if row == 1 else int(torch.randint(1, 40, (1,), generator=generator))
        logprobs = (prior + 4.0 * torch.randn(length, vocab, generator=generator)).log_softmax(-1)
        values, ids = logprobs.topk(k, dim=-1)
        tails = torch.logsumexp(logprobs.scatter(-1, ids, float("-inf")), dim=-1)
        tokens = ids[:, 0].tolist() if not sampled else torch.randint(0, vocab, (length,), generator=generator).tolist()
        generations.append(
            Generation(
                token_ids=tokens,
                text=f"answer {row}",
                top_k_ids=ids.tolist(),
                top_k_logprobs=values.tolist(),
                tail_logprobs=tails.tolist(),
                sample_index=row % 2,
            )
        )
    return generations


def write_and_read(tmp_path, generations: list[Generation]):
    path = tmp_path / "shard-00000.parquet"
    write_shard(path, [f"p{i}" for i in range(len(generations))], ["train"] * len(generations), generations)
    return path, read_teacher_outputs(tmp_path)


def assert_rows_match(rows, generations: list[Generation], tolerance: float) -> None:
    assert list(rows.columns) == [
        "prompt_id",
        "split",
        "sample_index",
        "response_text",
        "response_token_ids",
        "top_k_ids",
        "top_k_logprobs",
        "tail_logprobs",
    ]
    for row, generation in zip(rows.itertuples(), generations):
        assert row.response_text == generation.text and row.sample_index == generation.sample_index
        assert row.response_token_ids.dtype == np.int32 and row.response_token_ids.tolist() == generation.token_ids
        if generation.top_k_ids is None:
            assert row.top_k_ids is None and row.top_k_logprobs is None
            continue
        k = len(generation.top_k_ids[0]) if generation.top_k_ids else row.top_k_ids.shape[1]
        assert row.top_k_ids.dtype == np.int32 and row.top_k_ids.shape == (len(generation.top_k_ids), k)
        assert row.top_k_ids.tolist() == generation.top_k_ids  # lossless
        assert row.top_k_logprobs.dtype == np.float32 and row.top_k_logprobs.shape == row.top_k_ids.shape
        expected = np.asarray(generation.top_k_logprobs, dtype=np.float64).reshape(row.top_k_logprobs.shape)
        np.testing.assert_array_equal(np.isneginf(row.top_k_logprobs), np.isneginf(expected))
        finite = np.isfinite(expected)
        assert np.abs(row.top_k_logprobs[finite] - expected[finite]).max(initial=0) <= tolerance
        tails = np.asarray(generation.tail_logprobs, dtype=np.float64)
        assert row.tail_logprobs.dtype == np.float32 and row.tail_logprobs.shape == tails.shape
        np.testing.assert_array_equal(np.isneginf(row.tail_logprobs), np.isneginf(tails))
        assert np.abs(row.tail_logprobs[np.isfinite(tails)] - tails[np.isfinite(tails)]).max(initial=0) <= tolerance


@pytest.mark.parametrize(
    ("k", "vocab", "sampled"), [(5, 300, False), (16, 70_000, True), (1, 50, False)], ids=["small", "big-vocab", "k1"]
)
def test_format_2_keeps_ids_exact_and_logprobs_within_1e_3(tmp_path, k, vocab, sampled):
    generations = teacher_generations(12, k, vocab, seed=k, sampled=sampled)
    path, rows = write_and_read(tmp_path, generations)
    assert shard_format(pq.read_schema(path)) == FORMAT_VERSION == 2
    assert_rows_match(rows, generations, tolerance=1e-3)
    # The trainer's use: per position a list of ints and a list of floats.
    first = rows.iloc[0]
    assert [list(ids) for ids in first.top_k_ids] == generations[0].top_k_ids
    assert all(isinstance(value, float) for value in np.asarray(first.top_k_logprobs[0]).tolist())


def test_logprobs_far_below_zero_and_minus_infinity_round_trip(tmp_path):
    # float16 (format 1) is off by up to 4e-3 below -8 and by 0.03 below -64; fixed point is not.
    deep = [[-0.01, -8.3337, -12.34567, -63.9, -150.0001, float("-inf")], [-1e-6, -1e-6, -2.0, -2.0, -3.0, -3.5]]
    assert abs(float(np.float16(-12.34567)) + 12.34567) > 1e-3
    generations = [
        Generation(
            token_ids=[7, 3],
            text="deep",
            top_k_ids=[[7, 1, 2, 3, 4, 5], [9, 8, 7, 6, 5, 4]],
            top_k_logprobs=deep,
            tail_logprobs=[float("-inf"), -4.00049],
        ),
        Generation(token_ids=[1, 2, 3], text="no top-k"),  # a row without top-k (k = 0 runs, or other engines)
    ]
    _, rows = write_and_read(tmp_path, generations)
    assert_rows_match(rows, generations, tolerance=1e-3)
    assert rows.iloc[0].top_k_logprobs[0, -1] == float("-inf") and rows.iloc[0].tail_logprobs[0] == float("-inf")


def test_nan_logprobs_are_refused_with_the_row_named(tmp_path):
    generation = Generation(token_ids=[1], text="x", top_k_ids=[[1, 2]], top_k_logprobs=[[-0.1, float("nan")]])
    generation.tail_logprobs = [-3.0]
    with pytest.raises(ValueError, match=r"shard-00000.parquet, row 0 \('p0'\): the teacher gave NaN"):
        write_and_read(tmp_path, [generation])
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_id_codes_invert_and_give_frequent_ids_small_codes():
    generator = np.random.default_rng(0)
    ids = np.concatenate([generator.integers(0, 100_000, 5_000), np.repeat([99_999, 5, 70_000], 300)])
    frequent, octaves = frequent_ids(ids)
    assert sum(octaves) == len(frequent) and set(frequent[:3]) == {5, 70_000, 99_999}
    codes = encode_ids(ids, frequent)
    np.testing.assert_array_equal(decode_ids(codes, frequent), ids)
    assert set(codes[np.isin(ids, frequent)]) == set(range(len(frequent)))
    assert len(np.unique(codes)) == len(np.unique(ids))
    empty = np.zeros(0, dtype=np.int64)
    np.testing.assert_array_equal(decode_ids(encode_ids(ids, empty), empty), ids)


def write_format_1_shard(path, generations: list[Generation]) -> None:
    """A shard exactly as the writer before format 2 wrote it (int32 ids, float16 log-probs and tails)."""
    columns = {
        "prompt_id": [f"old{i}" for i in range(len(generations))],
        "split": ["eval"] * len(generations),
        "sample_index": [g.sample_index for g in generations],
        "response_text": [g.text for g in generations],
        "response_token_ids": [g.token_ids for g in generations],
        "top_k_ids": [g.top_k_ids for g in generations],
        "top_k_logprobs": [
            None if g.top_k_logprobs is None else list(np.asarray(g.top_k_logprobs, dtype=np.float16))
            for g in generations
        ],
        "tail_logprobs": [
            None if g.tail_logprobs is None else np.asarray(g.tail_logprobs, dtype=np.float16) for g in generations
        ],
    }
    pq.write_table(pa.table(columns, schema=SCHEMA_V1), path, compression="zstd")


def test_format_1_shards_read_as_before_next_to_format_2(tmp_path):
    old = teacher_generations(5, 4, 500, seed=1)
    write_format_1_shard(tmp_path / "shard-00000.parquet", old)
    new = teacher_generations(3, 4, 500, seed=2)
    write_shard(tmp_path / "shard-00001.parquet", ["n0", "n1", "n2"], ["train"] * 3, new)
    assert shard_format(pq.read_schema(tmp_path / "shard-00000.parquet")) == 1
    rows = read_teacher_outputs(tmp_path)
    assert rows["prompt_id"].tolist() == ["old0", "old1", "old2", "old3", "old4", "n0", "n1", "n2"]
    # Format 1 held float16: its values come back exactly as stored, as float32.
    float16 = [
        Generation(
            token_ids=g.token_ids,
            text=g.text,
            top_k_ids=g.top_k_ids,
            top_k_logprobs=np.asarray(g.top_k_logprobs, dtype=np.float16).astype(np.float64).tolist(),
            tail_logprobs=np.asarray(g.tail_logprobs, dtype=np.float16).astype(np.float64).tolist(),
            sample_index=g.sample_index,
        )
        for g in old
    ]
    assert_rows_match(rows.iloc[:5], float16, tolerance=0.0)
    assert_rows_match(rows.iloc[5:], new, tolerance=1e-3)
    assert read_teacher_outputs(tmp_path, split="eval")["prompt_id"].tolist() == [f"old{i}" for i in range(5)]


def test_format_2_is_smaller_than_format_1_on_the_same_rows(tmp_path):
    generations = teacher_generations(24, 32, 32_000, seed=3)
    write_format_1_shard(tmp_path / "old.parquet", generations)
    write_shard(tmp_path / "new.parquet", [f"p{i}" for i in range(24)], ["train"] * 24, generations)
    assert (tmp_path / "new.parquet").stat().st_size < 0.8 * (tmp_path / "old.parquet").stat().st_size
