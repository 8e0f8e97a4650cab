"""The sampling stage: the teacher answers every curated prompt (train and eval splits), shard by shard.

    plan = plan_shards(config, dataset, store)           # checks, fingerprint, which shards are missing
    for index in plan.pending: sample_shard(config, dataset, plan, index)   # each writes one shard atomically
    samples = finish_sampling(config, plan, store)       # seals the folder with its manifest

`sample_teacher` does those three in this process; tasks/sample.py maps `sample_shard` over the
pending shards as Prefect tasks (threads here, or a Ray cluster). With vLLM replicas
(``sample.vllm.replicas`` > 1) the replicas are Ray actors of their own and shards run on threads
here, one in flight per replica (`concurrent_shards`). A shard's content depends only on
the config, the prompts and its index (shard i samples under seed ``seed + 100003 i``), so a rerun
after a crash samples only the missing shards and ends with what an uninterrupted run writes.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import pyarrow.parquet as pq
from pydantic import BaseModel
from tqdm.auto import tqdm

from stillhouse.config import SampleConfig
from stillhouse.data.curate import read_split
from stillhouse.errors import InputError
from stillhouse.models import (
    HubUnreachable,
    check_hub_safetensors,
    load_causal_lm,
    load_tokenizer,
    model_revision,
    plain_chat_tokenizer,
    plain_config,
    remote_code_error,
    resolve_model,
    tokenizer_fingerprint,
)
from stillhouse.refs import DatasetRef, SamplesRef
from stillhouse.sampling.engine import Engine, Generation, Prompt, SamplingSettings
from stillhouse.sampling.teacher_outputs import FORMAT_VERSION as TEACHER_OUTPUTS_FORMAT
from stillhouse.sampling.teacher_outputs import (
    LOGPROB_STEP,
    remove_partial_shards,
    shard_format,
    shard_name,
    write_shard,
)
from stillhouse.sampling.vllm_engine import uses_ray
from stillhouse.store import Store, file_sha256, fingerprint, storage_errors

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

CODE_VERSION = 2
SHARD_SEED_STRIDE = 100_003


class TeacherFacts(BaseModel):
    """What the checks learned about the teacher without loading its weights."""

    path: str = ""
    revision: str
    vocab_size: int | None = None
    context_length: int | None = None
    tokenizer_path: str | None = None


class ShardPlan(BaseModel):
    """The shards of one sampling run: where they go, and which are still missing."""

    fingerprint: str
    folder: str
    cached: bool
    prompts: int
    shards: int
    pending: list[int]
    teacher: TeacherFacts
    counts: dict[str, int]
    remote_store: str | None = (
        None  # an s3:// store: each finished shard is uploaded at once, so an interrupted run resumes anywhere
    )


class ShardResult(BaseModel):
    index: int
    rows: int
    generated_tokens: int
    seconds: float
    resumed: bool


def check_teacher(config: SampleConfig) -> TeacherFacts:
    """Every check that can fail before sampling starts, reading only configs and tokenizers.

    A model path or revision that doesn't exist, a teacher without a chat template (prompts are
    chat messages), k larger than the vocabulary, max_new_tokens that fill the whole context (or
    ``sample.vllm.max_model_len``), engine `vllm` without vLLM or a GPU (or Ray, for replicas), and
    more GPUs asked of it than there are.
    """
    if config.engine == "openai":
        return _check_openai_teacher(config)
    teacher = resolve_model(config.teacher, "sample.teacher")
    vocabulary, context = teacher_config_facts(config, teacher)
    if not Path(teacher).is_dir():  # a Hub teacher: refuse pickle-only weights now, not when the first shard loads them
        check_hub_safetensors(teacher, config.revision, "sample.teacher")
    if config.top_k_logprobs > vocabulary:
        raise InputError(
            f"sample.top_k_logprobs: k={config.top_k_logprobs} is larger than the teacher's vocabulary ({vocabulary}); "
            f"use a k of at most {vocabulary} (16-64 is typical)"
        )
    context = config.context_length or context
    if config.engine == "vllm" and config.vllm.max_model_len is not None:  # vLLM plans its KV cache for no more
        context = min(context, config.vllm.max_model_len) if context else config.vllm.max_model_len
    _check_context(config, context)
    if not plain_chat_tokenizer(teacher, config.revision):  # else its files show it loads, template included
        tokenizer = load_tokenizer(teacher, config.revision, trust_remote_code=config.trust_remote_code)
        _check_chat_template(tokenizer, config.teacher, "sample.teacher")
    if config.engine == "vllm":
        from stillhouse.sampling.vllm_engine import check_vllm_engine

        check_vllm_engine(config.vllm)  # vLLM and a GPU here, or Ray; enough GPUs for tensor x pipeline x replicas
    return TeacherFacts(
        path=teacher,
        revision=model_revision(teacher, config.revision, trust_remote_code=config.trust_remote_code),
        vocab_size=vocabulary,
        context_length=context,
        tokenizer_path=teacher,
    )


def teacher_config_facts(config: SampleConfig, teacher: str) -> tuple[int, int | None]:
    """(vocabulary size, context length) of the teacher's config: from config.json as it is where that holds both
    (`plain_config`: no transformers import), else through `AutoConfig` (remote code, class defaults, errors)."""
    try:
        plain = plain_config(teacher, config.revision)
        if plain is not None and isinstance(plain.get("vocab_size"), int) and "max_position_embeddings" in plain:
            return plain["vocab_size"], plain["max_position_embeddings"]
        from transformers import AutoConfig

        model_config = AutoConfig.from_pretrained(
            teacher, revision=config.revision, trust_remote_code=config.trust_remote_code
        )
    except (OSError, ValueError) as error:
        if "trust_remote_code" in str(error):
            raise remote_code_error(config.teacher, "sample.teacher") from None
        fix = (
            "the Hub can't be reached and the local cache has no copy: check the network (or HF_ENDPOINT), or "
            f"download it once where the Hub is reachable (`hf download {config.teacher}`) and share HF_HOME"
            if isinstance(error, HubUnreachable)
            else "check the id and revision, or log in for gated models"
        )
        raise InputError(
            f"sample.teacher/sample.revision: cannot read {config.teacher!r} at revision {config.revision or 'main'!r} "
            f"({type(error).__name__}: {str(error).splitlines()[0][:200]}); {fix}"
        ) from None
    return model_config.vocab_size, getattr(model_config, "max_position_embeddings", None)


def _check_openai_teacher(config: SampleConfig) -> TeacherFacts:
    if config.overlong_prompts == "truncate_left":
        raise InputError(
            "sample.overlong_prompts: `truncate_left` needs a local engine (hf, vllm); "
            "with engine `openai` use `skip` or `error`"
        )
    facts = TeacherFacts(
        path=config.teacher,
        revision=config.revision or f"served:{config.openai.base_url}",
        context_length=config.context_length,
    )
    _check_context(config, config.context_length)
    if config.openai.tokenizer is not None:
        facts.tokenizer_path = resolve_model(config.openai.tokenizer, "sample.openai.tokenizer")
        tokenizer = load_tokenizer(facts.tokenizer_path)
        _check_chat_template(tokenizer, config.openai.tokenizer, "sample.openai.tokenizer")
        facts.vocab_size = len(tokenizer)
        if config.top_k_logprobs > facts.vocab_size:
            raise InputError(
                f"sample.top_k_logprobs: k={config.top_k_logprobs} is larger than the teacher's vocabulary "
                f"({facts.vocab_size}); use a k of at most {facts.vocab_size}"
            )
    return facts


def _check_context(config: SampleConfig, context: int | None) -> None:
    if context is not None and config.max_new_tokens >= context:
        raise InputError(
            f"sample.max_new_tokens: {config.max_new_tokens} leaves no room for a prompt in the teacher's "
            f"context of {context} tokens; lower it"
        )


def _check_chat_template(tokenizer, name: str, field: str) -> None:
    if tokenizer.chat_template is None:
        raise InputError(
            f"{field}: {name!r} has no chat template, and the prompts are chat messages; use an instruction-tuned "
            "teacher or add a `chat_template` to its tokenizer_config.json"
        )


def stage_fingerprint(config: SampleConfig, dataset: DatasetRef, revision: str) -> str:
    # Where shards run, and how to reach a server, don't change what is sampled; which server, and how
    # its tokens become ids (the tokenizer named, or the server's own ids), do. Of vLLM's settings only
    # max_model_len does (it bounds the context, hence truncation): GPUs and replicas are where shards run.
    settings = config.model_dump(
        mode="json",
        exclude={
            "teacher",
            "revision",
            "device",
            "task_runner",
            "gpu_memory_utilization",
            "trust_remote_code",
            "vllm",
        },
    )
    if config.engine == "vllm":  # other engines' fingerprints stay what they were before these settings existed
        settings["vllm"] = {"max_model_len": config.vllm.max_model_len}
    served = config.openai
    settings["openai"] = (
        {"base_url": served.base_url, "tokenizer": served.tokenizer, "return_token_ids": served.return_token_ids}
        if config.engine == "openai"
        else None
    )
    return fingerprint(
        "sample", settings, {"dataset": dataset.fingerprint, "teacher": f"{config.teacher}@{revision}"}, CODE_VERSION
    )


def read_prompts(dataset: DatasetRef) -> pd.DataFrame:
    """Every prompt to answer: the train split, then the eval split."""
    return pd.concat(
        [read_split(dataset, "train").assign(split="train"), read_split(dataset, "eval").assign(split="eval")],
        ignore_index=True,
    )


@dataclass
class PreparedPrompts:
    positions: list[int]  # rows of the shard that are sampled (skipped ones are left out)
    token_ids: list[list[int]]  # their rendered, possibly left-truncated, token ids
    truncated: int
    skipped: int


def prepare_prompts(config: SampleConfig, tokenizer, context: int | None, frame: pd.DataFrame) -> PreparedPrompts:
    """Render and tokenize prompts, applying `overlong_prompts` to those that leave no room for the answer."""
    from stillhouse.sampling.hf_engine import render_prompts  # torch: imported where prompts render, not by checks

    rendered = render_prompts(tokenizer, [json.loads(m) for m in frame["messages"]])
    prepared = PreparedPrompts([], [], 0, 0)
    limit = None if context is None else context - config.max_new_tokens
    for position, (prompt_id, text) in enumerate(zip(frame["prompt_id"], rendered)):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if limit is not None and len(ids) > limit:
            if config.overlong_prompts == "error":
                raise InputError(
                    f"prompt {prompt_id!r} ({frame['split'].iloc[position]} split): {len(ids)} tokens + max_new_tokens "
                    f"{config.max_new_tokens} exceed the teacher's context of {context}; set sample.overlong_prompts "
                    "to `truncate_left` or `skip`, lower max_new_tokens, or filter long prompts in curation"
                )
            if config.overlong_prompts == "skip":
                prepared.skipped += 1
                continue
            ids = ids[-limit:]
            prepared.truncated += 1
        prepared.positions.append(position)
        prepared.token_ids.append(ids)
    return prepared


def sampled_before(config: SampleConfig, dataset: DatasetRef, store: Store) -> bool:
    """Whether the store holds this teacher's complete output for these prompts (nothing to sample, no waiting)."""
    facts = check_teacher(config)
    return store.manifest("sample", stage_fingerprint(config, dataset, facts.revision)) is not None


