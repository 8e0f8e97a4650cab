"""Throughput of whole training steps on the demo student, by distillation mode, against our own SFT.

    .venv/bin/python benchmarks/kd_training_step.py [--steps 100] [--repeats 3]

Curates and samples the demo data into a temporary store, then trains the demo student for
``--steps`` optimizer steps in each mode (SFT; KD on the stored top-16; KD with the teacher online,
dense and top-16; on-policy GKD with λ=0.5) and prints JSON: each mode's time relative to SFT and
tokens/s (medians of the repeats, modes alternating within each repeat, one torch thread).

The peer here is our own SFT in the same run: these figures say what each mode costs over plain SFT, not how
fast we are against another library (benchmarks/peer_training.py compares with TRL's SFTTrainer and GKDTrainer).
Times are `train_student`'s whole stage (examples, Trainer set-up, saving the student included). The tokens/s
assume every step trains the teacher's mean response length; on-policy steps train the student's rollouts,
whose lengths differ, so for GKD that figure is nominal (peer_training.py counts the tokens each step scores).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile

import torch

from stillhouse.config import CurateConfig, SampleConfig, TrainConfig
from stillhouse.data.curate import curate
from stillhouse.sampling.sample import sample_teacher
from stillhouse.sampling.teacher_outputs import read_teacher_outputs
from stillhouse.store import Store
from stillhouse.training.stage import train_student

STUDENT = {"hidden_size": 64, "num_layers": 4, "intermediate_size": 240, "num_heads": 4}
MODES = {
    "sft": {"method": "sft"},
    "kd_offline_top16": {"method": "kd"},
    "kd_online_dense": {"method": "kd", "kd": {"teacher": "online"}},
    "kd_online_top16": {"method": "kd", "kd": {"teacher": "online", "online_top_k": 16}},
    "gkd_on_policy_lambda_0.5": {
        "method": "kd",
        "kd": {"teacher": "online", "lmbda": 0.5, "rollout_max_new_tokens": 16},
    },
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    # Trainer logs go to stdout; keep stdout for the JSON.
    with tempfile.TemporaryDirectory() as root, contextlib.redirect_stdout(sys.stderr):
        store = Store(root)
        dataset = curate(CurateConfig(source="builtin:demo", demo_rows=2000, eval_fraction=0.05), store)
        samples = sample_teacher(
            SampleConfig(teacher="builtin:demo-teacher", max_new_tokens=16, top_k_logprobs=16), dataset, store
        )
        responses = read_teacher_outputs(samples.path, split="train")["response_token_ids"]
        seconds: dict[str, list[float]] = {mode: [] for mode in MODES}
        for repeat in range(args.repeats):
            for mode, settings in MODES.items():
                config = TrainConfig.model_validate(
                    {
                        "architecture": STUDENT,
                        "max_steps": args.steps,
                        "batch_size": 64,
                        "learning_rate": 3e-3,
                        "threads": 1,
                        "logging_steps": args.steps,
                        "seed": repeat,
                        **settings,
                    }
                )
                seconds[mode].append(train_student(config, dataset, samples, store).train_seconds)
    # Trained tokens per step: the demo prompts plus the teacher's responses (on-policy steps differ in length).
    response_tokens = float(sum(len(r) for r in responses)) / len(responses)
    medians = {mode: statistics.median(values) for mode, values in seconds.items()}
    print(
        json.dumps(
            {
                "benchmark": "kd_training_step",
                "steps": args.steps,
                "batch_size": 64,
                "repeats": args.repeats,
                "mean_response_tokens": round(response_tokens, 1),
                "response_tokens_per_s": {
                    mode: round(args.steps * 64 * response_tokens / s, 1) for mode, s in medians.items()
                },
                "seconds_median": {mode: round(s, 2) for mode, s in medians.items()},
                "time_relative_to_sft": {mode: round(s / medians["sft"], 2) for mode, s in medians.items()},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
