"""Teacher sampling throughput: batched, length-sorted generation against one prompt at a time.

    .venv/bin/python benchmarks/sampling_batching.py [--prompts 128] [--repeats 3]

Prints JSON: generated tokens/s of each mode (median of the repeats) and their ratio, measured in
the same run on the bundled demo teacher with one torch thread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from stillhouse.demo.tasks import make_examples
from stillhouse.models import DEMO_TEACHER_DIR, load_causal_lm, load_tokenizer
from stillhouse.sampling.hf_engine import generate, render_prompts


def tokens_per_second(model, tokenizer, prompts, batch_size: int) -> tuple[float, list[list[int]]]:
    started = time.perf_counter()
    generations = generate(model, tokenizer, prompts, max_new_tokens=16, batch_size=batch_size)
    seconds = time.perf_counter() - started
    return sum(len(g.token_ids) for g in generations) / seconds, [g.token_ids for g in generations]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = load_causal_lm(str(DEMO_TEACHER_DIR), device="cpu"), load_tokenizer(str(DEMO_TEACHER_DIR))
    prompts = render_prompts(tokenizer, [[{"role": "user", "content": r["prompt"]}] for r in make_examples(args.prompts, seed=11)])
    single, batched = [], []
    for _ in range(args.repeats):
        rate_single, tokens_single = tokens_per_second(model, tokenizer, prompts, 1)
        rate_batched, tokens_batched = tokens_per_second(model, tokenizer, prompts, args.batch_size)
        single.append(rate_single)
        batched.append(rate_batched)
    print(json.dumps({
        "benchmark": "sampling_batching",
        "prompts": args.prompts, "batch_size": args.batch_size, "repeats": args.repeats,
        "one_at_a_time_tokens_per_s": round(statistics.median(single), 1),
        "batched_tokens_per_s": round(statistics.median(batched), 1),
        "batched_over_one_at_a_time": round(statistics.median(batched) / statistics.median(single), 2),
        "identical_outputs": tokens_single == tokens_batched,
    }, indent=2))


if __name__ == "__main__":
    main()
