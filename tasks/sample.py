"""Teacher sampling as a Prefect flow: one mapped task per shard, on threads here or on a Ray cluster.

    sample_flow(config, dataset, tracking)      # called by flows/distill.py as a subflow

The core plans the shards (`plan_shards`), each shard task samples one and writes it atomically
(`sample_shard`), and the manifest is written last (`finish_sampling`), so a rerun after a crash
samples only what is missing. Shard tasks carry the tag `gpu`: a Prefect tag concurrency limit on it
(created at `sample.task_runner.gpu_concurrency` when the server has none) bounds shards in flight.
A progress artifact shows shards done / total and tokens/s.

vLLM replicas (``sample.vllm.replicas`` > 1, or ``sample.vllm.ray_address``) are different: the GPUs
belong to the replicas, Ray actors that the flow's process starts once, each in a placement group of
its own. The shard tasks only feed them (send prompts, write Parquet), so they run on threads in that
process, one per replica, without the `gpu` tag or Ray resources of their own: a Ray-task shard would
load a second set of replicas in its worker, and a tag limit of 1 would leave all but one replica idle.
"""

from __future__ import annotations

import time
from contextlib import nullcontext

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound
from prefect.futures import as_completed
from prefect.logging import get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import unmapped

from stillhouse.config import PipelineConfig, SampleConfig, TaskRunnerConfig
from stillhouse.refs import DatasetRef, SamplesRef
from stillhouse.registry.tracking import TrackingContext, section_params
from stillhouse.sampling.sample import (
    ShardPlan,
    ShardResult,
    concurrent_shards,
    finish_sampling,
    plan_shards,
    sample_shard,
    sampled_before,
    uses_vllm_replicas,
)
from stillhouse.store import Store
from stillhouse.tasks.stage import StageRecord, run_stage

GPU_TAG = "gpu"


def shard_task_runner(settings: SampleConfig):
    """The runner of the shard tasks: threads, one per replica, for vLLM replicas; else `build_task_runner`."""
    if uses_vllm_replicas(settings):
        return ThreadPoolTaskRunner(max_workers=concurrent_shards(settings))
    return build_task_runner(settings.task_runner)


def build_task_runner(settings: TaskRunnerConfig):
    """Threads in this process, or prefect-ray's RayTaskRunner (optional extra `ray`)."""
    if settings.kind == "threads":
        return ThreadPoolTaskRunner(max_workers=settings.max_workers)
    try:
        from prefect_ray import RayTaskRunner
    except ImportError:
        raise ImportError(
            "sample.task_runner.kind is `ray` but prefect-ray is not installed: pip install 'stillhouse[ray]'"
        ) from None
    init_kwargs = {"include_dashboard": False}
    if settings.ray_address is None and settings.ray_num_cpus is not None:
        init_kwargs["num_cpus"] = settings.ray_num_cpus
    return RayTaskRunner(address=settings.ray_address, init_kwargs=init_kwargs)


def ensure_concurrency_limit(tag: str, limit: int) -> int:
    """Create the tag concurrency limit when the server has none; an operator's existing limit wins. Returns it."""
    with get_client(sync_client=True) as client:
        try:
            return client.read_concurrency_limit_by_tag(tag).concurrency_limit
        except ObjectNotFound:
            client.create_concurrency_limit(tag=tag, concurrency_limit=limit)
            return limit


@task(name="sample-shard", tags=[GPU_TAG], cache_policy=NO_CACHE)
def sample_shard_task(config: SampleConfig, dataset: DatasetRef, plan: ShardPlan, index: int) -> ShardResult:
    result = sample_shard(config, dataset, plan, index)
    get_run_logger().info(
        "shard %d: %d rows, %d tokens in %.1fs", index, result.rows, result.generated_tokens, result.seconds
    )
    return result


def _shard_resources(settings: TaskRunnerConfig):
    """Each shard asks Ray for `gpus_per_shard` GPUs; threads need nothing."""
    if settings.kind != "ray":
        return nullcontext()
    from prefect_ray.context import remote_options

    return remote_options(num_gpus=settings.gpus_per_shard, num_cpus=1)


