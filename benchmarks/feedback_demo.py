"""Feedback-guided distillation on the demo: does SFT -> DPO beat SFT alone?

    .venv/bin/python benchmarks/feedback_demo.py [--config configs/demo-dpo.yaml] [--eval-prompts 1500]
        [--sft-steps-control 1200]

Runs the stages of the chain config with the core functions (no Prefect, no MLflow): curation,
teacher sampling, the SFT student, judged pairs and the feedback step. It then scores the SFT student,
the chain's student and, as a control, an SFT student trained for ``--sft-steps-control`` steps
(about the chain's compute in sequences seen), all with greedy decoding on fresh demo prompts
that appear nowhere in the training split. The pipeline's own eval split holds only about 200
prompts, where one point is two prompts.

Per student it reports exact match overall and by task. For the chain against each SFT student it
reports wins (only the chain is right), losses (only the SFT student is right) and the verifier-judged
win rate with its 95% Wilson interval, ties counting half: the same measure as the pipeline's
``student_win_rate_vs_baseline`` with ``evaluate.win_rate_judge: verifier``.

Prints JSON. About 10 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time

import pandas as pd
import torch

from stillhouse.config import load_config
from stillhouse.data.curate import curate, read_split
from stillhouse.demo.tasks import is_correct, make_examples
from stillhouse.feedback.judge import PairJudgement, win_rate
from stillhouse.feedback.stage import collect_preferences, train_on_feedback
from stillhouse.models import load_causal_lm, load_tokenizer
from stillhouse.sampling.hf_engine import generate, render_prompts
from stillhouse.sampling.sample import sample_teacher
from stillhouse.store import Store
from stillhouse.training.stage import train_student


def fresh_eval_prompts(train_prompts: set[str], count: int, seed: int = 987) -> pd.DataFrame:
    rows = [row for row in make_examples(3 * count, seed=seed) if row["prompt"] not in train_prompts][:count]
    return pd.DataFrame(rows)


def answers_of(model_path: str, prompts: pd.DataFrame, max_new_tokens: int) -> list[str]:
    model, tokenizer = load_causal_lm(model_path, device="cpu"), load_tokenizer(model_path)
    rendered = render_prompts(tokenizer, [[{"role": "user", "content": prompt}] for prompt in prompts["prompt"]])
    return [g.text for g in generate(model, tokenizer, rendered, max_new_tokens=max_new_tokens, batch_size=100)]


def exact_match(answers: list[str], prompts: pd.DataFrame) -> dict[str, float]:
    hits = pd.Series([is_correct(a, r) for a, r in zip(answers, prompts["reference"])])
    return {
        "all": round(hits.mean(), 4),
        **{task: round(h.mean(), 4) for task, h in hits.groupby(prompts["task"].to_numpy())},
    }


def head_to_head(first: list[str], second: list[str], prompts: pd.DataFrame) -> dict[str, float]:
    right = [(is_correct(a, r), is_correct(b, r)) for a, b, r in zip(first, second, prompts["reference"])]
    rate = win_rate([PairJudgement(first_better=(a - b + 1) / 2, consistent=True) for a, b in right])
    return {
        "wins": sum(a and not b for a, b in right),
        "losses": sum(b and not a for a, b in right),
        "win_rate": round(rate.rate, 4),
        "win_rate_low": round(rate.low, 4),
        "win_rate_high": round(rate.high, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/demo-dpo.yaml")
    parser.add_argument("--eval-prompts", type=int, default=1500)
    parser.add_argument("--sft-steps-control", type=int, default=1200)
    parser.add_argument("--store", default=None, help="reuse a store between runs (default: a temporary folder)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    # The trainers print their logs; keep stdout for the JSON.
    with tempfile.TemporaryDirectory() as scratch, contextlib.redirect_stdout(sys.stderr):
        config = load_config(args.config, [f"store={args.store or scratch}"])
        assert config.feedback is not None, f"{args.config} has no feedback section"
        store = Store.from_config(config.store)
        seconds: dict[str, float] = {}

        def timed(name: str, call):
            started = time.perf_counter()
            value = call()
            seconds[name] = round(time.perf_counter() - started, 1)
            return value

        dataset = timed("curate", lambda: curate(config.curate, store))
        samples = timed("sample", lambda: sample_teacher(config.sample, dataset, store))
        sft = timed("train_sft", lambda: train_student(config.train, dataset, samples, store))
        pairs = timed("judge", lambda: collect_preferences(config.feedback, dataset, samples, sft, store))
        chain = timed("feedback", lambda: train_on_feedback(config.feedback, dataset, pairs, sft, store))
        control_config = config.train.model_copy(update={"max_steps": args.sft_steps_control})
        control = timed("train_sft_control", lambda: train_student(control_config, dataset, samples, store))

        train_prompts = {json.loads(m)[-1]["content"] for m in read_split(dataset, "train")["messages"]}
        prompts = fresh_eval_prompts(train_prompts, args.eval_prompts)
        tokens = config.evaluate.max_new_tokens
        answers = {
            name: answers_of(ref.model_path, prompts, tokens)
            for name, ref in (("sft", sft), ("chain", chain), ("sft_control", control))
        }
        result = {
            "benchmark": "feedback_demo",
            "config": args.config,
            "eval_prompts": len(prompts),
            "sft_steps": config.train.max_steps,
            "feedback": config.feedback.model_dump(
                mode="json",
                include={
                    "method",
                    "candidates",
                    "temperature",
                    "include_teacher",
                    "beta",
                    "sft_weight",
                    "learning_rate",
                    "max_steps",
                    "batch_size",
                },
            ),
            "pairs": pairs.pairs,
            "sft_steps_control": args.sft_steps_control,
            "exact_match": {name: exact_match(texts, prompts) for name, texts in answers.items()},
            "chain_vs_sft": head_to_head(answers["chain"], answers["sft"], prompts),
            "chain_vs_sft_control": head_to_head(answers["chain"], answers["sft_control"], prompts),
            "seconds": seconds,
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
