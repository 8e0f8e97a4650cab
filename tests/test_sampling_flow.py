"""The sampling flow: shards as mapped Prefect tasks (threads, or a local Ray cluster), the `gpu` limit, progress,
resume."""

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from stillhouse.config import parse_config
from stillhouse.data.curate import curate
from stillhouse.sampling.sample import sample_teacher
from stillhouse.store import MANIFEST, Store

pytestmark = pytest.mark.slow


def same_shards(a: str, b: str) -> bool:
    names = sorted(p.name for p in Path(a).glob("shard-*.parquet"))
    return names == sorted(p.name for p in Path(b).glob("shard-*.parquet")) and all(
        pq.read_table(Path(a) / n).equals(pq.read_table(Path(b) / n)) for n in names
    )


def test_shards_run_as_mapped_tasks_under_the_gpu_limit_with_progress_and_resume(
    prefect_harness, pipeline_raw, tmp_path
):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterId,
    )
    from prefect.client.schemas.sorting import FlowRunSort

    from stillhouse.tasks.sample import sample_task

    pipeline_raw["sample"].update(
        shard_rows=30, task_runner={"kind": "threads", "max_workers": 2, "gpu_concurrency": 2}
    )
    config = parse_config(pipeline_raw)
    dataset = curate(config.curate, Store.from_config(config.store))
    samples = sample_task(config, dataset, None)
    assert not samples.cached and samples.rows == dataset.train_rows + dataset.eval_rows
    in_process = sample_teacher(config.sample, dataset, Store(tmp_path / "in-process"))
    assert in_process.fingerprint == samples.fingerprint and same_shards(samples.path, in_process.path)

    with get_client(sync_client=True) as client:
        assert client.read_concurrency_limit_by_tag("gpu").concurrency_limit >= 1
        (flow_run,) = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["sample-teacher"])),
            sort=FlowRunSort.START_TIME_DESC,
            limit=1,
        )
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id]))
        )
    shard_runs = [run for run in runs if run.name.startswith("sample-shard")]
    assert len(shard_runs) == 4 and all("gpu" in run.tags for run in shard_runs)
    (progress,) = [a for a in artifacts if a.key == "sample-progress"]
    assert progress.data == 100.0 and progress.description.startswith("Teacher sampling: 4/4 shards, ")

    # A run killed before its manifest and its last shard were written: the flow samples that shard only.
    folder = Path(samples.path)
    (folder / MANIFEST).unlink()
    (folder / "shard-00003.parquet").unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in folder.glob("shard-*.parquet")}
    resumed = sample_task(config, dataset, None)
    assert not resumed.cached and {n: (folder / n).stat().st_mtime_ns for n in kept} == kept
    assert same_shards(resumed.path, in_process.path)
    assert sample_task(config, dataset, None).cached


def test_sampling_on_a_local_two_cpu_ray_cluster(prefect_harness, pipeline_raw, tmp_path):
    pytest.importorskip("prefect_ray")
    import ray

    from stillhouse.tasks.sample import sample_task

    pipeline_raw["sample"].update(shard_rows=60, task_runner={"kind": "ray", "ray_num_cpus": 2, "gpus_per_shard": 0})
    config = parse_config(pipeline_raw)
    dataset = curate(config.curate, Store.from_config(config.store))
    try:
        samples = sample_task(config, dataset, None)
    finally:
        ray.shutdown()
    in_process = sample_teacher(config.sample, dataset, Store(tmp_path / "in-process"))
    assert samples.rows == in_process.rows and same_shards(samples.path, in_process.path)
