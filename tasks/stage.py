"""The one way a task runs a stage: open its nested MLflow run, call the core, time it, say what happened, record it.

    run = run_stage("train", tracking, lambda: train_student(...), params=section_params(config, "train"),
                    record=lambda student: StageRecord(metrics={"parameters": student.parameters}))
    run.result, run.run_id, run.seconds

The nested run is opened before the core starts, so the MLflow UI shows a stage while it runs, and it is
closed FAILED (KILLED on Ctrl-C) when the core raises. Everything MLflow goes through registry/.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from prefect.logging import get_run_logger

from stillhouse.refs import StageRef
from stillhouse.registry.tracking import TrackingContext, fail_stage_run, finish_stage_run, start_stage_run

Result = TypeVar("Result", bound=StageRef)


@dataclass
class StageRecord:
    """What a stage adds to its nested run besides its fingerprint, cache state and time."""

    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    metric_history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class StageRun(Generic[Result]):
    result: Result
    run_id: str
    seconds: float


def run_stage(
    stage: str,
    tracking: TrackingContext,
    compute: Callable[[], Result],
    *,
    params: dict[str, Any],
    record: Callable[[Result], StageRecord] | None = None,
) -> StageRun[Result]:
    """Run ``compute`` (a core stage returning its `StageRef`) as stage ``stage`` of the pipeline run ``tracking``."""
    run_id = start_stage_run(tracking, stage, params)
    started = time.perf_counter()
    try:
        result = compute()
    except BaseException as error:
        fail_stage_run(tracking, run_id, error)
        raise
    seconds = time.perf_counter() - started
    verb = "reused cached output" if result.cached else "computed"
    get_run_logger().info("%s: %s %s in %.1fs (%s)", stage, verb, result.fingerprint, seconds, result.path)
    extra = record(result) if record is not None else StageRecord()
    finish_stage_run(
        tracking,
        run_id,
        stage,
        fingerprint=result.fingerprint,
        cached=result.cached,
        seconds=seconds,
        metrics=extra.metrics,
        tags=extra.tags,
        metric_history=extra.metric_history,
    )
    return StageRun(result, run_id, seconds)
