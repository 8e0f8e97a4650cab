"""Teacher sampling: the `hf` engine's tokens/s against a naive loop, and the store's bytes per generated token.

    .venv/bin/python benchmarks/sampling.py [--prompts 256] [--repeats 3] [--batch-size 128] [--batch-tokens 4096]
        [--threads CORES]

1. Throughput on the bundled demo teacher, greedy, ``--threads`` torch threads for both, against a naive loop: a
   strawman kept to show what batching alone gives. The honest peer, left-padded batched ``model.generate``, is
   benchmarks/peer_sampling.py's (1.2-1.9x, see there). The naive loop sends one prompt at a time through
   ``model.generate``; the engine (`stillhouse.sampling.hf_engine.generate`) sorts by
   length, batches under a token budget and decodes greedily in its own loop that retires finished
   rows. Both must give the same tokens. Medians over repeats, the modes alternating. The engine is
   measured without and with top-k capture (k = 16). ``prefill_ceiling_over_naive`` is the speed-up an
   engine would reach if decoding cost nothing: the naive loop's time over the time of the engine's
   batched prompt forwards alone. Demo prompts are about 19 tokens and answers about 6, so processing
   the prompts, which batching cannot shorten, is more than half of the engine's time.
   Measured on a quiet 2-core CPU, four runs of 5 repeats: 9.4x, 9.8x, 10.8x and 10.9x on both cores
   (median 10.3x; 9.3-10.7x with top-16 capture); on one thread 7.2-8.1x, since the naive loop's
   single-row steps gain nothing from a second core and the batched matmuls do.
2. Store size: a shard of synthetic responses with a 32,000-token vocabulary, top-k ids and
   log-probs per position for k = 20 and k = 128, written exactly as the sampling stage writes it
   (zstd Parquet, int32 ids, float16 log-probs, tail mass). The per-position distributions are
   softmaxes of random logits with a Zipf-like prior on token frequency, so ids repeat across
   positions roughly as a real teacher's do. Dense float16 logits would take 64,000 bytes a token.
3. On a CUDA machine with vLLM installed: `vllm` against `hf` tokens/s (otherwise reported as skipped).

Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from stillhouse.demo import TEACHER_DIR as DEMO_TEACHER_DIR
from stillhouse.demo.tasks import make_examples
from stillhouse.models import load_causal_lm, load_tokenizer
from stillhouse.sampling.engine import Generation
from stillhouse.sampling.hf_engine import generate, plan_batches, render_prompts
from stillhouse.sampling.teacher_outputs import write_shard

MAX_NEW_TOKENS = 32


@torch.inference_mode()
def naive_loop(model, tokenizer, prompts: list[str]) -> tuple[float, list[list[int]]]:
    """One prompt at a time through `model.generate`, the way a first script would do it."""
    started = time.perf_counter()
    answers = []
    for prompt in prompts:
        inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        output = model.generate(
            **inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
        tokens = output[0, inputs["input_ids"].shape[1] :].tolist()
        answers.append(
            tokens[: tokens.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in tokens else tokens
        )
    return sum(map(len, answers)) / (time.perf_counter() - started), answers


def engine(model, tokenizer, prompts: list[str], args, top_k_logprobs: int) -> tuple[float, list[list[int]]]:
    started = time.perf_counter()
    generations = generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=MAX_NEW_TOKENS,
        batch_size=args.batch_size,
        batch_tokens=args.batch_tokens,
        top_k_logprobs=top_k_logprobs,
    )
    answers = [g.token_ids for g in generations]
    return sum(map(len, answers)) / (time.perf_counter() - started), answers


@torch.inference_mode()
def prompt_forwards_only(model, tokenizer, prompts: list[str], args) -> float:
    """Seconds of the engine's batched forward passes over the prompts alone (its batches, no decoding)."""
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    batches = plan_batches(
        [len(ids) for ids in encoded],
        batch_size=args.batch_size,
        batch_tokens=args.batch_tokens,
        max_new_tokens=MAX_NEW_TOKENS,
    )
    padded = [
        tokenizer.pad({"input_ids": [encoded[i] for i in batch]}, padding=True, return_tensors="pt")
        for batch in batches
    ]
    started = time.perf_counter()
    for batch in padded:
        model(**batch, logits_to_keep=1)
    return time.perf_counter() - started


