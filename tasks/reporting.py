"""Reporting helpers for tasks: a Prefect progress artifact, and a log line saying computed or reused."""

from __future__ import annotations

from collections.abc import Callable

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.logging import get_run_logger

from stillhouse.refs import StageRef


def progress_artifact(description: str) -> Callable[[float], None]:
    artifact_id = create_progress_artifact(progress=0.0, description=description)

    def report(fraction: float) -> None:
        update_progress_artifact(artifact_id, progress=round(100 * min(max(fraction, 0.0), 1.0), 1))

    return report


def log_outcome(stage: str, ref: StageRef, seconds: float) -> None:
    """Say in the run log whether the stage ran or its output was reused from the store."""
    verb = "reused cached output" if ref.cached else "computed"
    get_run_logger().info("%s: %s %s in %.1fs (%s)", stage, verb, ref.fingerprint, seconds, ref.path)
