"""Resume after kill -9: a sampling process killed mid-run, rerun, ends equal to an uninterrupted run."""

from pathlib import Path

import pyarrow.parquet as pq
import pytest
from kill9 import run_then_kill

from stillhouse.config import CurateConfig, SampleConfig
from stillhouse.data.curate import curate
from stillhouse.sampling.sample import sample_teacher
from stillhouse.sampling.teacher_outputs import read_teacher_outputs
from stillhouse.store import MANIFEST, Store

pytestmark = pytest.mark.slow

CHILD = """
import sys, torch
torch.set_num_threads(1)
from stillhouse.config import SampleConfig
from stillhouse.refs import DatasetRef
from stillhouse.sampling.sample import sample_teacher
from stillhouse.store import Store
config = SampleConfig.model_validate_json(open(sys.argv[1]).read())
dataset = DatasetRef.model_validate_json(open(sys.argv[2]).read())
sample_teacher(config, dataset, Store(sys.argv[3]))
"""


def test_a_killed_run_resumes_with_only_the_missing_shards_and_the_same_content(tmp_path, tiny_teacher, prompts_jsonl):
    dataset = curate(CurateConfig(source=str(prompts_jsonl)), Store(tmp_path / "curated"))
    # Sampled (not greedy) with a seed: the resumed shards must draw exactly what an uninterrupted run draws.
    config = SampleConfig(
        teacher=str(tiny_teacher),
        max_new_tokens=8,
        temperature=1.0,
        seed=5,
        top_k_logprobs=3,
        shard_rows=10,
        batch_size=1,
    )
    (tmp_path / "config.json").write_text(config.model_dump_json())
    (tmp_path / "dataset.json").write_text(dataset.model_dump_json())
    killed_root = tmp_path / "killed"
    run_then_kill(
        CHILD,
        [str(tmp_path / "config.json"), str(tmp_path / "dataset.json"), str(killed_root)],
        ready=lambda: len(list(killed_root.glob("sample/*/shard-*.parquet"))) >= 2,
        what="sampling",
    )
    (folder,) = (killed_root / "sample").iterdir()
    assert not (folder / MANIFEST).exists(), "the run finished before it was killed; the test needs a slower run"
    survivors = {path.name: path.stat().st_mtime_ns for path in folder.glob("shard-*.parquet")}
    assert 2 <= len(survivors) < 12
    (folder / ".shard-00011.parquet.999.tmp").write_bytes(b"half a shard")  # what a kill mid-write leaves

    resumed = sample_teacher(config, dataset, Store(killed_root))
    assert not resumed.cached
    assert {
        name: (folder / name).stat().st_mtime_ns for name in survivors
    } == survivors  # finished shards were not redone
    assert not list(folder.glob(".*.tmp"))
    uninterrupted = sample_teacher(config, dataset, Store(tmp_path / "uninterrupted"))
    assert (
        uninterrupted.fingerprint == resumed.fingerprint
        and uninterrupted.rows == resumed.rows == dataset.train_rows + dataset.eval_rows
    )
    got, want = read_teacher_outputs(resumed.path), read_teacher_outputs(uninterrupted.path)
    assert not got.duplicated(["prompt_id", "sample_index"]).any()
    shards = sorted(path.name for path in folder.glob("shard-*.parquet"))
    assert (
        shards == sorted(path.name for path in Path(uninterrupted.path).glob("shard-*.parquet")) and len(shards) == 12
    )
    for name in shards:
        assert pq.read_table(folder / name).equals(pq.read_table(Path(uninterrupted.path) / name)), name
    assert got.equals(want)