def throughput(args) -> dict:
    model, tokenizer = load_causal_lm(str(DEMO_TEACHER_DIR), device="cpu"), load_tokenizer(str(DEMO_TEACHER_DIR))
    prompts = render_prompts(
        tokenizer, [[{"role": "user", "content": r["prompt"]}] for r in make_examples(args.prompts, seed=11)]
    )
    engine(model, tokenizer, prompts[:8], args, 0)  # warm-up
    rates: dict[str, list[float]] = {"naive": [], "engine": [], "engine_top16": []}
    identical = True
    for _ in range(args.repeats):
        rate, naive_answers = naive_loop(model, tokenizer, prompts)
        rates["naive"].append(rate)
        for name, k in (("engine", 0), ("engine_top16", 16)):
            rate, answers = engine(model, tokenizer, prompts, args, k)
            rates[name].append(rate)
            identical &= answers == naive_answers
    seconds_naive = [sum(len(a) for a in naive_answers) / rate for rate in rates["naive"]]
    prefill_seconds = [prompt_forwards_only(model, tokenizer, prompts, args) for _ in range(args.repeats)]
    median = {name: statistics.median(values) for name, values in rates.items()}
    return {
        "prompts": args.prompts,
        "max_new_tokens": MAX_NEW_TOKENS,
        "batch_size": args.batch_size,
        "batch_tokens": args.batch_tokens,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "naive_tokens_per_s": round(median["naive"], 1),
        "engine_tokens_per_s": round(median["engine"], 1),
        "engine_over_naive": round(median["engine"] / median["naive"], 2),
        "engine_top16_tokens_per_s": round(median["engine_top16"], 1),
        "engine_top16_over_naive": round(median["engine_top16"] / median["naive"], 2),
        "prefill_ceiling_over_naive": round(statistics.median(seconds_naive) / statistics.median(prefill_seconds), 2),
        "identical_outputs": identical,
    }


def synthetic_generations(k: int, responses: int, length: int, vocab: int, seed: int) -> list[Generation]:
    generator = torch.Generator().manual_seed(seed)
    prior = (
        -1.1 * torch.log(torch.arange(1, vocab + 1, dtype=torch.float32))[torch.randperm(vocab, generator=generator)]
    )
    generations = []
    for _ in range(responses):
        logits = prior + 3.0 * torch.randn(length, vocab, generator=generator)
        logprobs = logits.log_softmax(-1)
        values, ids = logprobs.topk(k, dim=-1)
        tails = torch.logsumexp(logprobs.scatter(-1, ids, float("-inf")), dim=-1)
        tokens = ids[:, 0].tolist()
        generations.append(
            Generation(
                token_ids=tokens,
                text="x" * (4 * length),
                top_k_ids=ids.tolist(),
                top_k_logprobs=values.tolist(),
                tail_logprobs=tails.tolist(),
            )
        )
    return generations


def store_size(k: int, responses: int = 64, length: int = 128, vocab: int = 32_000) -> dict:
    generations = synthetic_generations(k, responses, length, vocab, seed=k)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "shard-00000.parquet"
        write_shard(path, [f"p{i}" for i in range(responses)], ["train"] * responses, generations)
        size = path.stat().st_size
    tokens = responses * length
    return {
        "k": k,
        "vocab": vocab,
        "generated_tokens": tokens,
        "bytes_per_token": round(size / tokens, 1),
        "raw_ids_and_logprobs_bytes_per_token": 6 * k,
        "dense_float16_bytes_per_token": 2 * vocab,
    }


def vllm_against_hf(args) -> dict | str:
    from stillhouse.sampling.vllm_engine import vllm_available

    if not vllm_available():
        return "skipped: needs vLLM and a CUDA GPU"
    from vllm import LLM, SamplingParams

    model_dir = args.vllm_model or str(DEMO_TEACHER_DIR)
    tokenizer = load_tokenizer(model_dir)
    prompts = render_prompts(
        tokenizer, [[{"role": "user", "content": r["prompt"]}] for r in make_examples(args.prompts, seed=11)]
    )
    model = load_causal_lm(model_dir, device="cuda", dtype="bfloat16")
    started = time.perf_counter()
    tokens = sum(
        len(g.token_ids)
        for g in generate(model, tokenizer, prompts, max_new_tokens=MAX_NEW_TOKENS, batch_size=args.batch_size)
    )
    hf_rate = tokens / (time.perf_counter() - started)
    del model
    llm = LLM(model=model_dir, dtype="bfloat16", gpu_memory_utilization=0.5)
    started = time.perf_counter()
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_NEW_TOKENS), use_tqdm=False)
    vllm_rate = sum(len(o.outputs[0].token_ids) for o in outputs) / (time.perf_counter() - started)
    return {
        "model": model_dir,
        "hf_tokens_per_s": round(hf_rate, 1),
        "vllm_tokens_per_s": round(vllm_rate, 1),
        "vllm_over_hf": round(vllm_rate / hf_rate, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument(
        "--vllm-model", default=None, help="a small real model folder for the vllm-vs-hf figure (GPU only)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count(),
        help="torch threads for both modes (default: every core; run it on a quiet machine)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    np.random.seed(0)
    print(
        json.dumps(
            {
                "benchmark": "sampling",
                "throughput": throughput(args),
                "store": [store_size(20), store_size(128)],
                "vllm_vs_hf": vllm_against_hf(args),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
