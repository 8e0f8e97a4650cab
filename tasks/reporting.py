"""A Prefect progress artifact that core stages update through a plain ``progress(fraction)`` callback."""

from __future__ import annotations

from collections.abc import Callable

from prefect.artifacts import create_progress_artifact, update_progress_artifact


def progress_artifact(description: str) -> Callable[[float], None]:
    artifact_id = create_progress_artifact(progress=0.0, description=description)

    def report(fraction: float) -> None:
        update_progress_artifact(artifact_id, progress=round(100 * min(max(fraction, 0.0), 1.0), 1))

    return report
