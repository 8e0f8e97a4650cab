"""The sampling stage: the teacher answers every curated prompt (train and eval splits).

    python -c "from stillhouse.sampling.sample import sample_teacher"   # called by tasks/sample.py
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from stillhouse.config import SampleConfig
from stillhouse.data.curate import read_split
from stillhouse.errors import InputError
from stillhouse.models import load_causal_lm, load_tokenizer, model_revision, resolve_model, tokenizer_fingerprint, vocab_size
from stillhouse.refs import DatasetRef, SamplesRef
from stillhouse.sampling.hf_engine import generate, render_prompts
from stillhouse.sampling.teacher_outputs import read_teacher_outputs, shard_name, write_shard
from stillhouse.store import Store, file_sha256, fingerprint

CODE_VERSION = 1


def check_teacher(config: SampleConfig) -> str:
    """Resolve the teacher and check k against its vocabulary, reading only its config."""
    teacher = resolve_model(config.teacher, "sample.teacher")
    vocabulary = vocab_size(teacher, config.revision)
    if config.top_k_logprobs > vocabulary:
        raise InputError(f"sample.top_k_logprobs: k={config.top_k_logprobs} is larger than the teacher's vocabulary ({vocabulary}); use a k of at most {vocabulary} (16-64 is typical)")
    return teacher


def sample_teacher(config: SampleConfig, dataset: DatasetRef, store: Store, progress: Callable[[float], None] | None = None) -> SamplesRef:
    teacher = check_teacher(config)
    revision = model_revision(teacher, config.revision)
    settings = config.model_dump(mode="json", exclude={"teacher", "revision", "device"})
    stage_fingerprint = fingerprint("sample", settings, {"dataset": dataset.fingerprint, "teacher": f"{config.teacher}@{revision}"}, CODE_VERSION)

    def compute(folder: Path) -> dict:
        prompts = pd.concat([read_split(dataset, "train").assign(split="train"), read_split(dataset, "eval").assign(split="eval")], ignore_index=True)
        tokenizer = load_tokenizer(teacher, config.revision)
        if tokenizer.chat_template is None:
            raise InputError(f"sample.teacher: {config.teacher!r} has no chat template; use an instruction-tuned teacher or add one to its tokenizer_config.json")
        model = load_causal_lm(teacher, revision=config.revision, dtype=config.dtype, device=config.device)
        shard_starts = list(range(0, len(prompts), config.shard_rows))
        done = sum(min(config.shard_rows, len(prompts) - start) for index, start in enumerate(shard_starts) if (folder / shard_name(index)).exists())
        bar = tqdm(total=len(prompts), initial=done, desc="sample teacher", unit="prompt")

        def advance(count: int) -> None:
            bar.update(count)
            if progress is not None:
                progress(bar.n / len(prompts))

        for index, start in enumerate(shard_starts):
            path = folder / shard_name(index)
            if path.exists():  # completed by an earlier, interrupted run
                continue
            shard = prompts.iloc[start : start + config.shard_rows]
            generations = generate(
                model, tokenizer, render_prompts(tokenizer, [json.loads(m) for m in shard["messages"]]),
                max_new_tokens=config.max_new_tokens, batch_size=config.batch_size, temperature=config.temperature,
                top_p=config.top_p, top_k_logprobs=config.top_k_logprobs, seed=config.seed + 100_003 * index, on_batch=advance,
            )
            write_shard(path, shard["prompt_id"].tolist(), shard["split"].tolist(), generations)
        bar.close()
        shards = [{"name": shard_name(i), "sha256": file_sha256(folder / shard_name(i))} for i in range(len(shard_starts))]
        generated = sum(len(ids) for ids in read_teacher_outputs(folder)["response_token_ids"])
        return {
            "teacher": config.teacher, "teacher_path": teacher, "teacher_revision": revision,
            "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "chat_template": tokenizer.chat_template,
            "engine": config.engine, "top_k_logprobs": config.top_k_logprobs,
            "sampling": {"temperature": config.temperature, "top_p": config.top_p, "max_new_tokens": config.max_new_tokens, "seed": config.seed},
            "rows": len(prompts), "generated_tokens": int(generated), "shards": shards,
        }

    output = store.build("sample", stage_fingerprint, compute)
    manifest = output.manifest
    return SamplesRef(
        stage="sample", fingerprint=stage_fingerprint, path=str(output.path), cached=output.cached, rows=manifest["rows"],
        teacher=manifest["teacher_path"], teacher_revision=manifest["teacher_revision"],
        tokenizer_fingerprint=manifest["tokenizer_fingerprint"], top_k_logprobs=manifest["top_k_logprobs"],
        generated_tokens=manifest["generated_tokens"],
    )
