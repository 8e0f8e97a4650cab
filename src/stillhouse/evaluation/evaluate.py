"""The evaluation stage: the teacher, the student and (optionally) a baseline measured on the same held-out prompts.

Metric groups (``evaluate.metrics``; null computes every group the data supports). Roles are
``teacher``, ``student`` and, with ``evaluate.baseline``, ``baseline``:
- ``perplexity``: ``<role>_perplexity`` of the teacher's held-out responses (prompt tokens masked);
- ``reference_perplexity``: ``<role>_reference_perplexity`` of the reference answers;
- ``kl``: ``kl_teacher_student`` (``kl_teacher_baseline``), mean forward KL(teacher‖model) per response
  token on the stored top-k, and the KL by response position for the report. A model with a tokenizer of its own
  (a student of another family) is compared with the teacher's top-k mapped onto its tokens by byte prefixes
  (``train.kd.align: byte``'s mapping, the residual mass in the tail bucket), at the response positions where both
  tokenizations share a boundary;
- ``agreement``: ``student_teacher_agreement`` (share of prompts with the teacher's answer) and
  ``student_top1_agreement`` (share of response tokens whose argmax is the teacher's top-1);
- ``exact_match``: ``<role>_exact_match`` and ``<role>_exact_match/<category>`` against the references,
  ``accuracy_ratio_to_teacher``;
- ``rouge_l_teacher`` / ``rouge_l_reference``: ROUGE-L F1 of the answers against the teacher's / the references;
- ``speed``: ``<role>_tokens_per_second`` of batched greedy generation and ``<role>_latency_seconds``
  (median per prompt, one at a time), ``speed_ratio``, ``latency_ratio`` (student / teacher, same hardware);
- ``size``: ``<role>_size_mb`` (weight files), ``size_ratio``;
- ``win_rate`` (opt-in): ``student_win_rate`` (``_low``, ``_high``: 95% Wilson interval), the share of prompts
  where a judge model (``evaluate.judge_model``, else the teacher) prefers the student's answer to the teacher's,
  both orders judged, ties counting half; with a baseline also ``student_win_rate_vs_baseline``.
  ``evaluate.win_rate_judge: verifier`` judges by the references instead;
- always: ``<role>_parameters`` and ``parameter_ratio``;
- with ``evaluate.lm_eval``: ``<role>_lm_eval/<task>/<metric>`` from lm-evaluation-harness.

A served teacher (``sample.engine: openai``) has no weights here: its answers are the responses the
sample stage stored for the eval split (the first sample per prompt, generated with the sample stage's
settings), so exact match, agreement and ROUGE against the teacher still work, and the student's
perplexity, KL and top-1 agreement on those responses too. What needs the teacher's weights is left
out for role ``teacher``: its perplexities, size, speed and parameter count, and the ratios built on
them (``parameter_ratio``, ``size_ratio``, ``speed_ratio``, ``latency_ratio``); the list is
`stillhouse.capabilities.TEACHER_WEIGHT_METRICS`. Eval prompts the teacher did not answer (skipped as
overlong) are left out for every role.

`evaluate_student` reads top to bottom: pick the eval prompts, measure each role whose weights load here
(`measure_role`: one function per metric group that needs the model), then the groups that compare answers
(agreement, ROUGE-L, exact match, win rate). The report (Markdown, HTML, PNG) is written into ``report/``
of the stage's folder.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from stillhouse.config import EvaluateConfig, LmEvalConfig
from stillhouse.data.curate import read_split
from stillhouse.errors import InputError
from stillhouse.evaluation import metrics as m
from stillhouse.evaluation.metrics import exact_match  # noqa: F401  (kept importable from here)
from stillhouse.evaluation.report import write_report
from stillhouse.models import (
    count_parameters,
    load_causal_lm,
    load_tokenizer,
    resolve_model,
    vocabulary_difference,
)
from stillhouse.refs import DatasetRef, ModelRef, SamplesRef
from stillhouse.sampling.hf_engine import generate, render_prompts
from stillhouse.sampling.teacher_outputs import read_teacher_outputs
from stillhouse.training.cross_tokenizer import pair_tokenizers
from stillhouse.training.examples import PadCollator, build_examples
from stillhouse.training.losses import TopK, cross_entropy, forward_kl

log = logging.getLogger(__name__)
MAX_KL_POSITIONS = 256  # KL by position is reported for the first this many response tokens


@torch.inference_mode()
def score_responses(
    model,
    examples: list[dict],
    pad_token_id: int,
    batch_size: int,
    vocab_size: int,
    max_positions: int = MAX_KL_POSITIONS,
) -> dict[str, float | list[float]]:
    """Token-weighted mean cross-entropy and, when top-k targets are present, forward KL,
    top-1 agreement and KL by position.

    Returns ``cross_entropy`` (and ``kl``, ``top1_agreement``, ``kl_by_position``: the mean KL at
    response position 0, 1, ... over the examples that reach it). Logit rows past ``vocab_size``
    (embedding padding) are not tokens and are left out. Examples with the teacher's top-k mapped onto this
    model's tokens (``cross_*``, `build_examples` with ``align="byte"``) are compared where ``cross_mask`` holds.
    """
    collate = PadCollator(pad_token_id)
    totals = defaultdict(float)
    kl_sums, kl_counts = (
        torch.zeros(max_positions, dtype=torch.float64),
        torch.zeros(max_positions, dtype=torch.float64),
    )
    for start in range(0, len(examples), batch_size):
        batch = {key: value.to(model.device) for key, value in collate(examples[start : start + batch_size]).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1, :vocab_size]
        targets = batch["labels"][:, 1:]
        counted = targets.ne(-100)
        tokens = counted.sum().item()
        totals["tokens"] += tokens
        totals["cross_entropy"] += cross_entropy(logits, targets).item() * tokens
        teacher = None
        if "top_k_ids" in batch:
            teacher = TopK(batch["top_k_ids"][:, 1:], batch["top_k_logprobs"][:, 1:])
        elif "cross_ids" in batch:  # across tokenizers: the positions with a shared boundary only
            teacher = TopK(batch["cross_ids"][:, 1:], batch["cross_logprobs"][:, 1:])
            counted = counted & batch["cross_mask"][:, 1:]
            targets = targets.masked_fill(~counted, -100)
        if teacher is not None:
            compared = counted.sum().item()
            totals["compared"] += compared
            totals["kl"] += forward_kl(logits, teacher, targets).item() * compared
            totals["top1"] += (logits.argmax(-1).eq(teacher.ids[..., 0]) & counted).sum().item()
            offsets = counted.cumsum(dim=1) - 1  # response position of each counted target
            for position in range(min(int(offsets.max().item()) + 1, max_positions)):
                at_position = counted & offsets.eq(position)
                count = at_position.sum().item()
                if count:
                    kl_sums[position] += (
                        forward_kl(logits, teacher, targets.masked_fill(~at_position, -100)).item() * count
                    )
                    kl_counts[position] += count
    tokens = max(totals["tokens"], 1)
    scores: dict[str, float | list[float]] = {"cross_entropy": totals["cross_entropy"] / tokens}
    if "kl" in totals:
        compared = max(totals["compared"], 1)
        scores["kl"] = totals["kl"] / compared
        scores["top1_agreement"] = totals["top1"] / compared
        reached = int(kl_counts.gt(0).sum().item())
        scores["kl_by_position"] = (kl_sums[:reached] / kl_counts[:reached]).tolist()
    return scores


def reference_examples(tokenizer, conversations: list[list[dict]], references: list[str]) -> list[dict]:
    """Prompt + reference answer + EOS, with the prompt masked: the examples of ``reference_perplexity``."""
    examples = []
    for prompt, reference in zip(render_prompts(tokenizer, conversations), references):
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(reference, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        examples.append({"input_ids": prompt_ids + answer_ids, "labels": [-100] * len(prompt_ids) + answer_ids})
    return examples


@dataclass(frozen=True)
class EvalPrompts:
    """The held-out prompts every role answers, in one order, and what their answers are compared with."""

    frame: pd.DataFrame  # one row per prompt: prompt_id, messages, reference, category
    conversations: list[list[dict]]  # each row's chat messages
    with_references: pd.Series  # True where a row has a reference answer; all False when the data has none

    def referenced(self, values: list) -> list:
        """The items of ``values`` (one per prompt) whose prompt has a reference answer."""
        return [value for value, has_reference in zip(values, self.with_references) if has_reference]

    def references(self) -> list[str | None]:
        """Each prompt's reference answer, None where it has none."""
        return [
            reference if has_reference else None
            for reference, has_reference in zip(self.frame["reference"], self.with_references)
        ]