def sample_shards(config: PipelineConfig, dataset: DatasetRef) -> tuple[SamplesRef, ShardPlan]:
    """Sample the missing shards as mapped tasks, then seal the output; returns it and the plan (its counts)."""
    settings = config.sample
    store = Store.from_config(config.store)
    plan = plan_shards(settings, dataset, store)
    if plan.pending:
        shard_task, resources = sample_shard_task, _shard_resources(settings.task_runner)
        if uses_vllm_replicas(settings):
            shard_task, resources = sample_shard_task.with_options(tags=set()), nullcontext()
            get_run_logger().info(
                "sampling %d of %d shards on %d vLLM replicas (one shard in flight per replica)",
                len(plan.pending),
                plan.shards,
                settings.vllm.replicas,
            )
        else:
            limit = ensure_concurrency_limit(GPU_TAG, settings.task_runner.gpu_concurrency)
            get_run_logger().info(
                "sampling %d of %d shards (tag %r limit %d, %s runner)",
                len(plan.pending),
                plan.shards,
                GPU_TAG,
                limit,
                settings.task_runner.kind,
            )
        report = _Progress(plan)
        with resources:
            futures = shard_task.map(unmapped(settings), unmapped(dataset), unmapped(plan), plan.pending)
        for future in as_completed(futures):
            report.shard_done(future.result())
    return finish_sampling(settings, plan, store), plan


@flow(name="sample-teacher", log_prints=True)
def sample_flow(config: PipelineConfig, dataset: DatasetRef, tracking: TrackingContext | None = None) -> SamplesRef:
    """Sample the teacher (only the missing shards) and, with ``tracking``, record the stage."""
    if tracking is None:
        return sample_shards(config, dataset)[0]
    return tracked_sampling(config, dataset, tracking)


@task(name="sample-teacher-reused", cache_policy=NO_CACHE)
def reused_samples_task(config: PipelineConfig, dataset: DatasetRef, tracking: TrackingContext) -> SamplesRef:
    """The sample stage when the store already holds its output: a task, as every other stage is. A subflow's own
    run costs about a second of a cached rerun's eight with nothing to sample."""
    return tracked_sampling(config, dataset, tracking)


def tracked_sampling(config: PipelineConfig, dataset: DatasetRef, tracking: TrackingContext) -> SamplesRef:
    """`sample_shards`, recorded as the stage's MLflow run (with the prompts truncated or skipped as overlong)."""
    counts: dict[str, int] = {}  # prompts truncated or skipped as overlong, from the plan

    def compute() -> SamplesRef:
        samples, plan = sample_shards(config, dataset)
        counts.update(plan.counts)
        return samples

    def record(samples: SamplesRef) -> StageRecord:
        return StageRecord(
            metrics={"rows": samples.rows, "generated_tokens": samples.generated_tokens, **counts},
            tags={"teacher_revision": samples.teacher_revision, "tokenizer_fingerprint": samples.tokenizer_fingerprint},
        )

    return run_stage("sample", tracking, compute, params=section_params(config, "sample"), record=record).result


class _Progress:
    """The Prefect progress artifact: shards done / total and tokens/s of this run, plus a terminal bar."""

    def __init__(self, plan: ShardPlan):
        from tqdm.auto import tqdm

        self.total = plan.shards
        self.done = plan.shards - len(plan.pending)
        self.tokens = 0
        self.started = time.perf_counter()
        self.bar = tqdm(total=self.total, initial=self.done, desc="sample shards", unit="shard")
        self.artifact = create_progress_artifact(
            progress=self._percent(), key="sample-progress", description=self._describe()
        )

    def _percent(self) -> float:
        return round(100 * self.done / max(self.total, 1), 1)

    def _describe(self) -> str:
        rate = self.tokens / max(time.perf_counter() - self.started, 1e-9)
        return f"Teacher sampling: {self.done}/{self.total} shards, {rate:.0f} tokens/s"

    def shard_done(self, result: ShardResult) -> None:
        self.done += 1
        self.tokens += 0 if result.resumed else result.generated_tokens
        self.bar.update(1)
        self.bar.set_postfix_str(self._describe().split(": ", 1)[1])
        update_progress_artifact(self.artifact, progress=self._percent(), description=self._describe())
        if self.done == self.total:
            self.bar.close()
            create_markdown_artifact(key="sample-summary", markdown=f"**{self._describe()}**")


def sample_task(config: PipelineConfig, dataset: DatasetRef, tracking: TrackingContext) -> SamplesRef:
    """The sampling stage as a subflow on the task runner named in config (kept under its old name for callers), or
    a task that reuses the store's complete output."""
    if tracking is not None and sampled_before(config.sample, dataset, Store.from_config(config.store)):
        return reused_samples_task(config, dataset, tracking)
    return sample_flow.with_options(task_runner=shard_task_runner(config.sample))(config, dataset, tracking)
