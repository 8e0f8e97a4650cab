"""Checks that run before any stage: cheap, and before any model weights are loaded."""

from __future__ import annotations

import os

from stillhouse.config import PipelineConfig
from stillhouse.data.decontaminate import check_benchmarks
from stillhouse.data.sources import resolve_sources
from stillhouse.health import check_tracking_server
from stillhouse.licenses import preflight_licenses
from stillhouse.models import load_tokenizer, resolve_model
from stillhouse.sampling.sample import check_teacher
from stillhouse.training.train import check_vocabularies


def preflight(config: PipelineConfig) -> None:
    """Raise `InputError` naming the field and the fix for a missing dataset, benchmark or model, a bad k,
    or `kd` across vocabularies."""
    tracking_uri = config.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
    if tracking_uri:
        check_tracking_server(tracking_uri)
    resolve_sources(config.curate)
    check_benchmarks(config.curate.decontaminate.benchmarks)
    teacher = check_teacher(config.sample)
    if config.train.student is not None:
        resolve_model(config.train.student, "train.student")
        if config.train.method == "kd" and teacher.tokenizer_path is not None:
            # Tokenizers only: a student that doesn't share the teacher's vocabulary can't learn its top-k,
            # found before sampling.
            local = config.sample.engine != "openai"
            check_vocabularies(
                config.train,
                load_tokenizer(
                    teacher.tokenizer_path,
                    config.sample.revision if local else None,
                    trust_remote_code=config.sample.trust_remote_code and local,
                ),
            )
    preflight_licenses(
        config
    )  # a push the teacher's or base model's terms forbid fails before training, quoting the clause