def select_eval_prompts(
    config: EvaluateConfig, dataset: DatasetRef, samples: SamplesRef
) -> tuple[EvalPrompts, list[str] | None]:
    """The eval prompts to measure on and, for a served teacher, its stored answers to them (None otherwise).

    A served teacher can't answer again: its answers are its stored eval responses (the first sample per
    prompt), and the prompts it didn't answer (skipped as overlong) are left out for every role.
    """
    prompts = read_split(dataset, "eval")
    stored_answers = None
    if samples.teacher_is_served:
        stored = read_teacher_outputs(samples.path, split="eval")
        stored_answers = stored[stored["sample_index"] == 0].set_index("prompt_id")["response_text"]
        prompts = prompts[prompts["prompt_id"].isin(stored_answers.index)].reset_index(drop=True)
        if prompts.empty:
            raise InputError(
                f"evaluate: the served teacher answered none of the eval prompts in {samples.path} "
                "(all skipped as overlong?); raise sample.context_length or shorten the prompts"
            )
    if config.max_prompts is not None:
        prompts = prompts.head(config.max_prompts)
    with_references = prompts["reference"].notna() if dataset.has_references else pd.Series(False, index=prompts.index)
    selected = EvalPrompts(
        frame=prompts,
        conversations=[json.loads(messages) for messages in prompts["messages"]],
        with_references=with_references,
    )
    if stored_answers is None:
        return selected, None
    return selected, [stored_answers[prompt_id] for prompt_id in prompts["prompt_id"]]


