"""The evaluation stage: the student and the teacher measured on the same held-out prompts.

Metrics (``teacher_*`` and ``student_*`` where both apply):
- ``*_perplexity``: perplexity of the teacher's held-out responses (prompt tokens masked);
- ``kl_teacher_student``: mean forward KL(teacher‖student) per response token, on the stored top-k;
- ``*_exact_match`` (and ``*_exact_match/<category>``): greedy answers against the references;
- ``student_teacher_agreement``: share of prompts where the student's answer equals the teacher's;
- ``*_parameters`` and ``parameter_ratio``.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from stillhouse.config import EvaluateConfig
from stillhouse.data.curate import read_split
from stillhouse.models import count_parameters, load_causal_lm, load_tokenizer, vocabulary_difference
from stillhouse.refs import DatasetRef, EvalReport, ModelRef, SamplesRef
from stillhouse.sampling.hf_engine import generate, render_prompts
from stillhouse.store import Store, fingerprint
from stillhouse.training.losses import TopK, cross_entropy, forward_kl
from stillhouse.training.train import PadCollator, build_examples

CODE_VERSION = 1


@torch.inference_mode()
def score_responses(model, examples: list[dict], pad_token_id: int, batch_size: int, vocab_size: int) -> dict[str, float]:
    """Token-weighted mean cross-entropy and (when top-k targets are present) forward KL.

    Logit rows past ``vocab_size`` (embedding padding) are not tokens and are left out.
    """
    collate = PadCollator(pad_token_id)
    totals = defaultdict(float)
    for start in range(0, len(examples), batch_size):
        batch = {key: value.to(model.device) for key, value in collate(examples[start : start + batch_size]).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1, :vocab_size]
        targets = batch["labels"][:, 1:]
        tokens = targets.ne(-100).sum().item()
        totals["tokens"] += tokens
        totals["cross_entropy"] += cross_entropy(logits, targets).item() * tokens
        if "top_k_ids" in batch:
            teacher = TopK(batch["top_k_ids"][:, 1:], batch["top_k_logprobs"][:, 1:])
            totals["kl"] += forward_kl(logits, teacher, targets).item() * tokens
    count = max(totals["tokens"], 1)
    return {key: totals[key] / count for key in ("cross_entropy", "kl") if key in totals}


def exact_match(answers: list[str], references: list[str]) -> list[bool]:
    return [answer.strip() == reference.strip() for answer, reference in zip(answers, references)]


def evaluate_student(
    config: EvaluateConfig, dataset: DatasetRef, samples: SamplesRef, student: ModelRef, store: Store,
    progress: Callable[[float], None] | None = None,
) -> EvalReport:
    stage_fingerprint = fingerprint("evaluate", config, {"dataset": dataset.fingerprint, "samples": samples.fingerprint, "student": student.fingerprint}, CODE_VERSION)

    def compute(folder: Path) -> dict:
        prompts = read_split(dataset, "eval")
        if config.max_prompts is not None:
            prompts = prompts.head(config.max_prompts)
        metrics: dict[str, float] = {}
        answers: dict[str, list[str]] = {}
        roles = {"teacher": samples.teacher, "student": student.model_path}
        teacher_tokenizer = load_tokenizer(samples.teacher)
        for step, (role, path) in enumerate(roles.items()):
            model, tokenizer = load_causal_lm(path, device="auto"), load_tokenizer(path)
            metrics[f"{role}_parameters"] = count_parameters(model)
            shared_vocabulary = vocabulary_difference(tokenizer, teacher_tokenizer) is None
            examples = build_examples(
                dataset, samples, tokenizer, split="eval", shared_vocabulary=shared_vocabulary,
                with_top_k=role == "student" and shared_vocabulary and samples.top_k_logprobs > 0, max_seq_len=100_000,
                prompt_ids=set(prompts["prompt_id"]),
            )
            scores = score_responses(model, examples, tokenizer.pad_token_id, config.batch_size, vocab_size=len(tokenizer))
            metrics[f"{role}_perplexity"] = math.exp(scores["cross_entropy"])
            if "kl" in scores:
                metrics["kl_teacher_student"] = scores["kl"]
            rendered = render_prompts(tokenizer, [json.loads(m) for m in prompts["messages"]])
            with tqdm(total=len(rendered), desc=f"evaluate {role}", unit="prompt") as bar:
                generations = generate(model, tokenizer, rendered, max_new_tokens=config.max_new_tokens, batch_size=config.batch_size, on_batch=bar.update)
            answers[role] = [g.text for g in generations]
            if progress is not None:
                progress((step + 1) / len(roles))
        metrics["parameter_ratio"] = metrics["student_parameters"] / metrics["teacher_parameters"]
        metrics["student_teacher_agreement"] = sum(exact_match(answers["student"], answers["teacher"])) / len(prompts)
        table = prompts[["prompt_id", "messages", "reference", "category"]].assign(teacher_answer=answers["teacher"], student_answer=answers["student"])
        if dataset.has_references:
            scored = table[table["reference"].notna()]
            for role in roles:
                correct = pd.Series(exact_match(scored[f"{role}_answer"], scored["reference"]), index=scored.index)
                table[f"{role}_correct"] = correct  # NaN where a prompt has no reference
                metrics[f"{role}_exact_match"] = float(correct.mean())
                for category, hits in correct.groupby(scored["category"]):
                    metrics[f"{role}_exact_match/{category}"] = float(hits.mean())
        table.to_parquet(folder / "generations.parquet", index=False)
        return {"metrics": metrics, "eval_prompts": len(prompts)}

    output = store.build("evaluate", stage_fingerprint, compute)
    return EvalReport(stage="evaluate", fingerprint=stage_fingerprint, path=str(output.path), cached=output.cached, metrics=output.manifest["metrics"])


def read_generations(report: EvalReport) -> pd.DataFrame:
    return pd.read_parquet(Path(report.path) / "generations.parquet")
