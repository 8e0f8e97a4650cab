"""Registration as a Prefect task: the student becomes an MLflow model version with an alias."""

from __future__ import annotations

import time

from mlflow.tracking import MlflowClient
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from registry.model_registry import RegisteredModel, register_student
from registry.tracking import TrackingContext, log_stage
from stillhouse.config import PipelineConfig
from stillhouse.refs import EvalReport, ModelRef


@task(name="register", cache_policy=NO_CACHE)
def register_task(config: PipelineConfig, student: ModelRef, report: EvalReport, tracking: TrackingContext) -> RegisteredModel:
    started = time.perf_counter()
    run_id = log_stage(tracking, "register", fingerprint=student.fingerprint, cached=False, seconds=0.0, metrics=report.metrics)
    registered = register_student(config.registry, tracking, student, run_id, tags={"stillhouse.pipeline": config.name, "stillhouse.eval_fingerprint": report.fingerprint},
                                  license=config.publish.license)
    MlflowClient(tracking.tracking_uri).set_tag(run_id, "stillhouse.cached", str(registered.cached).lower())
    get_run_logger().info("register: %s version %s (alias @%s)%s in %.1fs", registered.name, registered.version, registered.alias,
                          ", reused" if registered.cached else "", time.perf_counter() - started)
    return registered
