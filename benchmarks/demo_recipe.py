"""Held-out exact match of one demo-student recipe: the train stage's own trainer on the demo's data, then greedy
answers to the eval split. How the README's table of demo variants was measured.

    python benchmarks/demo_recipe.py --set architecture.num_layers=6 --set adam_beta2=0.98 --set seed=1

Each --set is a `train.` field of configs/demo.yaml. Training runs in this one process (the demo's two processes
are torchrun's, so compare their time with `stillhouse run`), on one torch thread unless --set threads=N. The curate
and sample stages come from the store (`.stillhouse/store`), computed the first time. Prints one JSON line: exact
match overall and per task, CPU and wall seconds of training, the student's parameters.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from stillhouse.config import load_config
from stillhouse.data.curate import curate, read_split
from stillhouse.demo.tasks import is_correct
from stillhouse.sampling.hf_engine import generate, render_prompts
from stillhouse.sampling.sample import sample_teacher
from stillhouse.store import Store
from stillhouse.training.train import build_trainer

REPOSITORY = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--store", type=Path, default=Path(".stillhouse/store"))
    args = parser.parse_args()
    config = load_config(
        REPOSITORY / "configs" / "demo.yaml",
        ["train.threads=1", "train.num_processes=1"] + [f"train.{o}" for o in args.overrides],
    )
    store = Store(args.store)
    dataset = curate(config.curate, store)
    samples = sample_teacher(config.sample, dataset, store)
    with tempfile.TemporaryDirectory() as scratch:
        trainer, tokenizer = build_trainer(config.train, dataset, samples, Path(scratch))
        started, cpu_started = time.perf_counter(), time.process_time()
        trainer.train()
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    model = trainer.model.eval()
    held_out = read_split(dataset, "eval")
    prompts = render_prompts(tokenizer, [json.loads(messages) for messages in held_out["messages"]])
    with torch.inference_mode():
        answers = generate(model, tokenizer, prompts, max_new_tokens=config.evaluate.max_new_tokens, batch_size=100)
    hits: dict[str, list[bool]] = {}
    for category, answer, reference in zip(held_out["category"], answers, held_out["reference"]):
        hits.setdefault(category, []).append(is_correct(answer.text, reference))
    every = [hit for task in hits.values() for hit in task]
    print(
        json.dumps(
            {
                "overrides": args.overrides,
                "exact_match": round(100 * sum(every) / len(every), 1),
                "per_task": {task: round(100 * sum(h) / len(h), 1) for task, h in sorted(hits.items())},
                "train_cpu_seconds": round(cpu, 1),
                "train_wall_seconds": round(wall, 1),
                "parameters": sum(p.numel() for p in model.parameters()),
            }
        )
    )


if __name__ == "__main__":
    sys.exit(main())
