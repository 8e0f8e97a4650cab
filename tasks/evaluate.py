"""Evaluation as a Prefect task: metrics to MLflow and a markdown table in the Prefect UI."""

from __future__ import annotations

import time

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from registry.tracking import TrackingContext, log_stage
from stillhouse.config import PipelineConfig
from stillhouse.evaluation.evaluate import evaluate_student
from stillhouse.refs import DatasetRef, EvalReport, ModelRef, SamplesRef
from stillhouse.store import Store
from tasks.reporting import log_outcome, progress_artifact


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(config: PipelineConfig, dataset: DatasetRef, samples: SamplesRef, student: ModelRef, tracking: TrackingContext) -> EvalReport:
    started = time.perf_counter()
    report = evaluate_student(config.evaluate, dataset, samples, student, Store(config.store), progress=progress_artifact("Evaluation"))
    seconds = time.perf_counter() - started
    log_outcome("evaluate", report, seconds)
    log_stage(tracking, "evaluate", fingerprint=report.fingerprint, cached=report.cached, seconds=seconds,
              params=config.evaluate.model_dump(mode="json"), metrics=report.metrics)
    rows = "\n".join(f"| {name} | {value:.4g} |" for name, value in sorted(report.metrics.items()))
    create_markdown_artifact(f"| metric | value |\n|---|---|\n{rows}", key="evaluation", description="Teacher vs student on held-out prompts")
    return report
