"""Checks that run before any stage: cheap, and before any model weights are loaded."""

from __future__ import annotations

from stillhouse.config import PipelineConfig
from stillhouse.data.decontaminate import check_benchmarks
from stillhouse.data.sources import resolve_sources
from stillhouse.models import resolve_model
from stillhouse.sampling.sample import check_teacher


def preflight(config: PipelineConfig) -> None:
    """Raise `InputError` naming the field and the fix for a missing dataset, benchmark or model, or a bad k."""
    resolve_sources(config.curate)
    check_benchmarks(config.curate.decontaminate.benchmarks)
    check_teacher(config.sample)
    if config.train.student is not None:
        resolve_model(config.train.student, "train.student")
