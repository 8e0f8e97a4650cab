"""The feedback stages: judge the student's candidates into preference pairs, then learn from them.

    collect_preferences(config.feedback, dataset, samples, student, store) -> PairsRef   # stage "judge"
    train_on_feedback(config.feedback, dataset, pairs, student, store) -> ModelRef       # stage "feedback"

Each is its own store entry, so changing only the DPO settings reuses the judged pairs, and the SFT
student before them is reused as it is (dSFT -> dDPO).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch

from stillhouse.config import FeedbackConfig
from stillhouse.data.curate import read_split
from stillhouse.errors import InputError, StillhouseError
from stillhouse.feedback.judge import (
    PAIRWISE_RUBRIC, POINTWISE_RUBRIC, judge_pairs, pointwise_scores, verifier_scores,
)
from stillhouse.feedback.pairs import build_pairs
from stillhouse.models import count_parameters, load_causal_lm, load_tokenizer, resolve_model
from stillhouse.refs import DatasetRef, ModelRef, PairsRef, SamplesRef
from stillhouse.sampling.hf_engine import generate, render_prompts
from stillhouse.sampling.teacher_outputs import read_teacher_outputs
from stillhouse.store import Store, fingerprint

CODE_VERSION = 1
TRAINING_FIELDS = {"method", "beta", "sft_weight", "learning_rate", "warmup_ratio", "max_steps", "batch_size", "threads"}


def sample_candidates(config: FeedbackConfig, student: ModelRef, conversations: list[list[dict]]) -> list[list[str]]:
    """``config.candidates`` sampled responses of the student per conversation."""
    model, tokenizer = load_causal_lm(student.model_path, device="auto"), load_tokenizer(student.model_path)
    prompts = render_prompts(tokenizer, conversations)
    rounds = [
        [g.text for g in generate(model, tokenizer, prompts, max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                                  seed=config.seed + 7919 * index)]
        for index in range(config.candidates)
    ]
    return [list(texts) for texts in zip(*rounds)]


def score_candidates(config: FeedbackConfig, judge_path: str, questions: list[str], candidates: list[list[str]],
                     references: list[str | None]) -> tuple[list[list[float]], float | None]:
    """Scores per candidate (higher is better) and, for pairwise judges, the order-consistency rate."""
    judge = config.judge
    if judge.kind == "verifier":
        return [verifier_scores(texts, [reference] * len(texts)) for texts, reference in zip(candidates, references)], None
    model, tokenizer = load_causal_lm(judge_path, device="auto"), load_tokenizer(judge_path)
    flat_questions = [q for q, texts in zip(questions, candidates) for _ in texts]
    flat_answers = [text for texts in candidates for text in texts]
    if judge.kind == "pointwise":
        flat = pointwise_scores(model, tokenizer, flat_questions, flat_answers, rubric=judge.rubric or POINTWISE_RUBRIC)
        consistency = None
    else:  # pairwise: every candidate against the prompt's first; the first itself scores 0.5
        firsts = [texts[0] for texts in candidates for _ in texts]
        judgements = judge_pairs(model, tokenizer, flat_questions, flat_answers, firsts, rubric=judge.rubric or PAIRWISE_RUBRIC)
        flat = [j.first_better if j.verdict(judge.tie_margin) is not None else 0.5 for j in judgements]
        consistency = sum(j.consistent for j in judgements) / max(len(judgements), 1)
    scores, start = [], 0
    for texts in candidates:
        scores.append(flat[start : start + len(texts)])
        start += len(texts)
    return scores, consistency


def collect_preferences(config: FeedbackConfig, dataset: DatasetRef, samples: SamplesRef, student: ModelRef, store: Store,
                        progress: Callable[[float], None] | None = None) -> PairsRef:
    if config.judge.kind == "verifier" and not dataset.has_references:
        raise InputError("feedback.judge.kind: `verifier` needs reference answers, and the curated data has none; "
                         "set curate.reference_column, or use a `pointwise` or `pairwise` judge")
    judge_path = resolve_model(config.judge.model, "feedback.judge.model") if config.judge.model else samples.teacher
    settings = config.model_dump(mode="json", exclude=TRAINING_FIELDS)
    stage_fingerprint = fingerprint("judge", settings, {"dataset": dataset.fingerprint, "samples": samples.fingerprint, "student": student.fingerprint}, CODE_VERSION)

    def compute(folder: Path) -> dict:
        if config.threads:
            torch.set_num_threads(config.threads)
        prompts = read_split(dataset, "train")
        if config.max_prompts is not None:
            prompts = prompts.head(config.max_prompts)
        conversations = [json.loads(m) for m in prompts["messages"]]
        candidates = sample_candidates(config, student, conversations)
        if progress:
            progress(0.5)
        if config.include_teacher:
            teacher = read_teacher_outputs(samples.path, split="train").set_index("prompt_id")["response_text"]
            candidates = [texts + [teacher.get(pid, texts[0])] for texts, pid in zip(candidates, prompts["prompt_id"])]
        questions = [messages[-1]["content"] for messages in conversations]
        scores, consistency = score_candidates(config, judge_path, questions, candidates, prompts["reference"].tolist())
        pairs, dropped = build_pairs(prompts["prompt_id"].tolist(), candidates, scores, config.min_margin)
        unusable = 1 - len(pairs) / len(prompts)
        if unusable > config.max_unusable_share:
            raise StillhouseError(f"feedback: {unusable:.0%} of {len(prompts)} prompts gave no usable pair ({dropped}); more than "
                                  f"feedback.max_unusable_share ({config.max_unusable_share:.0%}). Sample more candidates, raise the "
                                  "temperature, or lower feedback.min_margin")
        messages = dict(zip(prompts["prompt_id"], prompts["messages"]))
        table = pd.DataFrame(pairs, columns=["prompt_id", "chosen", "rejected", "margin"])
        table.insert(1, "messages", [messages[pid] for pid in table["prompt_id"]])
        table.to_parquet(folder / "pairs.parquet", index=False)
        pd.DataFrame({"prompt_id": prompts["prompt_id"], "candidates": candidates, "scores": scores}).to_parquet(folder / "candidates.parquet", index=False)
        if progress:
            progress(1.0)
        counts = {"prompts": len(prompts), "pairs": len(pairs), **dropped}
        return {"pairs": len(pairs), "counts": counts, "judge_consistency": consistency, "judge": judge_path}

    output = store.build("judge", stage_fingerprint, compute)
    manifest = output.manifest
    return PairsRef(stage="judge", fingerprint=stage_fingerprint, path=str(output.path), cached=output.cached, pairs=manifest["pairs"],
                    counts=manifest["counts"], judge_consistency=manifest["judge_consistency"])


def read_pairs(pairs: PairsRef) -> pd.DataFrame:
    return pd.read_parquet(Path(pairs.path) / "pairs.parquet")


def train_on_feedback(config: FeedbackConfig, dataset: DatasetRef, pairs: PairsRef, student: ModelRef, store: Store) -> ModelRef:
    """DPO on the pairs (reference: the student before it), or best-of-n SFT on each pair's chosen response."""
    stage_fingerprint = fingerprint("feedback", config.model_dump(mode="json", exclude={"threads"}),
                                    {"pairs": pairs.fingerprint, "student": student.fingerprint}, CODE_VERSION)

    def compute(folder: Path) -> dict:
        from stillhouse.training.dpo import train_best_of_n, train_dpo

        if config.threads:
            torch.set_num_threads(config.threads)
        table = read_pairs(pairs)
        if table.empty:
            raise StillhouseError(f"feedback: the judge produced no preference pairs ({pairs.counts}); sample more candidates, "
                                  "raise feedback.temperature, or lower feedback.min_margin")
        rows = [{"prompt": json.loads(m), "chosen": c, "rejected": r} for m, c, r in zip(table["messages"], table["chosen"], table["rejected"])]
        train = train_dpo if config.method == "dpo" else train_best_of_n
        result = train(student.model_path, rows, folder, beta=config.beta, learning_rate=config.learning_rate,
                       max_steps=config.max_steps, batch_size=config.batch_size, seed=config.seed, sft_weight=config.sft_weight,
                       warmup_ratio=config.warmup_ratio, logging_steps=max(1, config.max_steps // 25))
        model = load_causal_lm(str(folder / "model"), device="cpu")
        history = [{"step": h["step"], "loss": h["loss"], **{k.replace("/", "_"): v for k, v in h.items() if k not in ("step", "loss")}}
                   for h in result["history"]]
        return {"model_path": str(folder / "model"), "parameters": count_parameters(model), "train_seconds": result["seconds"],
                "final_loss": history[-1]["loss"] if history else None, "loss_history": history}

    output = store.build("feedback", stage_fingerprint, compute)
    manifest = output.manifest
    return ModelRef(stage="feedback", fingerprint=stage_fingerprint, path=str(output.path), cached=output.cached,
                    model_path=str(Path(output.path) / "model"), parameters=manifest["parameters"], train_seconds=manifest["train_seconds"],
                    final_loss=manifest["final_loss"], loss_history=manifest["loss_history"])
