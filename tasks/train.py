"""Student training as a Prefect task: the loss curve goes to MLflow, progress to the Prefect UI."""

from __future__ import annotations

import time

from prefect import task
from prefect.cache_policies import NO_CACHE

from stillhouse.registry.tracking import TrackingContext, log_stage
from stillhouse.config import PipelineConfig
from stillhouse.refs import DatasetRef, ModelRef, SamplesRef
from stillhouse.store import Store
from stillhouse.training.train import train_student
from stillhouse.tasks.reporting import log_outcome, progress_artifact


@task(name="train-student", cache_policy=NO_CACHE)
def train_task(config: PipelineConfig, dataset: DatasetRef, samples: SamplesRef, tracking: TrackingContext) -> ModelRef:
    started = time.perf_counter()
    student = train_student(config.train, dataset, samples, Store(config.store), progress=progress_artifact("Student training"))
    seconds = time.perf_counter() - started
    log_outcome("train", student, seconds)
    log_stage(tracking, "train", fingerprint=student.fingerprint, cached=student.cached, seconds=seconds,
              params=config.train.model_dump(mode="json"),
              metrics={"parameters": student.parameters, "train_seconds": student.train_seconds, **({"final_loss": student.final_loss} if student.final_loss is not None else {})},
              metric_history=[{"step": p["step"], "train_loss": p["loss"], "learning_rate": p["learning_rate"]} for p in student.loss_history])
    return student