# Metric groups measured on a role's weights: each takes the loaded model and tokenizer and returns its metrics.


def size_metrics(role: str, path: str, model) -> dict[str, float]:
    """Group ``size``: ``<role>_size_mb``, its weight files on disk (the weights in memory for a Hub id)."""
    return {f"{role}_size_mb": m.size_on_disk_mb(path, sum(p.numel() * p.element_size() for p in model.parameters()))}


def response_metrics(
    model,
    tokenizer,
    role: str,
    groups: set[str],
    dataset: DatasetRef,
    samples: SamplesRef,
    prompts: EvalPrompts,
    teacher_tokenizer,
    batch_size: int,
) -> tuple[dict[str, float], list[float] | None]:
    """Groups ``perplexity``, ``kl`` and ``agreement`` (top-1), from one scoring pass over the teacher's responses.

    Returns ``<role>_perplexity``, ``kl_teacher_<role>`` and ``<role>_top1_agreement`` (these two where the
    teacher's top-k is stored and its tokenizer known: in the model's own tokens through the byte mapping when the
    vocabularies differ), and the KL by response position (or None).
    """
    shared_vocabulary = teacher_tokenizer is not None and vocabulary_difference(tokenizer, teacher_tokenizer) is None
    compared = (
        role != "teacher"
        and teacher_tokenizer is not None
        and samples.top_k_logprobs > 0
        and bool(groups & {"kl", "agreement"})
    )
    pair = None
    if compared and not shared_vocabulary:
        try:
            pair = pair_tokenizers(teacher_tokenizer, tokenizer, teacher_name="sample.teacher", student_name=role)
        except InputError as error:  # e.g. a slow tokenizer without byte offsets: no KL, the rest is measured
            log.warning("evaluate: no KL or top-1 agreement for %s: %s", role, error)
    examples = build_examples(
        dataset,
        samples,
        tokenizer,
        split="eval",
        shared_vocabulary=shared_vocabulary,
        with_top_k=compared and (shared_vocabulary or pair is not None),
        max_seq_len=100_000,
        prompt_ids=set(prompts.frame["prompt_id"]),
        align="byte" if pair is not None else "none",
        pair=pair,
    )
    scores = score_responses(model, examples, tokenizer.pad_token_id, batch_size, vocab_size=len(tokenizer))
    metrics, kl_by_position = {}, None
    if "perplexity" in groups:
        metrics[f"{role}_perplexity"] = m.perplexity(scores["cross_entropy"])
    if "kl" in scores and "kl" in groups:
        metrics[f"kl_teacher_{role}"] = scores["kl"]
        kl_by_position = scores["kl_by_position"]
    if "top1_agreement" in scores and "agreement" in groups:
        metrics[f"{role}_top1_agreement"] = scores["top1_agreement"]
    return metrics, kl_by_position


