"""Evaluation as a Prefect task: metrics and the report's files to MLflow, the report as a Prefect markdown artifact."""

from __future__ import annotations

import time

from mlflow.tracking import MlflowClient
from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from stillhouse.registry.tracking import TrackingContext, log_stage
from stillhouse.config import PipelineConfig
from stillhouse.evaluation.evaluate import evaluate_student, report_files
from stillhouse.evaluation.report import report_markdown
from stillhouse.refs import DatasetRef, EvalReport, ModelRef, SamplesRef
from stillhouse.store import Store
from stillhouse.tasks.reporting import log_outcome, progress_artifact


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(config: PipelineConfig, dataset: DatasetRef, samples: SamplesRef, student: ModelRef, tracking: TrackingContext,
                  baseline: ModelRef | None = None) -> EvalReport:
    """Evaluate (``baseline``: an extra model measured as role `baseline`), log metrics and the report's files, show the tables."""
    started = time.perf_counter()
    report = evaluate_student(config.evaluate, dataset, samples, student, Store(config.store), progress=progress_artifact("Evaluation"),
                              baseline=baseline)
    seconds = time.perf_counter() - started
    log_outcome("evaluate", report, seconds)
    run_id = log_stage(tracking, "evaluate", fingerprint=report.fingerprint, cached=report.cached, seconds=seconds,
                       params=config.evaluate.model_dump(mode="json"), metrics=report.metrics)
    client = MlflowClient(tracking.tracking_uri)
    for path in report_files(report):  # report.md, report.html and the plots, also when reused from the store
        client.log_artifact(run_id, str(path), artifact_path="report")
    # Images are files beside report.md; the Prefect UI gets the tables, MLflow the whole report.
    create_markdown_artifact(report_markdown(report.metrics, f"{config.name}: teacher vs student"), key="evaluation",
                             description="Teacher vs student on held-out prompts (plots: the evaluate run's report/ artifacts in MLflow)")
    return report
