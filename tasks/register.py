"""Registration as a Prefect task: the student becomes an MLflow model version with an alias, tagged with its
lineage."""

from __future__ import annotations

import time

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from stillhouse.config import PipelineConfig
from stillhouse.refs import DatasetRef, EvalReport, ModelRef, SamplesRef
from stillhouse.registry.model_registry import RegisteredModel, log_training_inputs, register_student
from stillhouse.registry.tracking import TrackingContext, lineage_tags, log_stage, section_params, tag_run


@task(name="register", cache_policy=NO_CACHE)
def register_task(
    config: PipelineConfig,
    student: ModelRef,
    report: EvalReport,
    tracking: TrackingContext,
    dataset: DatasetRef | None = None,
    samples: SamplesRef | None = None,
) -> RegisteredModel:
    started = time.perf_counter()
    lineage = lineage_tags(config, tracking, dataset, samples)
    # The version's run carries the evaluation's metrics: the gate compares a candidate with the champion's run.
    run_id = log_stage(
        tracking,
        "register",
        fingerprint=student.fingerprint,
        cached=False,
        seconds=0.0,
        metrics=report.metrics,
        tags=lineage,
        params=section_params(config, "registry"),
    )
    tag_run(
        tracking, lineage
    )  # the parent run carries the lineage too, now that sampling has fixed the teacher revision
    registered = register_student(
        config.registry,
        tracking,
        student,
        run_id,
        tags={"stillhouse.pipeline": config.name, "stillhouse.eval_fingerprint": report.fingerprint, **lineage},
        license=config.publish.license,
    )
    tag_run(tracking, {"stillhouse.cached": str(registered.cached).lower()}, run_id)
    if dataset is not None and samples is not None:
        log_training_inputs(tracking, run_id, dataset, samples, name=config.name)
    get_run_logger().info(
        "register: %s version %s (alias @%s)%s in %.1fs",
        registered.name,
        registered.version,
        registered.alias,
        ", reused" if registered.cached else "",
        time.perf_counter() - started,
    )
    return registered