def reference_perplexity_metrics(
    model, tokenizer, role: str, prompts: EvalPrompts, batch_size: int
) -> dict[str, float]:
    """Group ``reference_perplexity``: ``<role>_reference_perplexity`` of the reference answers."""
    examples = reference_examples(
        tokenizer, prompts.referenced(prompts.conversations), prompts.referenced(list(prompts.frame["reference"]))
    )
    scores = score_responses(model, examples, tokenizer.pad_token_id, batch_size, vocab_size=len(tokenizer))
    return {f"{role}_reference_perplexity": m.perplexity(scores["cross_entropy"])}


def answers_and_speed(
    model, tokenizer, role: str, prompts: EvalPrompts, config: EvaluateConfig, *, timed: bool
) -> tuple[list[str], dict[str, float]]:
    """Greedy answers to every prompt (batched) and, ``timed`` (group ``speed``), how fast they came.

    The speed is ``<role>_tokens_per_second`` of that batched generation and ``<role>_latency_seconds``, the
    median time of ``config.latency_prompts`` prompts generated one at a time (NaN for none).
    """
    rendered = render_prompts(tokenizer, prompts.conversations)
    started = time.perf_counter()
    with tqdm(total=len(rendered), desc=f"evaluate {role}", unit="prompt") as bar:
        generations = generate(
            model,
            tokenizer,
            rendered,
            max_new_tokens=config.max_new_tokens,
            batch_size=config.batch_size,
            on_batch=bar.update,
        )
    seconds = time.perf_counter() - started
    answers = [g.text for g in generations]
    if not timed:
        return answers, {}
    latencies = []
    for prompt in rendered[: config.latency_prompts]:
        started = time.perf_counter()
        generate(model, tokenizer, [prompt], max_new_tokens=config.max_new_tokens, batch_size=1)
        latencies.append(time.perf_counter() - started)
    return answers, {
        f"{role}_tokens_per_second": m.tokens_per_second(sum(len(g.token_ids) for g in generations), seconds),
        f"{role}_latency_seconds": statistics.median(latencies) if latencies else float("nan"),
    }


def lm_eval_metrics(model, tokenizer, role: str, settings: LmEvalConfig) -> dict[str, float]:
    """``<role>_lm_eval/<task>/<metric>`` from lm-evaluation-harness."""
    from stillhouse.evaluation.lm_eval_adapter import run_lm_eval

    return {f"{role}_lm_eval/{name}": value for name, value in run_lm_eval(model, tokenizer, settings).items()}


@dataclass
class RoleMeasurement:
    """What one role's weights gave: its metrics, its answers to the eval prompts, its KL by response position."""

    metrics: dict[str, float]
    answers: list[str]
    kl_by_position: list[float] | None


def measure_role(
    role: str,
    path: str,
    config: EvaluateConfig,
    groups: set[str],
    dataset: DatasetRef,
    samples: SamplesRef,
    prompts: EvalPrompts,
    teacher_tokenizer,
) -> RoleMeasurement:
    """Load one role's model and run the metric groups that need its weights; the model is freed on return."""
    model, tokenizer = load_causal_lm(path, device="auto"), load_tokenizer(path)
    metrics = {f"{role}_parameters": count_parameters(model)}
    if "size" in groups:
        metrics.update(size_metrics(role, path, model))
    kl_by_position = None
    if groups & {"perplexity", "kl", "agreement"}:
        scored, kl_by_position = response_metrics(
            model, tokenizer, role, groups, dataset, samples, prompts, teacher_tokenizer, config.batch_size
        )
        metrics.update(scored)
    if "reference_perplexity" in groups and prompts.with_references.any():
        metrics.update(reference_perplexity_metrics(model, tokenizer, role, prompts, config.batch_size))
    answers, speed = answers_and_speed(model, tokenizer, role, prompts, config, timed="speed" in groups)
    metrics.update(speed)
    if config.lm_eval is not None and role in config.lm_eval.roles:
        metrics.update(lm_eval_metrics(model, tokenizer, role, config.lm_eval))
    return RoleMeasurement(metrics=metrics, answers=answers, kl_by_position=kl_by_position)


