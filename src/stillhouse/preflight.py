"""Checks that run before any stage: cheap, and before any model weights are loaded."""

from __future__ import annotations

from stillhouse.config import PipelineConfig
from stillhouse.data.curate import source_kind
from stillhouse.models import resolve_model
from stillhouse.sampling.sample import check_teacher


def preflight(config: PipelineConfig) -> None:
    """Raise `InputError` naming the field and the fix for a missing dataset or model, or a bad k."""
    source_kind(config.curate.source)
    check_teacher(config.sample)
    if config.train.student is not None:
        resolve_model(config.train.student, "train.student")