def plan_shards(config: SampleConfig, dataset: DatasetRef, store: Store) -> ShardPlan:
    """Check the teacher and the prompts, and list the shards still to sample (none when the output is complete)."""
    facts = check_teacher(config)
    stage = stage_fingerprint(config, dataset, facts.revision)
    folder = store.path("sample", stage)
    manifest = store.claim(
        "sample", stage
    )  # waits while another run samples this output; on s3 it fetches the shards already uploaded
    if manifest is not None:
        return ShardPlan(
            fingerprint=stage,
            folder=str(folder),
            cached=True,
            prompts=manifest["prompts"],
            shards=len(manifest["shards"]),
            pending=[],
            teacher=facts,
            counts=manifest["counts"],
        )
    prompts = read_prompts(dataset)
    counts = {"truncated": 0, "skipped": 0}
    if facts.tokenizer_path is not None:  # lengths are checked (and errors raised) before any shard starts
        tokenizer = load_tokenizer(
            facts.tokenizer_path,
            config.revision,
            trust_remote_code=config.trust_remote_code and config.engine != "openai",
        )
        prepared = prepare_prompts(config, tokenizer, facts.context_length, prompts)
        counts = {"truncated": prepared.truncated, "skipped": prepared.skipped}
    folder.mkdir(parents=True, exist_ok=True)
    remove_partial_shards(folder)
    shards = -(-len(prompts) // config.shard_rows)
    pending = [index for index in range(shards) if not (folder / shard_name(index)).exists()]
    return ShardPlan(
        fingerprint=stage,
        folder=str(folder),
        cached=False,
        prompts=len(prompts),
        shards=shards,
        pending=pending,
        teacher=facts,
        counts=counts,
        remote_store=store.url,
    )


# One loaded engine per process, reused by every shard that runs here (loading a teacher is slow).
_engine_lock = threading.Lock()
_loaded: dict[str, tuple[Engine, PreTrainedTokenizerBase | None]] = {}


def load_engine(config: SampleConfig, facts: TeacherFacts) -> tuple[Engine, PreTrainedTokenizerBase | None]:
    """The engine for ``config`` and the teacher's tokenizer (None for a served teacher without one), loaded once.

    A teacher in memory is reused by every config that loads it the same way, whatever they sample
    (the settings come with each call); only the `hf` engine's batch sizes are taken from the config
    here, on a copy that shares the loaded model. An HTTP client is cheap: one per endpoint and model.
    """
    from stillhouse.sampling.hf_engine import HFEngine

    if config.engine == "openai":
        identity = [config.teacher, config.openai.model_dump(mode="json")]
    else:
        identity = [facts.path, config.dtype, config.device, config.gpu_memory_utilization]
        if config.engine == "vllm":
            identity.append(config.vllm.model_dump(mode="json"))
    key = json.dumps([config.engine, facts.revision, facts.tokenizer_path, identity])
    with _engine_lock:
        if key not in _loaded:
            for evicted, _ in _loaded.values():  # replicas hold GPUs on a cluster until closed
                evicted.close()
            _loaded.clear()
            local = config.engine != "openai"
            tokenizer = (
                load_tokenizer(
                    facts.tokenizer_path,
                    config.revision if local else None,
                    trust_remote_code=config.trust_remote_code and local,
                )
                if facts.tokenizer_path
                else None
            )
            if config.engine == "hf":
                model = load_causal_lm(
                    facts.path,
                    revision=config.revision,
                    dtype=config.dtype,
                    device=config.device,
                    trust_remote_code=config.trust_remote_code,
                    field="sample.teacher",
                )
                engine = HFEngine(model, tokenizer)
            elif config.engine == "vllm":
                from stillhouse.sampling.vllm_engine import VLLMEngine, VLLMReplicas

                engine = (VLLMReplicas if uses_ray(config.vllm) else VLLMEngine)(
                    facts.path,
                    revision=config.revision,
                    dtype=config.dtype,
                    seed=config.seed,
                    gpu_memory_utilization=config.gpu_memory_utilization,
                    max_logprobs=max(20, config.top_k_logprobs),
                    parallel=config.vllm,
                )
            else:
                from stillhouse.sampling.openai_engine import OpenAIEngine

                engine = OpenAIEngine(config.openai, config.teacher, tokenizer=tokenizer)
            _loaded[key] = (engine, tokenizer)
        engine, tokenizer = _loaded[key]
    if isinstance(engine, HFEngine):
        engine = dataclasses.replace(engine, batch_size=config.batch_size, batch_tokens=config.batch_tokens)
    return engine, tokenizer


def unload_engines() -> None:
    """Close and drop the engines loaded in this process (vLLM replicas give their GPUs back to the cluster)."""
    with _engine_lock:
        for engine, _ in _loaded.values():
            engine.close()
        _loaded.clear()


def shard_prompts(
    config: SampleConfig, tokenizer, context: int | None, frame: pd.DataFrame
) -> tuple[list[int], list[Prompt]]:
    """The rows of ``frame`` to sample and their prompts, after `overlong_prompts` (`prepare_prompts`).

    A local teacher gets the rendered, possibly truncated token ids. A served one (engine `openai`)
    gets the messages and renders them itself: its tokenizer, when one is named, only checks lengths,
    and only against a ``context_length`` set in the config.
    """
    ids, messages = frame["prompt_id"].tolist(), [json.loads(m) for m in frame["messages"]]
    if config.engine == "openai":
        positions = list(range(len(frame)))
        if tokenizer is not None and context is not None:
            positions = prepare_prompts(config, tokenizer, context, frame).positions
        return positions, [Prompt(ids[position], messages[position]) for position in positions]
    prepared = prepare_prompts(config, tokenizer, context, frame)
    return prepared.positions, [
        Prompt(ids[position], messages[position], token_ids)
        for position, token_ids in zip(prepared.positions, prepared.token_ids)
    ]


def sample_shard(
    config: SampleConfig,
    dataset: DatasetRef,
    plan: ShardPlan,
    index: int,
    on_prompts: Callable[[int], None] | None = None,
) -> ShardResult:
    """Sample shard ``index`` and write it atomically; a shard already on disk is left as it is."""
    started = time.perf_counter()
    path = Path(plan.folder) / shard_name(index)
    if path.exists():  # completed by an earlier, interrupted run
        rows = pq.read_table(path, columns=["response_token_ids"]).column("response_token_ids").to_pylist()
        return ShardResult(index=index, rows=len(rows), generated_tokens=sum(map(len, rows)), seconds=0.0, resumed=True)
    frame = (
        read_prompts(dataset).iloc[index * config.shard_rows : (index + 1) * config.shard_rows].reset_index(drop=True)
    )
    engine, tokenizer = load_engine(config, plan.teacher)
    label = f"shard {index} ({shard_name(index)})"
    positions, prompts = shard_prompts(config, tokenizer, plan.teacher.context_length, frame)
    seed = config.seed + SHARD_SEED_STRIDE * index
    settings = SamplingSettings.from_config(config)
    generations = engine.generate(prompts, settings, seed=seed, where=label, on_progress=on_prompts)
    kept = frame.iloc[positions]
    prompt_ids = [pid for pid in kept["prompt_id"] for _ in range(config.n)]
    splits = [split for split in kept["split"] for _ in range(config.n)]
    _check_generations(generations, len(prompt_ids), label)
    with storage_errors(
        str(path), plan.folder
    ):  # disk full or read-only: name the folder and the fix, not a pyarrow traceback
        write_shard(path, prompt_ids, splits, generations)
    if plan.remote_store:
        Store(plan.remote_store).upload_partial("sample", plan.fingerprint, path)
    return ShardResult(
        index=index,
        rows=len(generations),
        generated_tokens=sum(len(g.token_ids) for g in generations),
        seconds=time.perf_counter() - started,
        resumed=False,
    )


def _check_generations(generations: list[Generation], expected: int, label: str) -> None:
    if len(generations) != expected or any(g is None for g in generations):
        raise RuntimeError(f"{label}: the engine returned {len(generations)} generations for {expected} rows")


def finish_sampling(config: SampleConfig, plan: ShardPlan, store: Store) -> SamplesRef:
    """Seal the output with its manifest once every shard is on disk; returns the stage's reference."""

    def manifest(folder: Path) -> dict:
        missing = [shard_name(i) for i in range(plan.shards) if not (folder / shard_name(i)).exists()]
        if missing:
            raise RuntimeError(
                f"sample {plan.fingerprint}: {len(missing)} shard(s) missing ({', '.join(missing[:3])}); "
                "rerun to sample them"
            )
        tokenizer = (
            load_tokenizer(plan.teacher.tokenizer_path, config.revision if config.engine != "openai" else None)
            if plan.teacher.tokenizer_path
            else None
        )
        # Rows and tokens from the token column alone: decoding the top-k of every shard here would cost minutes.
        lengths = [
            pq.read_table(folder / shard_name(i), columns=["response_token_ids"])
            .column(0)
            .combine_chunks()
            .value_lengths()
            for i in range(plan.shards)
        ]
        return {
            "teacher": config.teacher,
            "teacher_path": plan.teacher.path,
            "teacher_revision": plan.teacher.revision,
            # Where later stages find the teacher's tokenizer, and whether its weights are here at all
            # (not for a served teacher).
            "teacher_tokenizer": plan.teacher.tokenizer_path,
            "teacher_is_served": config.engine == "openai",
            "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer) if tokenizer is not None else "unknown",
            "chat_template": tokenizer.chat_template if tokenizer is not None else None,
            "engine": config.engine,
            "top_k_logprobs": config.top_k_logprobs,
            # How shards are written now (teacher_outputs.py; each shard's own format is listed below): format 2
            # keeps log-probs in fixed point, each within half a step of the teacher's (format 1: float16, off by up
            # to 4e-3 below -8). `read_teacher_outputs` reads both alike.
            "teacher_outputs_format": TEACHER_OUTPUTS_FORMAT,
            "logprob_precision": {"step": LOGPROB_STEP, "max_error": LOGPROB_STEP / 2},
            "sampling": {
                "temperature": config.temperature,
                "top_p": config.top_p,
                "top_k": config.top_k,
                "n": config.n,
                "stop": list(config.stop),
                "max_new_tokens": config.max_new_tokens,
                "seed": config.seed,
            },
            "prompts": plan.prompts,
            "counts": plan.counts,
            "rows": int(sum(len(shard) for shard in lengths)),
            "generated_tokens": int(sum(shard.to_numpy(zero_copy_only=False).sum() for shard in lengths)),
            "shards": [
                {
                    "name": shard_name(i),
                    "sha256": file_sha256(folder / shard_name(i)),
                    "format": shard_format(pq.read_schema(folder / shard_name(i))),  # 1 if resumed from older code
                }
                for i in range(plan.shards)
            ],
        }

    output = store.build("sample", plan.fingerprint, manifest)
    recorded = output.manifest
    return SamplesRef(
        stage="sample",
        fingerprint=plan.fingerprint,
        path=str(output.path),
        cached=plan.cached,
        rows=recorded["rows"],
        teacher=recorded["teacher_path"],
        teacher_revision=recorded["teacher_revision"],
        tokenizer_fingerprint=recorded["tokenizer_fingerprint"],
        top_k_logprobs=recorded["top_k_logprobs"],
        generated_tokens=recorded["generated_tokens"],
        # Older manifests lack both; a tokenizer named in the config now still counts
        # (it belongs to the served model, not the samples).
        teacher_tokenizer=recorded.get("teacher_tokenizer") or plan.teacher.tokenizer_path,
        teacher_is_served=recorded.get("teacher_is_served", recorded["engine"] == "openai"),
    )


def uses_vllm_replicas(config: SampleConfig) -> bool:
    """Engine `vllm` as Ray actors (`VLLMReplicas`): ``sample.vllm.replicas`` > 1, or a Ray cluster named.

    The replicas already hold their GPUs, so the shards that feed them are light work (send prompts,
    write Parquet) and run on threads of the one process that holds the replicas.
    """
    return config.engine == "vllm" and uses_ray(config.vllm)


def concurrent_shards(config: SampleConfig) -> int:
    """Shards worth running at once in one process: one per vLLM replica, else one."""
    return config.vllm.replicas if uses_vllm_replicas(config) else 1


def sample_teacher(
    config: SampleConfig, dataset: DatasetRef, store: Store, progress: Callable[[float], None] | None = None
) -> SamplesRef:
    """Sample every missing shard in this process, then seal the output; ``progress(fraction)`` after each batch."""
    plan = plan_shards(config, dataset, store)
    if plan.pending:
        done = plan.prompts - sum(min(config.shard_rows, plan.prompts - i * config.shard_rows) for i in plan.pending)
        bar = tqdm(total=plan.prompts, initial=done, desc="sample teacher", unit="prompt")

        def advance(count: int) -> None:
            bar.update(count)
            if progress is not None:
                progress(bar.n / max(plan.prompts, 1))

        workers = concurrent_shards(config)
        if workers == 1:  # also one replica on a Ray cluster: its calls run one at a time anyway
            for index in plan.pending:
                sample_shard(config, dataset, plan, index, on_prompts=advance)
        else:  # one shard in flight per vLLM replica; each call takes a free replica
            pool = ThreadPoolExecutor(max_workers=workers)
            try:
                futures = [pool.submit(sample_shard, config, dataset, plan, index, advance) for index in plan.pending]
                for future in futures:
                    future.result()
            finally:  # on the first failure, shards not yet started are dropped
                pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    return finish_sampling(config, plan, store)
