"""The training stage's checks that run before anything loads: settings, vocabularies, this machine's hardware.

`preflight` (and `stillhouse validate`) call them before any stage, `train_student` again when it starts; they read
configs and tokenizers only, so this module imports neither torch nor transformers (`stillhouse.hardware`).
"""

from __future__ import annotations

import os

from stillhouse.config import TrainConfig
from stillhouse.errors import InputError
from stillhouse.hardware import cuda_available, cuda_device_count
from stillhouse.models import load_tokenizer, resolve_model, vocabulary_difference


def check_vocabularies(config: TrainConfig, teacher_tokenizer) -> str | None:
    """None when the student shares the teacher's vocabulary (stored token ids and top-k apply as they are),
    else what differs.

    Reads tokenizers only. A student built from scratch takes the teacher's tokenizer. A served teacher whose
    tokenizer is unknown (``teacher_tokenizer`` None) shares nothing: its responses are re-tokenized as text.
    White-box ``kd`` between different vocabularies is refused unless ``kd.align`` is set
    (`cross_tokenizer.check_kd_tokenizers`); with it, both tokenizers must place their tokens in the text.
    """
    check_align_settings(config)
    kd_aligned = config.method == "kd" and config.kd.align != "none" and teacher_tokenizer is not None
    if config.student is None:
        if kd_aligned:  # the student takes the teacher's tokenizer: the one it must be alignable
            from stillhouse.training.cross_tokenizer import check_kd_tokenizers  # torch: kd across tokenizers only

            check_kd_tokenizers(teacher_tokenizer, teacher_tokenizer, config.kd.align)
        return None
    if teacher_tokenizer is None:
        difference = "the served teacher's tokenizer is unknown (sample.openai.tokenizer is null)"
    else:
        student_tokenizer = load_tokenizer(
            resolve_model(config.student, "train.student"), trust_remote_code=config.trust_remote_code
        )
        if config.method == "kd":
            from stillhouse.training.cross_tokenizer import check_kd_tokenizers

            return check_kd_tokenizers(teacher_tokenizer, student_tokenizer, config.kd.align)
        difference = vocabulary_difference(student_tokenizer, teacher_tokenizer)
    if config.method == "kd" and difference is not None:
        raise InputError(
            "train.method: `kd` compares token distributions, but the student's vocabulary differs from the teacher's "
            f"({difference}); use method `sft` (black-box) or a student of the teacher's family"
        )
    return difference


def check_align_settings(config: TrainConfig) -> None:
    """Refuse ``kd.align`` settings the cross-tokenizer path can't run, naming the field to change."""
    kd = config.kd
    if config.method != "kd" or kd.align == "none":
        return
    if kd.align == "uld" and config.loss_chunk_size is not None:
        raise InputError(
            "train.kd.align: uld sorts the student's whole next-token distribution, which train.loss_chunk_size "
            "never holds at once; set train.loss_chunk_size: null, or use train.kd.align: byte (chunked)"
        )
    if kd.teacher == "online" and kd.online_top_k is None:
        raise InputError(
            f"train.kd.align: {kd.align} maps the teacher's top-k onto the student's tokens, but "
            "train.kd.online_top_k is null (the online teacher's full distribution); set train.kd.online_top_k "
            "(e.g. 20: the rest of its mass is kept as one outcome)"
        )


def cpu_cores() -> int:
    """Cores this process may run on (its affinity mask: what a container or taskset allows)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def check_training_hardware(config: TrainConfig) -> None:
    """Refuse a process count this machine can't run: more processes per node than CUDA GPUs on a GPU
    machine (``device: auto``), or than CPU cores on a CPU run. Reads no weights and writes nothing.

    ``num_processes`` is per node: each node checks its own hardware.
    """
    if not on_cpu(config):
        available, what = cuda_device_count(), "CUDA GPUs"
        fix = "one process per GPU"
    else:
        available, what = cpu_cores(), "CPU cores"
        fix = "at most one process per core"
    if config.num_processes <= available:
        return
    more = (
        "; to shard a student over more processes than one machine has, add machines with train.nodes"
        if config.strategy == "fsdp"
        else ""
    )
    raise InputError(
        f"train.num_processes is {config.num_processes} per node, but this machine has {available} {what}: "
        f"set train.num_processes to at most {available} ({fix}){more}"
    )


def on_cpu(config: TrainConfig) -> bool:
    return config.device == "cpu" or not cuda_available()
