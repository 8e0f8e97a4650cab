"""Whole training steps against TRL's trainers: SFT vs `SFTTrainer`, offline top-16 KD vs our SFT, on-policy GKD vs
`GKDTrainer`, in response tokens/s.

    .venv/bin/python benchmarks/peer_training.py [--quick]

Called by benchmarks/peers.py as ``peer_training.run(quick)``; prints the same report as JSON (last line).

Set-up, once: the demo data (``builtin:demo``, 2000 rows; 400 with ``--quick``) curated and answered by the bundled
demo teacher (4 layers, hidden 128, character vocabulary) with 16 new tokens and its top-16 log-probs stored, in a
temporary store. The student is built from scratch (4 layers, hidden 64, `STUDENT`) with seed = the repeat number,
so within a repeat every trainer starts from the same weights and sees the same batches (Trainer's sampler, same
seed, same examples in the same order). Batch 64, AdamW at 3e-3, one torch thread, CPU.

Pairs (each side a fresh trainer per repeat; repeats alternate the order of the sides). TRL's trainers run with
``gradient_checkpointing: false``, as ours does by default; TRL's own default (true) recomputes every forward in the
backward and makes GKD's rollouts generate without a KV cache, which flatters us: ``gkd_vs_trl_defaults`` is our
GKD against TRL's GKD with that default, for reference.

- ``sft``: ours (`build_trainer`, ``method: sft``) against TRL 1.16 ``SFTTrainer`` given the same token ids and
  labels (prompt masked), so neither tokenizes during training;
- ``kd_vs_sft``: our offline KD on the stored top-16 (``kd_weight`` 1, ``ce_weight`` 0.5: the defaults) against
  our SFT of the same repeat;
- ``gkd``: our on-policy GKD (``kd.teacher: online``, the demo teacher, dense JSD) against TRL 1.16
  ``trl.experimental.gkd.GKDTrainer`` with the same teacher, λ = 0.5, β = 0.5, no cross-entropy (TRL has none),
  16 new tokens sampled at temperature 1 (TRL: ``temperature`` 1; its loss then runs at τ = 1 like ours), its
  dataset pre-tokenized (``input_ids`` + ``completion_mask``) so its collator doesn't tokenize. Both draw
  on-policy steps from a `random.Random` seeded with the trainer seed (ours `DistillationTrainer.on_policy_draws`,
  TRL the `random` module that Trainer seeds), so both take the same steps on-policy; the report lists them.
- ``gkd_top16``: ours again with ``kd.online_top_k: 16``: the teacher compared by its top-16, off-policy batches
  reusing the stored top-16 (no teacher forward), against the same TRL runs (TRL has no top-k teacher).

What is timed: the wall time from the end of each run's first optimizer step to the end of its last (Trainer's
set-up, the first step and the end-of-training clean-up are left out, the same code on both sides), and the
response tokens trained in those steps: the labels counted by each side's loss (the teacher's responses, or the
student's rollouts up to their first EOS). Each run is a child forked from one parent that holds the imports and
the data, so no run inherits another's heap or caches. Tokens/s are medians over the repeats; ``ours_over_peer`` is
the median over the repeats of the ratio of the two sides' tokens/s within a repeat (listed in
``ours_over_peer_by_repeat``); ``ours_over_peer_cpu_time`` the same from each run's CPU time (with one thread, the
work done whatever else the machine runs).

Checked in the same run, before the timing: our SFT loss equals TRL's SFT loss on the same batch and weights
(within 1e-4; TRL computes it with its fused LM head), our GKD loss on an off-policy batch equals TRL's
``generalized_jsd_loss`` path (within 1e-5; right-padded batch, where TRL's positions equal ours), and our rollouts
are `generate`'s tokens under the same seed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

STUDENT = {"hidden_size": 64, "num_layers": 4, "intermediate_size": 240, "num_heads": 4}
FULL = {"demo_rows": 2000, "steps": 40, "gkd_steps": 24, "repeats": 3}
QUICK = {"demo_rows": 400, "steps": 8, "gkd_steps": 8, "repeats": 3}
BATCH, LEARNING_RATE = 64, 3e-3
GKD = {"lmbda": 0.5, "beta": 0.5, "max_new_tokens": 16, "temperature": 1.0}
TARGETS = {"kd_vs_sft": 0.95, "gkd": 1.8}


def run(quick: bool = False) -> dict:
    """Set up the demo data, check equal losses, time every pair; returns the report (module docstring)."""
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    settings = QUICK if quick else FULL
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as root, contextlib.redirect_stdout(sys.stderr):
        bench = Bench(Path(root), settings)
        checks = bench.checks()  # also imports TRL here, once, before the children fork
        rates: dict[str, list[float]] = {}
        cpu_rates: dict[str, list[float]] = {}
        on_policy: dict[str, list[int]] = {}
        sides = ["trl_sft", "sft", "kd", "trl_gkd", "gkd", "gkd_top16", "trl_gkd_defaults"]
        for repeat in range(settings["repeats"]):
            for side in sides if repeat % 2 == 0 else reversed(sides):
                figures = in_child(bench.time, side, repeat)
                rates.setdefault(side, []).append(figures["tokens_per_s"])
                cpu_rates.setdefault(side, []).append(figures["tokens_per_cpu_s"])
                if "on_policy_steps" in figures:
                    on_policy.setdefault(side, []).append(figures["on_policy_steps"])
    median = {side: statistics.median(values) for side, values in rates.items()}

    def pair(ours: str, peer: str) -> dict:
        # Each repeat's two runs ran minutes apart at most: their ratio is the paired figure, steadier than a ratio
        # of medians taken from different repeats when other work on the machine comes and goes.
        paired = [a / b for a, b in zip(rates[ours], rates[peer], strict=True)]
        paired_cpu = [a / b for a, b in zip(cpu_rates[ours], cpu_rates[peer], strict=True)]
        return {
            "ours_tokens_per_s": round(median[ours], 1),
            "peer_tokens_per_s": round(median[peer], 1),
            "ours_over_peer": round(statistics.median(paired), 3),
            "ours_over_peer_cpu_time": round(statistics.median(paired_cpu), 3),
            "ours_over_peer_by_repeat": [round(ratio, 3) for ratio in paired],
        }

    return {
        "benchmark": "peer_training",
        "quick": quick,
        "settings": {**settings, "batch_size": BATCH, "student": STUDENT, "gkd": GKD, "torch_threads": 1},
        "load_average": os.getloadavg(),
        "sft": {"peer": "trl.SFTTrainer", **pair("sft", "trl_sft")},
        "kd_vs_sft": {"peer": "our sft", "target": TARGETS["kd_vs_sft"], **pair("kd", "sft")},
        "gkd": {"peer": "trl.experimental.gkd.GKDTrainer", "target": TARGETS["gkd"], **pair("gkd", "trl_gkd")},
        "gkd_top16": {"peer": "trl.experimental.gkd.GKDTrainer (dense)", **pair("gkd_top16", "trl_gkd")},
        "gkd_vs_trl_defaults": {
            "peer": "trl.experimental.gkd.GKDTrainer, gradient_checkpointing: true (TRL's default)",
            **pair("gkd", "trl_gkd_defaults"),
        },
        "on_policy_steps": on_policy,
        "tokens_per_s_by_repeat": {side: [round(r, 1) for r in values] for side, values in rates.items()},
        "tokens_per_cpu_s_by_repeat": {side: [round(r, 1) for r in values] for side, values in cpu_rates.items()},
        "checks": checks,
        "seconds": round(time.perf_counter() - started, 1),
    }


class Bench:
    """The demo data and the trainers of every side."""

    def __init__(self, root: Path, settings: dict):
        from stillhouse.config import CurateConfig, SampleConfig
        from stillhouse.data.curate import curate
        from stillhouse.sampling.sample import sample_teacher
        from stillhouse.store import Store

        self.root, self.settings = root, settings
        store = Store(root / "store")
        self.dataset = curate(
            CurateConfig(source="builtin:demo", demo_rows=settings["demo_rows"], eval_fraction=0.05), store
        )
        self.samples = sample_teacher(
            SampleConfig(teacher="builtin:demo-teacher", max_new_tokens=16, top_k_logprobs=16), self.dataset, store
        )
        self.runs = 0

    def config(self, side: str, steps: int, seed: int):
        from stillhouse.config import TrainConfig

        settings = {
            "architecture": STUDENT,
            "max_steps": steps,
            "batch_size": BATCH,
            "learning_rate": LEARNING_RATE,
            "threads": 1,
            "logging_steps": steps,
            "seed": seed,
            "method": "sft" if side in ("sft", "trl_sft") else "kd",
        }
        if "gkd" in side:
            settings["ce_weight"] = 0.0  # TRL's GKD loss is the divergence alone
            settings["kd"] = {
                "teacher": "online",
                "kind": "jsd",
                "lmbda": GKD["lmbda"],
                "beta": GKD["beta"],
                "rollout_max_new_tokens": GKD["max_new_tokens"],
                "rollout_temperature": GKD["temperature"],
                "online_top_k": 16 if side == "gkd_top16" else None,
            }
        return TrainConfig.model_validate(settings)

    def folder(self) -> Path:
        self.runs += 1
        return self.root / f"run-{self.runs}"

    def ours(self, side: str, steps: int, seed: int):
        from transformers.trainer_callback import ProgressCallback

        from stillhouse.training.train import build_trainer

        trainer, _ = build_trainer(self.config(side, steps, seed), self.dataset, self.samples, self.folder())
        trainer.remove_callback(ProgressCallback)  # TRL's runs have no progress bar either (disable_tqdm)
        return trainer

    def peer(self, side: str, steps: int, seed: int):
        """TRL's trainer on the student, examples and (GKD) teacher our trainer of the same seed gets."""
        import datasets
        from transformers import AutoModelForCausalLM

        from stillhouse.models import load_tokenizer
        from stillhouse.training.examples import build_examples
        from stillhouse.training.train import build_student

        config = self.config(side, steps, seed)
        student, tokenizer = build_student(config, self.samples.teacher_tokenizer)
        examples = build_examples(
            self.dataset,
            self.samples,
            load_tokenizer(self.samples.teacher_tokenizer),
            split="train",
            shared_vocabulary=True,
            with_top_k=False,
            max_seq_len=config.max_seq_len,
        )
        common = {
            "output_dir": str(self.folder()),
            "max_steps": steps,
            "per_device_train_batch_size": BATCH,
            "learning_rate": LEARNING_RATE,
            "lr_scheduler_type": config.lr_scheduler,
            "warmup_steps": config.warmup_ratio,
            "weight_decay": config.weight_decay,
            "logging_steps": steps,
            "report_to": "none",
            "save_strategy": "no",
            "seed": seed,
            "data_seed": seed,
            "use_cpu": True,
            "dataloader_pin_memory": False,
            "dataloader_drop_last": True,
            "disable_tqdm": True,
            # TRL's configs turn activation checkpointing on by default (and GKD then generates without a KV cache);
            # ours is off by default: both sides run without it, except the side that measures TRL's defaults.
            "gradient_checkpointing": side == "trl_gkd_defaults",
        }
        if side == "trl_sft":
            from trl import SFTConfig, SFTTrainer

            rows = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples]
            return SFTTrainer(
                model=student,
                args=SFTConfig(**common, max_length=None),
                train_dataset=datasets.Dataset.from_list(rows),
                processing_class=tokenizer,
            )
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        rows = [
            {  # the collator reads "prompt" (the text) first, then takes the ids as they are
                "prompt": tokenizer.decode(e["input_ids"][: e["prompt_length"]]),
                "input_ids": e["input_ids"],
                "attention_mask": [1] * len(e["input_ids"]),
                "completion_mask": [0] * e["prompt_length"] + [1] * (len(e["input_ids"]) - e["prompt_length"]),
            }
            for e in examples
        ]
        teacher = AutoModelForCausalLM.from_pretrained(self.samples.teacher).requires_grad_(False)
        return GKDTrainer(
            model=student,
            teacher_model=teacher,
            args=GKDConfig(
                **common,
                lmbda=GKD["lmbda"],
                beta=GKD["beta"],
                temperature=GKD["temperature"],
                max_new_tokens=GKD["max_new_tokens"],
            ),
            train_dataset=datasets.Dataset.from_list(rows),
            processing_class=tokenizer,
        )

    def time(self, side: str, seed: int) -> dict:
        """Train one side for its steps; tokens/s over every step after the first."""
        steps = self.settings["gkd_steps" if "gkd" in side else "steps"]
        trainer = self.peer(side, steps, seed) if side.startswith("trl_") else self.ours(side, steps, seed)
        counter = count_response_tokens(trainer)
        clock = step_clock(counter)
        trainer.add_callback(clock)
        trainer.train()
        tokens = counter["tokens_at_steps"][-1] - counter["tokens_at_steps"][0]
        seconds = clock.times[-1] - clock.times[0]
        cpu_seconds = clock.cpu_times[-1] - clock.cpu_times[0]
        figures = {
            "tokens_per_s": tokens / seconds,
            "tokens_per_cpu_s": tokens / cpu_seconds,
            "seconds": seconds,
            "tokens": tokens,
        }
        if "gkd" in side:
            figures["on_policy_steps"] = counter["on_policy_steps"]
        return figures

    def checks(self) -> dict:
        """Equal losses of ours and TRL's on the same batch and weights, and our rollouts equal `generate`'s."""
        import torch

        from stillhouse.training.train import sample_rollouts

        report = {}
        for ours_side, peer_side, tolerance in (("sft", "trl_sft", 1e-4), ("gkd", "trl_gkd", 1e-5)):
            ours, peer = self.ours(ours_side, 1, 0), self.peer(peer_side, 1, 0)
            same_weights = all(
                torch.equal(a, b)
                for a, b in zip(ours.model.state_dict().values(), peer.model.state_dict().values(), strict=True)
            )
            batch = ours.data_collator(ours.train_dataset[:BATCH])
            plain = {key: batch[key] for key in ("input_ids", "attention_mask", "labels")}
            ours.model.eval(), peer.model.eval()  # our GKD draws no rollout outside training
            with torch.no_grad():
                ours_loss = float(ours.compute_loss(ours.model, dict(batch)))
                peer_loss = float(peer.compute_loss(peer.model, dict(plain)))
            report[ours_side] = {
                "same_initial_weights": same_weights,
                "ours_loss": ours_loss,
                "peer_loss": peer_loss,
                "equal_within": tolerance,
                "equal": same_weights and abs(ours_loss - peer_loss) <= tolerance,
            }
            if ours_side == "gkd":
                student, pad, eos = ours.model, ours.pad_token_id, ours.eos_token_id
                prompts, mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
                torch.manual_seed(0)
                ours_tokens = sample_rollouts(
                    student,
                    prompts,
                    mask,
                    max_new_tokens=GKD["max_new_tokens"],
                    temperature=GKD["temperature"],
                    eos_token_id=eos,
                    pad_token_id=pad,
                )
                torch.manual_seed(0)
                with torch.no_grad():
                    generated = student.generate(
                        input_ids=prompts,
                        attention_mask=mask,
                        max_new_tokens=GKD["max_new_tokens"],
                        do_sample=True,
                        temperature=GKD["temperature"],
                        top_k=0,
                        top_p=1.0,
                        pad_token_id=pad,
                        eos_token_id=eos,
                    )
                report["rollouts_equal_generate"] = torch.equal(ours_tokens, generated)
        return report


