"""Curation as a Prefect task: counts to MLflow and a markdown artifact."""

from __future__ import annotations

import time

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from registry.tracking import TrackingContext, log_stage
from stillhouse.config import PipelineConfig
from stillhouse.data.curate import curate
from stillhouse.refs import DatasetRef
from stillhouse.store import Store
from tasks.reporting import log_outcome


@task(name="curate", cache_policy=NO_CACHE)
def curate_task(config: PipelineConfig, tracking: TrackingContext) -> DatasetRef:
    started = time.perf_counter()
    dataset = curate(config.curate, Store(config.store))
    seconds = time.perf_counter() - started
    log_outcome("curate", dataset, seconds)
    log_stage(tracking, "curate", fingerprint=dataset.fingerprint, cached=dataset.cached, seconds=seconds,
              params=config.curate.model_dump(mode="json"), metrics=dataset.counts)
    create_markdown_artifact(
        "| | rows |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in dataset.counts.items()),
        key="curation-counts", description="Rows in and out of curation",
    )
    return dataset
