"""Feedback-guided distillation as Prefect tasks: judged pairs (an MLflow dataset input), then DPO or best-of-n SFT."""

from __future__ import annotations

import time
from pathlib import Path

import mlflow
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from prefect import task
from prefect.cache_policies import NO_CACHE

from stillhouse.registry.tracking import TrackingContext, log_stage
from stillhouse.config import PipelineConfig
from stillhouse.feedback.stage import collect_preferences, train_on_feedback
from stillhouse.refs import DatasetRef, ModelRef, PairsRef, SamplesRef
from stillhouse.store import Store
from stillhouse.tasks.reporting import log_outcome, progress_artifact


@task(name="judge", cache_policy=NO_CACHE)
def judge_task(config: PipelineConfig, dataset: DatasetRef, samples: SamplesRef, student: ModelRef, tracking: TrackingContext) -> PairsRef:
    started = time.perf_counter()
    pairs = collect_preferences(config.feedback, dataset, samples, student, Store(config.store), progress=progress_artifact("Judging candidates"))
    seconds = time.perf_counter() - started
    log_outcome("judge", pairs, seconds)
    metrics = {**pairs.counts, **({"judge_consistency": pairs.judge_consistency} if pairs.judge_consistency is not None else {})}
    run_id = log_stage(tracking, "judge", fingerprint=pairs.fingerprint, cached=pairs.cached, seconds=seconds,
                       params=config.feedback.model_dump(mode="json"), metrics=metrics)
    mlflow.set_tracking_uri(tracking.tracking_uri)
    with mlflow.start_run(run_id=run_id):
        source = resolve_dataset_source((Path(pairs.path) / "pairs.parquet").resolve().as_uri())
        mlflow.log_input(MetaDataset(source=source, name=f"{config.name}-pairs", digest=pairs.fingerprint), context="preference")
    return pairs


@task(name="feedback-train", cache_policy=NO_CACHE)
def feedback_train_task(config: PipelineConfig, dataset: DatasetRef, pairs: PairsRef, student: ModelRef, tracking: TrackingContext) -> ModelRef:
    started = time.perf_counter()
    trained = train_on_feedback(config.feedback, dataset, pairs, student, Store(config.store))
    seconds = time.perf_counter() - started
    log_outcome("feedback", trained, seconds)
    # Per logged step: loss, and for DPO the reward margins and accuracies.
    history = [{k if k != "loss" else "train_loss": v for k, v in point.items()} for point in trained.loss_history]
    log_stage(tracking, "feedback", fingerprint=trained.fingerprint, cached=trained.cached, seconds=seconds,
              params=config.feedback.model_dump(mode="json"), metrics={"train_seconds": trained.train_seconds}, metric_history=history)
    return trained
