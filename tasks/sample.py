"""Teacher sampling as a Prefect task, with a progress artifact."""

from __future__ import annotations

import time

from prefect import task
from prefect.cache_policies import NO_CACHE

from registry.tracking import TrackingContext, log_stage
from stillhouse.config import PipelineConfig
from stillhouse.refs import DatasetRef, SamplesRef
from stillhouse.sampling.sample import sample_teacher
from stillhouse.store import Store
from tasks.reporting import log_outcome, progress_artifact


@task(name="sample-teacher", cache_policy=NO_CACHE)
def sample_task(config: PipelineConfig, dataset: DatasetRef, tracking: TrackingContext) -> SamplesRef:
    started = time.perf_counter()
    samples = sample_teacher(config.sample, dataset, Store(config.store), progress=progress_artifact("Teacher sampling"))
    seconds = time.perf_counter() - started
    log_outcome("sample", samples, seconds)
    log_stage(tracking, "sample", fingerprint=samples.fingerprint, cached=samples.cached, seconds=seconds,
              params=config.sample.model_dump(mode="json"), metrics={"rows": samples.rows, "generated_tokens": samples.generated_tokens},
              tags={"teacher_revision": samples.teacher_revision, "tokenizer_fingerprint": samples.tokenizer_fingerprint})
    return samples
