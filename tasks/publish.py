"""Publishing as Prefect tasks: the folder is sealed in the store; the Hub push retries on I/O errors."""

from __future__ import annotations

import time
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from registry.model_registry import RegisteredModel
from registry.publish import PublishedModel, push_folder, write_publish_folder
from registry.tracking import TrackingContext, log_stage
from stillhouse.config import PipelineConfig
from stillhouse.refs import DatasetRef, EvalReport, ModelRef, SamplesRef
from stillhouse.store import Store, fingerprint


@task(name="push-to-hub", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=[2, 5, 15])
def push_task(folder: str, config: PipelineConfig) -> PublishedModel:
    return push_folder(Path(folder), config)


@task(name="publish", cache_policy=NO_CACHE)
def publish_task(
    config: PipelineConfig, dataset: DatasetRef, samples: SamplesRef, student: ModelRef, report: EvalReport,
    registered: RegisteredModel | None, tracking: TrackingContext,
) -> PublishedModel:
    started = time.perf_counter()
    store = Store(config.store)
    publish_fingerprint = fingerprint("publish", config.publish.model_dump(mode="json", exclude={"token_env"}),
                                      {"student": student.fingerprint, "evaluate": report.fingerprint}, 1)
    provenance = {
        "mlflow": {"tracking_uri": tracking.tracking_uri, "run_id": tracking.parent_run_id,
                   "registered_model": registered.model_dump(exclude={"cached"}) if registered else None},
        "teacher": {"id": config.sample.teacher, "revision": samples.teacher_revision},
        "store": config.store,
    }

    def compute(stage_folder: Path) -> dict:
        folder = write_publish_folder(stage_folder / config.name, config, dataset, samples, student, report, provenance)
        pushed = push_task(str(folder), config) if config.publish.repo_id else PublishedModel(folder=str(folder))
        return pushed.model_dump()

    # Sealed like any stage: an unchanged rerun neither rewrites the folder nor pushes a new commit.
    output = store.build("publish", publish_fingerprint, compute)
    published = PublishedModel.model_validate({**output.manifest, "cached": output.cached})
    get_run_logger().info("publish: %s %s", "reused" if output.cached else "wrote", published.folder)
    log_stage(tracking, "publish", fingerprint=publish_fingerprint, cached=output.cached, seconds=time.perf_counter() - started,
              params=config.publish.model_dump(mode="json"), tags={"folder": published.folder, "repo_id": published.repo_id or "", "commit": published.commit_oid or ""})
    return published
