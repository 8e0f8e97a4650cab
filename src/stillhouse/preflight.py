"""Checks that run before any stage: cheap, and before any model weights are loaded."""

from __future__ import annotations

import os

from stillhouse import capabilities
from stillhouse.config import PipelineConfig
from stillhouse.data.decontaminate import check_benchmarks
from stillhouse.data.sources import resolve_sources
from stillhouse.errors import InputError
from stillhouse.health import check_tracking_server
from stillhouse.licenses import preflight_licenses
from stillhouse.models import load_tokenizer, resolve_model, vocabulary_difference
from stillhouse.sampling.sample import TeacherFacts, check_teacher
from stillhouse.training.served_teacher import ServedTeacher, served_endpoint
from stillhouse.training.train import check_training_hardware, check_vocabularies


def preflight(config: PipelineConfig) -> None:
    """Raise `InputError` naming the field and the fix for a missing dataset, benchmark or model, a bad k,
    too few GPUs for engine `vllm`, `kd` across vocabularies, or a served KD teacher whose server can't score."""
    tracking_uri = config.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
    if tracking_uri:
        check_tracking_server(tracking_uri)
    resolve_sources(config.curate)
    check_benchmarks(config.curate.decontaminate.benchmarks)
    teacher = check_teacher(config.sample)
    check_training_hardware(config.train)  # more processes per node than GPUs (or CPU cores): before anything runs
    if config.train.student is not None:
        resolve_model(config.train.student, "train.student")
        if config.train.method == "kd" and teacher.tokenizer_path is not None:
            # Tokenizers only: a student that doesn't share the teacher's vocabulary can't learn its top-k,
            # found before sampling.
            local = config.sample.engine != "openai"
            teacher_tokenizer = load_tokenizer(
                teacher.tokenizer_path,
                config.sample.revision if local else None,
                trust_remote_code=config.sample.trust_remote_code and local,
            )
            check_served_teacher_vocabulary(config, teacher_tokenizer)
            check_vocabularies(config.train, teacher_tokenizer)
    check_served_teacher(config, teacher)
    preflight_licenses(
        config
    )  # a push the teacher's or base model's terms forbid fails before training, quoting the clause


def check_served_teacher_vocabulary(config: PipelineConfig, teacher_tokenizer) -> None:
    """``train.kd.teacher: served`` scores the student's token ids: refuse a pretrained student with other ids."""
    student = config.train.student
    if config.train.kd.teacher != "served" or student is None:
        return
    student_tokenizer = load_tokenizer(
        resolve_model(student, "train.student"), trust_remote_code=config.train.trust_remote_code
    )
    problem = capabilities.served_kd_student_vocabulary_problem(
        method=config.train.method,
        kd_teacher=config.train.kd.teacher,
        difference=vocabulary_difference(student_tokenizer, teacher_tokenizer),
    )
    if problem:
        raise InputError(problem)


def check_served_teacher(config: PipelineConfig, teacher: TeacherFacts) -> None:
    """``train.kd.teacher: served``: one tiny request, answered with ``prompt_logprobs`` for k, or an `InputError`.

    Config validation already refused a served teacher of unknown vocabulary. The probe sends two token ids
    (the first two of the teacher's vocabulary) and asks for ``train.kd.online_top_k`` log-probs, so a server
    that ignores the field (anything but vLLM), refuses k (above vLLM's --max-logprobs) or doesn't answer
    is named here, with its URL, before any stage runs.
    """
    kd = config.train.kd
    if config.train.method != "kd" or kd.teacher != "served":
        return
    capabilities.assert_no_problem(
        capabilities.served_kd_vocabulary_problem(
            teacher_tokenizer_known=teacher.tokenizer_path is not None,
            method=config.train.method,
            kd_teacher=kd.teacher,
        )
    )
    connection, model = served_endpoint(kd, config.sample)
    # One try, no backoff: a preflight reports a dead server at once instead of retrying it for a minute.
    field = "train.kd.served" if kd.served is not None else "sample.openai"
    probe = ServedTeacher(
        connection.model_copy(update={"max_retries": 0}), model, kd.online_top_k, settings_field=field
    )
    try:
        problem = capabilities.served_kd_prompt_logprobs_problem(
            url=connection.base_url.rstrip("/"), problem=probe.probe()
        )
    finally:
        probe.close()
    if problem:
        raise InputError(problem)
