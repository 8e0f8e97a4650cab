"""Metric functions: plain Python on strings and numbers, each tested against a hand-computed case.

Model-dependent measurements (perplexity, KL, top-1 agreement, speed) live in `evaluate.py`;
these are the pieces they reduce to.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def exact_match(answers: Sequence[str], references: Sequence[str]) -> list[bool]:
    """True where an answer equals its reference, ignoring surrounding whitespace."""
    return [answer.strip() == reference.strip() for answer, reference in zip(answers, references)]


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence of ``a`` and ``b`` (O(len(a)·len(b)) time, O(len(b)) memory)."""
    previous = [0] * (len(b) + 1)
    for item in a:
        current = [0]
        for j, other in enumerate(b):
            current.append(previous[j] + 1 if item == other else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 over lowercased whitespace tokens: 2·P·R / (P + R), P = LCS/|candidate|, R = LCS/|reference|.

    Two empty texts score 1 (identical); one empty text scores 0.
    """
    candidate_tokens, reference_tokens = candidate.lower().split(), reference.lower().split()
    if not candidate_tokens or not reference_tokens:
        return float(candidate_tokens == reference_tokens)
    common = lcs_length(candidate_tokens, reference_tokens)
    if common == 0:
        return 0.0
    precision, recall = common / len(candidate_tokens), common / len(reference_tokens)
    return 2 * precision * recall / (precision + recall)


def mean_rouge_l(candidates: Sequence[str], references: Sequence[str]) -> float:
    return statistics.fmean(rouge_l(c, r) for c, r in zip(candidates, references)) if candidates else float("nan")


def perplexity(mean_cross_entropy: float) -> float:
    """exp of the token-weighted mean cross-entropy (nats per token)."""
    return math.exp(mean_cross_entropy)


def tokens_per_second(generated_tokens: int, seconds: float) -> float:
    return generated_tokens / seconds if seconds > 0 else float("nan")


def size_on_disk_mb(model_path: str, parameter_bytes: int) -> float:
    """Megabytes (10^6 bytes) of the weight files in a local model folder; for a Hub id,
    the weights' bytes in memory."""
    folder = Path(model_path)
    if folder.is_dir():
        files = [p for p in folder.rglob("*") if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)]
        if files:
            return sum(p.stat().st_size for p in files) / 1e6
    return parameter_bytes / 1e6


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None when either is missing or the denominator is 0 (a ratio that means nothing)."""
    if numerator is None or denominator is None or denominator == 0 or math.isnan(numerator) or math.isnan(denominator):
        return None
    return numerator / denominator


# (ratio, student metric, teacher metric): how the student compares with the teacher on the same hardware.
STUDENT_TEACHER_RATIOS = (
    ("parameter_ratio", "student_parameters", "teacher_parameters"),
    ("size_ratio", "student_size_mb", "teacher_size_mb"),
    ("speed_ratio", "student_tokens_per_second", "teacher_tokens_per_second"),
    ("latency_ratio", "student_latency_seconds", "teacher_latency_seconds"),
)


def student_teacher_ratios(metrics: dict[str, float]) -> dict[str, float]:
    """``parameter_ratio``, ``size_ratio``, ``speed_ratio``, ``latency_ratio``: student / teacher, where both exist."""
    ratios = {}
    for name, student, teacher in STUDENT_TEACHER_RATIOS:
        value = ratio(metrics.get(student), metrics.get(teacher))
        if value is not None:
            ratios[name] = value
    return ratios