# Metric groups that compare answers: each takes every role's answers (and the prompts) and returns its metrics.


def answer_agreement_metrics(answers: dict[str, list[str]]) -> dict[str, float]:
    """Group ``agreement`` (answers): ``<role>_teacher_agreement``, the share of prompts answered as the teacher did."""
    teacher = answers["teacher"]
    return {
        f"{role}_teacher_agreement": sum(m.exact_match(answers[role], teacher)) / len(teacher)
        for role in answers
        if role != "teacher"
    }


def rouge_l_teacher_metrics(answers: dict[str, list[str]]) -> dict[str, float]:
    """Group ``rouge_l_teacher``: ``<role>_rouge_l_teacher``, the mean ROUGE-L F1 of its answers vs the teacher's."""
    return {
        f"{role}_rouge_l_teacher": m.mean_rouge_l(answers[role], answers["teacher"])
        for role in answers
        if role != "teacher"
    }


def rouge_l_reference_metrics(answers: dict[str, list[str]], prompts: EvalPrompts) -> dict[str, float]:
    """Group ``rouge_l_reference``: ``<role>_rouge_l_reference``, against the reference answers."""
    references = prompts.referenced(list(prompts.frame["reference"]))
    return {
        f"{role}_rouge_l_reference": m.mean_rouge_l(prompts.referenced(role_answers), references)
        for role, role_answers in answers.items()
    }


def exact_match_metrics(
    answers: dict[str, list[str]], prompts: EvalPrompts
) -> tuple[dict[str, float], dict[str, pd.Series]]:
    """Group ``exact_match``, on the prompts with a reference answer.

    Returns ``<role>_exact_match``, ``<role>_exact_match/<category>`` and ``accuracy_ratio_to_teacher``, and
    each role's right/wrong per prompt (a Series indexed like the prompts' rows that have a reference).
    """
    scored = prompts.frame[prompts.with_references.to_numpy()]
    metrics, correct_by_role = {}, {}
    for role, role_answers in answers.items():
        correct = pd.Series(m.exact_match(prompts.referenced(role_answers), scored["reference"]), index=scored.index)
        correct_by_role[role] = correct
        metrics[f"{role}_exact_match"] = float(correct.mean())
        for category, hits in correct.groupby(scored["category"]):
            metrics[f"{role}_exact_match/{category}"] = float(hits.mean())
    accuracy_ratio = m.ratio(metrics.get("student_exact_match"), metrics.get("teacher_exact_match"))
    if accuracy_ratio is not None:
        metrics["accuracy_ratio_to_teacher"] = accuracy_ratio
    return metrics, correct_by_role


def judged_win_rates(
    config: EvaluateConfig,
    teacher: str,
    conversations: list[list[dict]],
    answers: dict[str, list[str]],
    references: list[str | None],
) -> dict[str, float]:
    """``<role>_win_rate`` of each role's answers against the teacher's and ``student_win_rate_vs_baseline``,
    with 95% intervals."""
    from stillhouse.feedback.judge import PairJudgement, judge_pairs, verifier_scores, win_rate

    if config.win_rate_judge == "verifier":
        if any(reference is None for reference in references):
            raise InputError(
                "evaluate.win_rate_judge: `verifier` needs a reference answer for every eval prompt; "
                "use the `model` judge, or curate data whose reference column is filled"
            )

        def judged(firsts: list[str], seconds: list[str]) -> list[PairJudgement]:
            # Right beats wrong; both right or both wrong is a tie (first_better 0.5), which counts half.
            return [
                PairJudgement(first_better=(a - b + 1) / 2, consistent=True)
                for a, b in zip(verifier_scores(firsts, references), verifier_scores(seconds, references))
            ]
    else:
        judge = resolve_model(config.judge_model, "evaluate.judge_model") if config.judge_model else teacher
        model, tokenizer = load_causal_lm(judge, device="auto"), load_tokenizer(judge)
        questions = [
            next((m["content"] for m in reversed(messages) if m["role"] == "user"), "") for messages in conversations
        ]

        def judged(firsts: list[str], seconds: list[str]) -> list[PairJudgement]:
            return judge_pairs(model, tokenizer, questions, firsts, seconds, batch_size=config.batch_size)

    matches = [(f"{role}_win_rate", role, "teacher") for role in answers if role != "teacher"]
    if "baseline" in answers:
        matches.append(("student_win_rate_vs_baseline", "student", "baseline"))
    rates = {}
    for name, first, second in matches:
        rate = win_rate(judged(answers[first], answers[second]))
        rates.update({name: rate.rate, f"{name}_low": rate.low, f"{name}_high": rate.high})
    return rates


