"""Engine `vllm` with tensor/pipeline parallelism and data-parallel replicas, on REAL Ray without a GPU.

What is real here: Ray (a local cluster that declares 4 logical GPUs on this CPU-only machine, as
``ray.init(num_gpus=4)`` allows), its placement groups (one per replica, STRICT_PACK, one-GPU bundles),
the replica actors placed in them and the GPU ids Ray assigns; and all of stillhouse's side: the checks,
the shard plan, the work queue that hands shards to replicas, the Parquet shards and the manifest.

What is NOT real: vLLM. A stand-in package (tests/fake_vllm/vllm, put on the actors' path through Ray's
runtime_env) takes its place. It records the arguments `vllm.LLM` was built with; for the `ray` executor it
starts one worker per bundle of the placement group it runs in, as vLLM's Ray executor does, so the GPU ids
it records are the ones Ray would give vLLM's workers; and it generates tokens from a hash of (prompt, seed)
instead of running a model. Whether real vLLM honours these settings on real GPUs is for the gpu-marked
tests (test_sampling_vllm.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from stillhouse.config import CurateConfig, SampleConfig, parse_config
from stillhouse.data.curate import curate
from stillhouse.errors import InputError
from stillhouse.sampling import vllm_engine
from stillhouse.sampling.sample import (
    SHARD_SEED_STRIDE,
    check_teacher,
    load_engine,
    plan_shards,
    sample_teacher,
    unload_engines,
)
from stillhouse.store import Store

ray = pytest.importorskip("ray")

FAKE_VLLM = Path(__file__).parent / "fake_vllm"
GPUS = 4


@pytest.fixture(scope="module")
def fake_vllm_log(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fake-vllm-log")


@pytest.fixture(scope="module")
def ray_cluster(fake_vllm_log):
    """A local Ray cluster with 4 logical GPUs and 2 CPUs; its workers import the stand-in `vllm`."""
    if ray.is_initialized():
        ray.shutdown()
    ray.init(
        num_gpus=GPUS,
        num_cpus=2,
        include_dashboard=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(FAKE_VLLM), "FAKE_VLLM_LOG": str(fake_vllm_log)}},
    )
    yield
    unload_engines()
    ray.shutdown()


@pytest.fixture
def events(fake_vllm_log):
    """Read the stand-in's events written since the test started."""
    for old in fake_vllm_log.glob("*.jsonl"):
        old.unlink()

    def read(kind: str) -> list[dict]:
        lines = [json.loads(line) for path in fake_vllm_log.glob("*.jsonl") for line in path.read_text().splitlines()]
        return [line for line in lines if line["event"] == kind]

    yield read
    unload_engines()  # the replicas of this test give their GPUs back


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, prompts_jsonl):
    return curate(CurateConfig(source=str(prompts_jsonl)), Store(tmp_path_factory.mktemp("curated")))


def vllm_config(teacher: Path, **parallel) -> SampleConfig:
    return SampleConfig(
        teacher=str(teacher),
        engine="vllm",
        max_new_tokens=8,
        top_k_logprobs=4,
        shard_rows=12,
        seed=3,
        gpu_memory_utilization=0.5,
        vllm={"max_model_len": 96, "enable_prefix_caching": False, **parallel},
    )


def same_shards(a: str, b: str) -> bool:
    names = sorted(p.name for p in Path(a).glob("shard-*.parquet"))
    return bool(names) and all(pq.read_table(Path(a) / n).equals(pq.read_table(Path(b) / n)) for n in names)


