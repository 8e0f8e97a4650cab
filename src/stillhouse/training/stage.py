"""The training stage's entry: its fingerprint, its checks and the store, without importing torch.

`train_student` returns the student the store already holds for this config and these inputs, and only when it
has to train one imports `stillhouse.training.train` (torch, transformers, accelerate, peft: about 3 s on a 2-core
machine), so a fully cached rerun of a pipeline never pays for them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from stillhouse import capabilities
from stillhouse.config import OpenAIEngineConfig, TrainConfig
from stillhouse.errors import InputError
from stillhouse.models import load_tokenizer, resolve_model
from stillhouse.refs import DatasetRef, ModelRef, SamplesRef
from stillhouse.store import Store, fingerprint
from stillhouse.training.checks import check_training_hardware, check_vocabularies

CODE_VERSION = 3  # 3: CPU training in several processes averages their gradients (each trained its own replica)
# How a run is started, not what it computes: left out of the fingerprint, so a rerun with a new rendezvous
# (as torchrun wants one per run) still resumes from the stage's checkpoints.
LAUNCH_FIELDS = {"threads", "device", "trust_remote_code", "rendezvous", "rendezvous_id"}


def served_teacher_endpoint(config: TrainConfig, sample_openai: OpenAIEngineConfig | None) -> OpenAIEngineConfig:
    """The server of ``kd.teacher: served``: ``kd.served``, else the sample stage's ``sample.openai``."""
    endpoint = config.kd.served or sample_openai
    if endpoint is None:
        raise InputError(
            "train.kd.teacher: served needs the teacher's server: set train.kd.served (base_url, api_key_env, ...) "
            "or pass the sample stage's sample.openai"
        )
    return endpoint


def uses_torchrun(config: TrainConfig) -> bool:
    """Whether the stage runs in torchrun workers (several processes or nodes, or sharded) or in this process."""
    return config.num_processes > 1 or config.nodes > 1 or config.strategy == "fsdp"


def check_teacher_capabilities(config: TrainConfig, samples: SamplesRef) -> None:
    """Refuse a training that needs what the sampled teacher can't give: weights here, a known tokenizer, stored top-k.

    Config validation refuses such a config before anything runs (`stillhouse.capabilities`), so meeting one
    here is an internal error: a hand-built config or reference, or a bug.
    """
    tokenizer_known = samples.teacher_tokenizer is not None
    capabilities.assert_no_problem(
        capabilities.online_teacher_problem(
            teacher_is_served=samples.teacher_is_served, method=config.method, kd_teacher=config.kd.teacher
        ),
        capabilities.kd_vocabulary_problem(teacher_tokenizer_known=tokenizer_known, method=config.method),
        capabilities.student_from_scratch_problem(
            teacher_tokenizer_known=tokenizer_known, student_from_scratch=config.student is None
        ),
        capabilities.offline_kd_top_k_problem(
            method=config.method, kd_teacher=config.kd.teacher, top_k_stored=samples.top_k_logprobs > 0
        ),
    )


def fingerprinted_settings(config: TrainConfig) -> dict:
    """The settings that determine what a run trains: all but `LAUNCH_FIELDS`, and `decay_ratio` only where the
    schedule reads it (so adding it left every other run's stored output where it was)."""
    settings = config.model_dump(mode="json", exclude=LAUNCH_FIELDS)
    if config.lr_scheduler != "warmup_stable_decay":
        del settings["decay_ratio"]
    return settings


def train_student(
    config: TrainConfig,
    dataset: DatasetRef,
    samples: SamplesRef,
    store: Store,
    progress: Callable[[float], None] | None = None,
    teacher_endpoint: OpenAIEngineConfig | None = None,
) -> ModelRef:
    """The trained student, from the store when this config was trained on these inputs before.

    ``teacher_endpoint``: the sample stage's ``sample.openai``, used by ``kd.teacher: served`` when ``kd.served``
    is null. Before anything is written to the store, a student that doesn't share the teacher's vocabulary
    (``kd`` without ``kd.align``), a process count the machine lacks and a missing teacher server are refused.
    """
    if config.student is not None:
        resolve_model(config.student, "train.student")
    stage_fingerprint = fingerprint(
        "train",
        fingerprinted_settings(config),
        {"dataset": dataset.fingerprint, "samples": samples.fingerprint},
        CODE_VERSION,
    )
    trained = store.manifest("train", stage_fingerprint) is not None
    if not trained:  # it will be trained here: check first, write nothing yet
        check_training_hardware(config)
        check_teacher_capabilities(config, samples)
        check_vocabularies(config, load_tokenizer(samples.teacher_tokenizer) if samples.teacher_tokenizer else None)
        if config.method == "kd" and config.kd.teacher == "served":
            served_teacher_endpoint(config, teacher_endpoint)
        if config.nodes > 1 and store.remote:
            raise InputError(
                f"train.nodes is {config.nodes}, but the store is {store.url}: the nodes' processes write their "
                "checkpoint shards into one stage folder, so the store must be a folder every node mounts "
                "(e.g. NFS), not an object store"
            )

    def compute(folder: Path) -> dict:
        from stillhouse.training import train as training

        if uses_torchrun(config):
            result = training.launch_training(config, dataset, samples, folder, teacher_endpoint, progress)
        else:
            result = training.run_training(config, dataset, samples, folder, progress, teacher_endpoint)
        return {"model_path": str(folder / "model"), **result}

    if config.nodes > 1 and not trained:
        # Every node runs this stage at once. The store's lock would keep all nodes but one outside the
        # rendezvous (and that one waiting there for them), so the nodes train without it; the store seals
        # the output with the manifest of whichever node gets there first, and the others reuse it.
        folder = store.path("train", stage_fingerprint)
        folder.mkdir(parents=True, exist_ok=True)
        result = compute(folder)
        output = store.build("train", stage_fingerprint, lambda _: result)
    else:
        output = store.build("train", stage_fingerprint, compute)
    return ModelRef.from_manifest("train", stage_fingerprint, output.path, output.cached, output.manifest)
