"""The promotion gate's rules: a candidate's metrics against thresholds and against the champion's.

Pure: metrics in, a `GateVerdict` out. `registry/promotion.py` reads the champion from MLflow and
moves the alias; `tasks/gate.py` wires the two and logs the verdict.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, Field

from stillhouse.config import GateConfig

# Substrings of metric names where a smaller value is better; every other metric is higher-is-better.
LOWER_IS_BETTER = ("perplexity", "kl_teacher", "latency", "size_mb", "parameters", "parameter_ratio", "size_ratio")
# Comparisons allow this much floating-point slack, so 0.75 x 0.8 >= 0.6 holds as written.
SLACK = 1e-9
# The default floor (evaluate.gate.default_floor): a student that learned nothing is never promoted. Half the
# teacher's exact match is far below any student worth publishing and far above an untrained one (~0); without
# references, an untrained student's token KL to the teacher is log(vocabulary size), 4-12 nats.
DEFAULT_ACCURACY_RATIO = 0.5
DEFAULT_MAX_KL = 2.0


class GateVerdict(BaseModel):
    """Whether a candidate may become champion, and why."""

    passed: bool
    failures: list[str] = Field(
        description="One human-readable line per failed check: the threshold, the compared values, "
        "the champion version."
    )
    checks: list[str] = Field(default_factory=list, description="Every check made, passed or failed, in the same form.")
    candidate_version: str | None = None
    champion_version: str | None = Field(
        None, description="Registry version holding the champion alias when the gate ran; None if there was none."
    )
    champion_metric: str | None = None
    candidate_metrics: dict[str, float] = Field(
        default_factory=dict, description="The candidate's values of the metrics the gate read."
    )
    champion_metrics: dict[str, float] = Field(
        default_factory=dict, description="The champion's values of the metrics the gate read."
    )
    promoted: bool = Field(False, description="True once the champion alias was moved to the candidate.")


def lower_is_better(metric: str) -> bool:
    return any(part in metric for part in LOWER_IS_BETTER)


def lookup(metrics: dict[str, float], name: str) -> float | None:
    """A metric by its report name, or by MLflow's spelling of it (`/` logged as `.`)."""
    value = metrics.get(name, metrics.get(name.replace("/", ".")))
    return None if value is None or math.isnan(value) else float(value)


def default_floor(verdict: GateVerdict, candidate: dict[str, float], check) -> None:
    """The floor relative to the teacher that applies when no accuracy or KL threshold is set."""
    student, teacher = lookup(candidate, "student_exact_match"), lookup(candidate, "teacher_exact_match")
    if student is not None and teacher:
        needed = DEFAULT_ACCURACY_RATIO * teacher
        verdict.candidate_metrics.update(student_exact_match=student, teacher_exact_match=teacher)
        check(
            student >= needed - SLACK,
            f"default floor (evaluate.gate.default_floor): student exact match {student:.4g} vs teacher {teacher:.4g} "
            f"(needs >= {needed:.4g}, half the teacher's; set evaluate.gate.min_accuracy_ratio_to_teacher to choose)",
        )
        return
    kl = lookup(candidate, "kl_teacher_student")
    if kl is not None:
        verdict.candidate_metrics["kl_teacher_student"] = kl
        check(
            kl <= DEFAULT_MAX_KL + SLACK,
            f"default floor (evaluate.gate.default_floor): kl_teacher_student is {kl:.4g} "
            f"(needs <= {DEFAULT_MAX_KL:g}; set evaluate.gate.max_kl to choose)",
        )


def default_champion_metric(candidate: dict[str, float]) -> str:
    return "student_exact_match" if "student_exact_match" in candidate else "student_perplexity"


def check_candidate(
    config: GateConfig,
    candidate: dict[str, float],
    *,
    champion: dict[str, float] | None = None,
    champion_version: str | None = None,
    candidate_version: str | None = None,
) -> GateVerdict:
    """Check ``candidate`` against ``config``'s thresholds and, with ``must_beat_champion``,
    the ``champion``'s metrics."""
    verdict = GateVerdict(
        passed=True, failures=[], candidate_version=candidate_version, champion_version=champion_version
    )
    if not config.enabled:
        verdict.checks.append("gate disabled (evaluate.gate.enabled: false)")
        return verdict

    def check(ok: bool, line: str) -> None:
        verdict.checks.append(("pass: " if ok else "FAIL: ") + line)
        if not ok:
            verdict.failures.append(line)

    def value_of(name: str, field: str) -> float | None:
        value = lookup(candidate, name)
        if value is None:
            check(
                False,
                f"{field}: metric {name} is missing from the evaluation report; "
                "enable its metric group in evaluate.metrics",
            )
        else:
            verdict.candidate_metrics[name] = value
        return value

    if config.min_accuracy_ratio_to_teacher is not None:
        student, teacher = (
            value_of("student_exact_match", "min_accuracy_ratio_to_teacher"),
            value_of("teacher_exact_match", "min_accuracy_ratio_to_teacher"),
        )
        if student is not None and teacher is not None:
            needed = config.min_accuracy_ratio_to_teacher * teacher
            check(
                student >= needed - SLACK,
                f"min_accuracy_ratio_to_teacher {config.min_accuracy_ratio_to_teacher:g}: student exact match "
                f"{student:.4g} vs teacher {teacher:.4g} (needs >= {needed:.4g})",
            )
    if config.default_floor and config.min_accuracy_ratio_to_teacher is None and config.max_kl is None:
        default_floor(verdict, candidate, check)
    if config.max_kl is not None:
        kl = value_of("kl_teacher_student", "max_kl")
        if kl is not None:
            check(kl <= config.max_kl + SLACK, f"max_kl {config.max_kl:g}: kl_teacher_student is {kl:.4g}")
    for name, bound in config.min.items():
        value = value_of(name, f"min.{name}")
        if value is not None:
            check(value >= bound - SLACK, f"min.{name} {bound:g}: {name} is {value:.4g}")
    for name, bound in config.max.items():
        value = value_of(name, f"max.{name}")
        if value is not None:
            check(value <= bound + SLACK, f"max.{name} {bound:g}: {name} is {value:.4g}")

    if config.must_beat_champion:
        metric = config.champion_metric or default_champion_metric(candidate)
        verdict.champion_metric = metric
        if champion is None:
            verdict.checks.append(f"pass: must_beat_champion: no version holds @{config.champion_alias} yet")
        elif candidate_version is not None and candidate_version == champion_version:
            verdict.checks.append(
                "pass: must_beat_champion: the candidate "
                f"(version {candidate_version}) already holds @{config.champion_alias}"
            )
        else:
            ours, theirs = value_of(metric, "must_beat_champion"), lookup(champion, metric)
            if theirs is None:
                check(
                    False,
                    f"must_beat_champion: champion version {champion_version} has no recorded {metric} to compare "
                    "with; set evaluate.gate.champion_metric to a metric both have, or must_beat_champion: false",
                )
            elif ours is not None:
                verdict.champion_metrics[metric] = theirs
                lower = lower_is_better(metric)
                ok = (
                    ours <= theirs + config.champion_tolerance + SLACK
                    if lower
                    else ours >= theirs - config.champion_tolerance - SLACK
                )
                direction = "lower" if lower else "higher"
                check(
                    ok,
                    f"must_beat_champion on {metric} ({direction} is better, tolerance {config.champion_tolerance:g}): "
                    f"candidate {ours:.4g} vs champion version {champion_version} {theirs:.4g}",
                )
    verdict.passed = not verdict.failures
    return verdict