def roles_to_evaluate(
    config: EvaluateConfig, samples: SamplesRef, student: ModelRef, baseline: ModelRef | None
) -> dict[str, str]:
    """Each role and the model it is: teacher, student and, from ``baseline`` or else ``config.baseline``, baseline."""
    roles = {"teacher": samples.teacher, "student": student.model_path}
    if baseline is not None:
        roles["baseline"] = baseline.model_path
    elif config.baseline is not None:
        roles["baseline"] = resolve_model(config.baseline, "evaluate.baseline")
    return roles


def measure(
    folder: Path,
    config: EvaluateConfig,
    dataset: DatasetRef,
    samples: SamplesRef,
    student: ModelRef,
    progress: Callable[[float], None] | None = None,
    baseline: ModelRef | None = None,
) -> dict:
    """Measure every role on the eval split into ``folder`` (generations, report): the evaluate stage's work,
    which `stillhouse.evaluation.stage.evaluate_student` runs when the store doesn't hold it yet."""
    prompts, stored_teacher_answers = select_eval_prompts(config, dataset, samples)
    groups = set(config.selected_groups(dataset.has_references, samples.top_k_logprobs > 0))
    roles = roles_to_evaluate(config, samples, student, baseline)
    teacher_tokenizer = load_tokenizer(samples.teacher_tokenizer) if samples.teacher_tokenizer else None

    metrics: dict[str, float] = {}
    answers: dict[str, list[str]] = {}
    kl_by_position: dict[str, list[float]] = {}
    for step, (role, path) in enumerate(roles.items()):
        if role == "teacher" and samples.teacher_is_served:
            answers[role] = stored_teacher_answers  # no weights here: nothing to load or measure
        else:
            measured = measure_role(role, path, config, groups, dataset, samples, prompts, teacher_tokenizer)
            metrics.update(measured.metrics)
            answers[role] = measured.answers
            if measured.kl_by_position is not None:
                kl_by_position[role] = measured.kl_by_position
        if progress is not None:
            progress((step + 1) / len(roles))
    metrics.update(m.student_teacher_ratios(metrics))

    table = prompts.frame[["prompt_id", "messages", "reference", "category"]].assign(
        **{f"{role}_answer": answers[role] for role in roles}
    )
    if "agreement" in groups:
        metrics.update(answer_agreement_metrics(answers))
    if "rouge_l_teacher" in groups:
        metrics.update(rouge_l_teacher_metrics(answers))
    if prompts.with_references.any():
        if "exact_match" in groups:
            accuracy, correct_by_role = exact_match_metrics(answers, prompts)
            metrics.update(accuracy)
            for role, correct in correct_by_role.items():
                table[f"{role}_correct"] = correct  # NaN where a prompt has no reference
        if "rouge_l_reference" in groups:
            metrics.update(rouge_l_reference_metrics(answers, prompts))
    if "win_rate" in groups:
        metrics.update(judged_win_rates(config, samples.teacher, prompts.conversations, answers, prompts.references()))

    metrics = {name: float(value) for name, value in metrics.items() if not math.isnan(value)}
    table.to_parquet(folder / "generations.parquet", index=False)
    if config.report:
        write_report(
            folder / "report",
            metrics,
            title="Teacher vs student",
            loss_history=student.loss_history,
            kl_by_position=kl_by_position,
            eval_prompts=len(prompts.frame),
        )
    return {
        "metrics": metrics,
        "eval_prompts": len(prompts.frame),
        "kl_by_position": kl_by_position,
        "metric_groups": sorted(groups),
        "teacher_answers": "stored" if samples.teacher_is_served else "generated",
    }
