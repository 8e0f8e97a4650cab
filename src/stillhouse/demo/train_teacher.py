"""Train the bundled demo teacher from a seed and write it to `src/stillhouse/demo/teacher/`.

    python -m stillhouse.demo.train_teacher            # ~10 minutes on one CPU thread
    python -m stillhouse.demo.train_teacher --steps 200 --out /tmp/teacher   # a quick try

A 4-layer Llama (d=128, 1.06 M parameters) with a character-level tokenizer learns the three demo
tasks in `stillhouse.demo.tasks`. A plain PyTorch loop is used rather than `transformers.Trainer`
because the data is drawn fresh from a seeded generator at every step (no dataset to hold) and the
script must stay reproducible byte for byte on one thread.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from stillhouse.demo.tasks import TASK_NAMES, is_correct, make_example, make_examples
from stillhouse.demo.tokenizer import build_char_tokenizer
from stillhouse.sampling.hf_engine import generate, render_prompts

TEACHER_DIR = Path(__file__).parent / "teacher"
HELD_OUT_SEED = 1_000_003  # far from the training stream's seed, and from the pipeline's demo data


def teacher_config(vocab_size: int, pad_id: int, eos_id: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        bos_token_id=None,
    )


def encode_batch(tokenizer, rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids and labels; the loss covers the answer and its EOS only."""
    prompts = render_prompts(tokenizer, [[{"role": "user", "content": row["prompt"]}] for row in rows])
    sequences, labels = [], []
    for prompt, row in zip(prompts, rows):
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(row["reference"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        sequences.append(prompt_ids + answer_ids)
        labels.append([-100] * len(prompt_ids) + answer_ids)
    width = max(map(len, sequences))
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    label_ids = torch.full((len(rows), width), -100)
    for row, (sequence, label) in enumerate(zip(sequences, labels)):
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        label_ids[row, : len(label)] = torch.tensor(label)
    return input_ids, label_ids


def train_loop(
    model,
    tokenizer,
    draw_rows: Callable[[], list[dict]],
    *,
    steps: int,
    lr: float,
    log_every: int,
    log: Callable[[str], None] = print,
) -> None:
    """The teacher's recipe: AdamW (betas 0.9, 0.98) with 5% warmup and cosine decay, gradients clipped at 1, one
    batch of ``draw_rows()`` (``{"prompt", "reference"}`` rows) per step. Also trains
    benchmarks/distill_quality.py's teacher on its own task mix."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))
    )
    started = time.perf_counter()
    model.train()
    for step in range(1, steps + 1):
        input_ids, labels = encode_batch(tokenizer, draw_rows())
        loss = model(input_ids=input_ids, attention_mask=input_ids.ne(tokenizer.pad_token_id), labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % log_every == 0 or step == steps:
            log(f"step {step}/{steps}  loss {loss.item():.4f}  {time.perf_counter() - started:.0f}s")
    model.eval()


def held_out_accuracy(model, tokenizer, rows: list[dict]) -> dict[str, float]:
    prompts = render_prompts(tokenizer, [[{"role": "user", "content": row["prompt"]}] for row in rows])
    generations = generate(model, tokenizer, prompts, max_new_tokens=16, batch_size=128)
    correct = {task: [] for task in TASK_NAMES}
    for row, generation in zip(rows, generations):
        correct[row["task"]].append(is_correct(generation.text, row["reference"]))
    scores = {task: sum(hits) / len(hits) for task, hits in correct.items()}
    scores["overall"] = sum(sum(hits) for hits in correct.values()) / len(rows)
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--held-out", type=int, default=600)
    parser.add_argument("--out", type=Path, default=TEACHER_DIR)
    args = parser.parse_args()

    torch.set_num_threads(1)  # tiny model: one thread is fastest and leaves the other core free
    torch.manual_seed(args.seed)
    tokenizer = build_char_tokenizer()
    model = LlamaForCausalLM(teacher_config(len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id))
    stream = random.Random(args.seed)
    started = time.perf_counter()
    train_loop(
        model,
        tokenizer,
        lambda: [make_example(stream) for _ in range(args.batch_size)],
        steps=args.steps,
        lr=args.lr,
        log_every=100,
    )
    scores = held_out_accuracy(model, tokenizer, make_examples(args.held_out, seed=HELD_OUT_SEED))
    print("held-out exact match:", json.dumps(scores))
    args.out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id
    )
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    record = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "train_seconds": round(time.perf_counter() - started, 1),
        "held_out_exact_match": scores,
        "command": "python -m stillhouse.demo.train_teacher",
    }
    (args.out / "training_record.json").write_text(json.dumps(record, indent=2) + "\n")
    # The license is read from the card like any model folder's (the publish stage checks it).
    (args.out / "README.md").write_text(
        "---\nlicense: apache-2.0\n---\n# Stillhouse demo teacher\n\nA 1.06 M-parameter Llama trained by "
        "`python -m stillhouse.demo.train_teacher` on three verifiable tasks.\n"
    )


if __name__ == "__main__":
    main()
