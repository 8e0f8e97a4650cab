"""Feedback-guided distillation as Prefect tasks: judged pairs (an MLflow dataset input), then DPO or best-of-n SFT."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from stillhouse.config import PipelineConfig
from stillhouse.refs import DatasetRef, ModelRef, PairsRef, SamplesRef
from stillhouse.registry.datasets import log_preference_pairs
from stillhouse.registry.tracking import TrackingContext, section_params
from stillhouse.store import Store
from stillhouse.tasks.reporting import progress_artifact
from stillhouse.tasks.stage import StageRecord, run_stage


def judging_record(pairs: PairsRef) -> StageRecord:
    consistency = {"judge_consistency": pairs.judge_consistency} if pairs.judge_consistency is not None else {}
    return StageRecord(metrics={**pairs.counts, **consistency})


@task(name="judge", cache_policy=NO_CACHE)
def judge_task(
    config: PipelineConfig, dataset: DatasetRef, samples: SamplesRef, student: ModelRef, tracking: TrackingContext
) -> PairsRef:
    def compute() -> PairsRef:
        # Imported when a feedback chain runs: torch and TRL would otherwise load for every pipeline, cached or not.
        from stillhouse.feedback.stage import collect_preferences

        return collect_preferences(
            config.feedback,
            dataset,
            samples,
            student,
            Store.from_config(config.store),
            progress=progress_artifact("Judging candidates"),
        )

    run = run_stage("judge", tracking, compute, params=section_params(config, "feedback"), record=judging_record)
    log_preference_pairs(tracking, run.run_id, run.result, name=config.name)
    return run.result


@task(name="feedback-train", cache_policy=NO_CACHE)
def feedback_train_task(
    config: PipelineConfig, dataset: DatasetRef, pairs: PairsRef, student: ModelRef, tracking: TrackingContext
) -> ModelRef:
    def record(trained: ModelRef) -> StageRecord:
        # Per logged step: loss, and for DPO the reward margins and accuracies.
        history = [{k if k != "loss" else "train_loss": v for k, v in point.items()} for point in trained.loss_history]
        return StageRecord(metrics={"train_seconds": trained.train_seconds}, metric_history=history)

    def compute() -> ModelRef:
        from stillhouse.feedback.stage import train_on_feedback

        return train_on_feedback(config.feedback, dataset, pairs, student, Store.from_config(config.store))

    return run_stage(
        "feedback",
        tracking,
        compute,
        params=section_params(config, "feedback"),
        record=record,
    ).result
