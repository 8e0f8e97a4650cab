"""Evaluation as a Prefect task: metrics and the report's files to MLflow, the report as a Prefect markdown artifact."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from stillhouse.config import PipelineConfig
from stillhouse.evaluation.report import report_markdown
from stillhouse.evaluation.stage import evaluate_student, report_files
from stillhouse.refs import DatasetRef, EvalReport, ModelRef, SamplesRef
from stillhouse.registry.tracking import TrackingContext, log_files, section_params
from stillhouse.store import Store
from stillhouse.tasks.reporting import progress_artifact
from stillhouse.tasks.stage import StageRecord, run_stage


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(
    config: PipelineConfig,
    dataset: DatasetRef,
    samples: SamplesRef,
    student: ModelRef,
    tracking: TrackingContext,
    baseline: ModelRef | None = None,
) -> EvalReport:
    """Evaluate (``baseline``: an extra model measured as role `baseline`), log metrics and the report's files, show
    the tables."""

    def compute() -> EvalReport:
        return evaluate_student(
            config.evaluate,
            dataset,
            samples,
            student,
            Store.from_config(config.store),
            progress=progress_artifact("Evaluation"),
            baseline=baseline,
        )

    run = run_stage(
        "evaluate",
        tracking,
        compute,
        params=section_params(config, "evaluate"),
        record=lambda report: StageRecord(metrics=report.metrics),
    )
    report = run.result
    log_files(tracking, run.run_id, report_files(report), artifact_path="report")  # also when reused from the store
    # Images are files beside report.md; the Prefect UI gets the tables, MLflow the whole report.
    create_markdown_artifact(
        report_markdown(report.metrics, f"{config.name}: teacher vs student"),
        key="evaluation",
        description="Teacher vs student on held-out prompts (plots: the evaluate run's report/ artifacts in MLflow)",
    )
    return report