@pytest.mark.parametrize(
    "tensor, pipeline, replicas",
    [
        pytest.param(2, 1, 2, id="tp2-x2-replicas"),
        pytest.param(1, 2, 2, id="pp2-x2-replicas", marks=pytest.mark.slow),
        pytest.param(1, 1, 4, id="one-gpu-x4-replicas", marks=pytest.mark.slow),
    ],
)
def test_replicas_get_their_own_gpus_every_shard_once_and_the_single_engines_answers(
    ray_cluster, events, dataset, tiny_teacher, tmp_path, monkeypatch, tensor, pipeline, replicas
):
    config = vllm_config(tiny_teacher, tensor_parallel_size=tensor, pipeline_parallel_size=pipeline, replicas=replicas)
    world = tensor * pipeline
    samples = sample_teacher(config, dataset, Store(tmp_path / "replicas"))

    # The settings reach vllm.LLM, once per replica; several GPUs per replica run vLLM's Ray executor.
    loads = events("load")
    assert len(loads) == replicas
    expected = {
        "model": str(tiny_teacher),
        "revision": None,
        "dtype": "float32",
        "seed": 3,
        "gpu_memory_utilization": 0.5,
        "max_logprobs": 20,
        "tensor_parallel_size": tensor,
        "pipeline_parallel_size": pipeline,
        "max_model_len": 96,
        "enable_prefix_caching": False,
    }
    if world > 1:
        expected["distributed_executor_backend"] = "ray"
    assert all(load["options"] == expected for load in loads)

    # Each replica: its own placement group of `world` one-GPU bundles on one node, and `world` GPUs no other
    # replica has.
    engine, _ = load_engine(config, plan_shards(config, dataset, Store(tmp_path / "replicas")).teacher)
    groups = {placement["placement_group"] for placement in engine.placements}
    assert len(groups) == replicas and {load["placement_group"] for load in loads} == groups
    for group in engine.groups:
        table = ray.util.placement_group_table(group)
        assert table["strategy"] == "STRICT_PACK" and list(table["bundles"].values()) == [{"GPU": 1.0}] * world
    gpus = [load["gpu_ids"] for load in loads]
    assert all(len(ids) == len(set(ids)) == world for ids in gpus)
    assert len({gpu for ids in gpus for gpu in ids}) == world * replicas  # no GPU shared between replicas

    # Every shard sampled exactly once, and every replica sampled some.
    calls = events("generate")
    shards = sorted((call["seed"] - config.seed) // SHARD_SEED_STRIDE for call in calls)
    plan_size = -(-(dataset.train_rows + dataset.eval_rows) // config.shard_rows)
    assert shards == list(range(plan_size))
    replica_of_pid = {load["pid"]: load["placement_group"] for load in loads}
    assert {replica_of_pid[call["pid"]] for call in calls} == groups

    # One engine in this process (the stand-in on this process's path; this machine has no GPU, so the
    # check is told there is one) writes the same shards under the same fingerprint.
    monkeypatch.syspath_prepend(str(FAKE_VLLM))
    monkeypatch.setattr(vllm_engine, "vllm_available", lambda: True)
    monkeypatch.setattr(vllm_engine, "local_gpu_count", lambda: world)
    single = sample_teacher(
        vllm_config(tiny_teacher, tensor_parallel_size=tensor, pipeline_parallel_size=pipeline),
        dataset,
        Store(tmp_path / "single"),
    )
    unload_engines()
    for name in [name for name in sys.modules if name == "vllm" or name.startswith("vllm.")]:
        monkeypatch.delitem(sys.modules, name)
    assert single.fingerprint == samples.fingerprint and single.rows == samples.rows
    assert same_shards(samples.path, single.path)


def test_more_gpus_than_the_cluster_has_are_refused_before_anything_loads(ray_cluster, events, tiny_teacher):
    with pytest.raises(
        InputError,
        match=r"sample.vllm needs 6 GPUs \(tensor_parallel_size 2 x pipeline_parallel_size 1 x replicas 3\), "
        r"but the running Ray cluster has 4; lower sample.vllm.replicas",
    ):
        check_teacher(vllm_config(tiny_teacher, tensor_parallel_size=2, replicas=3))
    assert events("load") == []
    check_teacher(vllm_config(tiny_teacher, tensor_parallel_size=2, replicas=2))  # 4 of 4 fits


def test_one_local_engine_is_counted_against_this_machines_gpus(tiny_teacher, monkeypatch):
    monkeypatch.setattr(vllm_engine, "vllm_available", lambda: True)  # vLLM "installed"; its GPUs counted as 1
    monkeypatch.setattr(vllm_engine, "local_gpu_count", lambda: 1)
    with pytest.raises(
        InputError, match=r"sample.vllm needs 2 GPUs .* but this machine \(torch.cuda.device_count\(\)\)"
    ):
        check_teacher(vllm_config(tiny_teacher, pipeline_parallel_size=2))


def test_max_model_len_bounds_the_context_and_is_all_of_vllms_settings_in_the_fingerprint(
    tiny_teacher, dataset, monkeypatch
):
    from stillhouse.sampling.sample import stage_fingerprint

    monkeypatch.setattr(vllm_engine, "vllm_available", lambda: True)
    monkeypatch.setattr(vllm_engine, "local_gpu_count", lambda: 8)
    assert check_teacher(vllm_config(tiny_teacher)).context_length == 96  # the model's own is 128
    with pytest.raises(InputError, match=r"max_new_tokens: 8 leaves no room for a prompt .* context of 8 tokens"):
        check_teacher(vllm_config(tiny_teacher, max_model_len=8))
    one = stage_fingerprint(vllm_config(tiny_teacher), dataset, "r")
    # Where it runs (GPUs, replicas, the cluster, prefix caching) doesn't change what is sampled.
    spread = vllm_config(
        tiny_teacher, tensor_parallel_size=2, replicas=4, ray_address="auto", enable_prefix_caching=True
    )
    assert stage_fingerprint(spread, dataset, "r") == one
    assert stage_fingerprint(vllm_config(tiny_teacher, max_model_len=64), dataset, "r") != one


@pytest.mark.slow
def test_the_sampling_flow_feeds_the_replicas_from_threads_without_the_gpu_tag(
    ray_cluster, events, prefect_harness, pipeline_raw
):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    from stillhouse.tasks.sample import sample_task

    pipeline_raw["sample"].update(
        engine="vllm",
        shard_rows=30,
        vllm={"replicas": 2, "tensor_parallel_size": 2},
        # Ignored for replicas: shard tasks are threads of this process, not Ray tasks holding GPUs.
        task_runner={"kind": "ray", "gpus_per_shard": 1},
    )
    config = parse_config(pipeline_raw)
    dataset = curate(config.curate, Store.from_config(config.store))
    samples = sample_task(config, dataset, None)
    assert samples.rows == dataset.train_rows + dataset.eval_rows
    assert len(events("load")) == 2 and len({call["pid"] for call in events("generate")}) == 2

    with get_client(sync_client=True) as client:
        (flow_run,) = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["sample-teacher"])),
            sort=FlowRunSort.START_TIME_DESC,
            limit=1,
        )
        runs = client.read_task_runs()
    shard_runs = [run for run in runs if run.flow_run_id == flow_run.id and run.name.startswith("sample-shard")]
    assert len(shard_runs) == 4 and all("gpu" not in run.tags for run in shard_runs)