def count_response_tokens(trainer) -> dict:
    """Count, per step, the response tokens the trainer's loss scores (labels other than -100 after the shift).

    Ours draws its rollouts inside `compute_loss` (`student_rollout`), TRL's before it (`generate_on_policy_outputs`):
    both are wrapped on the instance, so the labels counted are the ones the loss sees.
    """
    counter = {"tokens": 0, "on_policy_steps": 0, "tokens_at_steps": []}
    compute_loss = trainer.compute_loss

    def counting_loss(model, inputs, *args, **kwargs):
        counter["labels"] = inputs["labels"]
        loss = compute_loss(model, inputs, *args, **kwargs)
        counter["tokens"] += int(counter.pop("labels")[:, 1:].ne(-100).sum())
        return loss

    trainer.compute_loss = counting_loss
    for name in ("student_rollout", "generate_on_policy_outputs"):
        rollout = getattr(trainer, name, None)
        if rollout is None:
            continue

        def counting_rollout(*args, _rollout=rollout, _ours=name == "student_rollout", **kwargs):
            result = _rollout(*args, **kwargs)
            counter["on_policy_steps"] += 1
            if _ours:  # (inputs, labels), inside compute_loss; TRL's labels reach compute_loss in its inputs
                counter["labels"] = result[1]
            return result

        setattr(trainer, name, counting_rollout)
    return counter


def in_child(function, *args):
    """``function(*args)`` (a dict) run in a forked child: every timed run starts from the same parent state (no heap,
    caches or collector debt left by the runs before it), with the imports and data the parent already holds."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: run, send the result as JSON, leave without the parent's clean-up
        os.close(read)
        try:
            result = json.dumps(function(*args)).encode()
            code = 0
        except BaseException as error:  # reported by the parent
            result, code = json.dumps({"error": repr(error)}).encode(), 1
        with os.fdopen(write, "wb") as channel:
            channel.write(result)
        os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as channel:
        result = json.loads(channel.read() or b"{}")
    _, status = os.waitpid(pid, 0)
    if status != 0 or "error" in result:
        raise RuntimeError(f"peer_training: the run {args} failed in its child: {result.get('error', status)}")
    return result


def step_clock(counter: dict):
    """A callback noting the wall time and the tokens counted so far at the end of every optimizer step."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.times, self.cpu_times = [], []

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter())
            self.cpu_times.append(time.process_time())
            counter["tokens_at_steps"].append(counter["tokens"])

    return StepClock()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="400 demo rows and fewer steps (under 2 minutes)")
    print(json.dumps(run(parser.parse_args().quick)))


if __name__ == "__main__":
    main()
