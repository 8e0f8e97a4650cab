"""Curation as a Prefect task: progress and report artifacts, counts and the dataset input in MLflow."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from stillhouse.config import PipelineConfig
from stillhouse.data.curate import curate
from stillhouse.refs import DatasetRef
from stillhouse.registry.datasets import log_curated_dataset
from stillhouse.registry.tracking import TrackingContext, section_params
from stillhouse.store import Store
from stillhouse.tasks.reporting import progress_artifact
from stillhouse.tasks.stage import StageRecord, run_stage


@task(name="curate", cache_policy=NO_CACHE)
def curate_task(config: PipelineConfig, tracking: TrackingContext) -> DatasetRef:
    run = run_stage(
        "curate",
        tracking,
        lambda: curate(config.curate, Store.from_config(config.store), progress=progress_artifact("Curating prompts")),
        params=section_params(config, "curate"),
        record=lambda dataset: StageRecord(metrics=dataset.counts),
    )
    dataset = run.result
    log_curated_dataset(tracking, run.run_id, dataset, name=config.name)
    report = Path(dataset.path) / "report" / "report.md"
    counts_table = "| | rows |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in dataset.counts.items())
    create_markdown_artifact(
        report.read_text() if report.is_file() else counts_table,
        key="curation-report",
        description="Rows in and out of each curation filter and source, with examples of removed rows",
    )
    return dataset
