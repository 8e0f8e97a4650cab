"""Student training as a Prefect task: the loss curve goes to MLflow, progress to the Prefect UI."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from stillhouse.config import PipelineConfig
from stillhouse.refs import DatasetRef, ModelRef, SamplesRef
from stillhouse.registry.tracking import TrackingContext, section_params
from stillhouse.store import Store
from stillhouse.tasks.reporting import progress_artifact
from stillhouse.tasks.stage import StageRecord, run_stage
from stillhouse.training.stage import train_student


def training_record(student: ModelRef) -> StageRecord:
    metrics = {"parameters": student.parameters, "train_seconds": student.train_seconds}
    if student.final_loss is not None:
        metrics["final_loss"] = student.final_loss
    history = [
        {"step": p["step"], "train_loss": p["loss"], "learning_rate": p["learning_rate"]} for p in student.loss_history
    ]
    return StageRecord(metrics=metrics, metric_history=history)


@task(name="train-student", cache_policy=NO_CACHE)
def train_task(config: PipelineConfig, dataset: DatasetRef, samples: SamplesRef, tracking: TrackingContext) -> ModelRef:
    def compute() -> ModelRef:
        return train_student(
            config.train,
            dataset,
            samples,
            Store.from_config(config.store),
            progress=progress_artifact("Student training"),
            teacher_endpoint=config.sample.openai,  # kd.teacher: served, no kd.served: the sampler's server
        )

    return run_stage("train", tracking, compute, params=section_params(config, "train"), record=training_record).result
