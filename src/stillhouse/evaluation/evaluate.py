"""The evaluation stage: the teacher, the student and (optionally) a baseline measured on the same held-out prompts.

Metric groups (``evaluate.metrics``; null computes every group the data supports). Roles are
``teacher``, ``student`` and, with ``evaluate.baseline``, ``baseline``:
- ``perplexity``: ``<role>_perplexity`` of the teacher's held-out responses (prompt tokens masked);
- ``reference_perplexity``: ``<role>_reference_perplexity`` of the reference answers;
- ``kl``: ``kl_teacher_student`` (``kl_teacher_baseline``), mean forward KL(teacher‖model) per response
  token on the stored top-k, and the KL by response position for the report;
- ``agreement``: ``student_teacher_agreement`` (share of prompts with the teacher's answer) and
  ``student_top1_agreement`` (share of response tokens whose argmax is the teacher's top-1);
- ``exact_match``: ``<role>_exact_match`` and ``<role>_exact_match/<category>`` against the references,
  ``accuracy_ratio_to_teacher``;
- ``rouge_l_teacher`` / ``rouge_l_reference``: ROUGE-L F1 of the answers against the teacher's / the references;
- ``speed``: ``<role>_tokens_per_second`` of batched greedy generation and ``<role>_latency_seconds``
  (median per prompt, one at a time), ``speed_ratio``, ``latency_ratio`` (student / teacher, same hardware);
- ``size``: ``<role>_size_mb`` (weight files), ``size_ratio``;
- ``win_rate`` (opt-in): ``student_win_rate`` (``_low``, ``_high``: 95% Wilson interval), the share of prompts where a judge
  model (``evaluate.judge_model``, else the teacher) prefers the student's answer to the teacher's, both orders judged,
  ties counting half; with a baseline also ``student_win_rate_vs_baseline``. ``evaluate.win_rate_judge: verifier`` judges
  by the references instead;
- always: ``<role>_parameters`` and ``parameter_ratio``;
- with ``evaluate.lm_eval``: ``<role>_lm_eval/<task>/<metric>`` from lm-evaluation-harness.

A served teacher (``sample.engine: openai``) has no weights here: its answers are the responses the
sample stage stored for the eval split (the first sample per prompt, generated with the sample stage's
settings), so exact match, agreement and ROUGE against the teacher still work, and the student's
perplexity, KL and top-1 agreement on those responses too. What needs the teacher's weights is left
out for role ``teacher``: its perplexities, size, speed and parameter count, and the ratios built on
them (``parameter_ratio``, ``size_ratio``, ``speed_ratio``, ``latency_ratio``). Eval prompts the teacher
did not answer (skipped as overlong) are left out for every role.

The report (Markdown, HTML, PNG) is written into ``report/`` of the stage's folder.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from stillhouse.config import METRIC_GROUPS_NEEDING_REFERENCES, EvaluateConfig
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
from stillhouse.refs import DatasetRef, EvalReport, ModelRef, SamplesRef
from stillhouse.sampling.hf_engine import generate, render_prompts
from stillhouse.sampling.teacher_outputs import read_teacher_outputs
from stillhouse.store import Store, fingerprint
from stillhouse.training.losses import TopK, cross_entropy, forward_kl
from stillhouse.training.train import PadCollator, build_examples

CODE_VERSION = 2
MAX_KL_POSITIONS = 256  # KL by position is reported for the first this many response tokens


@torch.inference_mode()
def score_responses(
    model, examples: list[dict], pad_token_id: int, batch_size: int, vocab_size: int, max_positions: int = MAX_KL_POSITIONS,
) -> dict[str, float | list[float]]:
    """Token-weighted mean cross-entropy and, when top-k targets are present, forward KL, top-1 agreement and KL by position.

    Returns ``cross_entropy`` (and ``kl``, ``top1_agreement``, ``kl_by_position``: the mean KL at
    response position 0, 1, ... over the examples that reach it). Logit rows past ``vocab_size``
    (embedding padding) are not tokens and are left out.
    """
    collate = PadCollator(pad_token_id)
    totals = defaultdict(float)
    kl_sums, kl_counts = torch.zeros(max_positions, dtype=torch.float64), torch.zeros(max_positions, dtype=torch.float64)
    for start in range(0, len(examples), batch_size):
        batch = {key: value.to(model.device) for key, value in collate(examples[start : start + batch_size]).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1, :vocab_size]
        targets = batch["labels"][:, 1:]
        counted = targets.ne(-100)
        tokens = counted.sum().item()
        totals["tokens"] += tokens
        totals["cross_entropy"] += cross_entropy(logits, targets).item() * tokens
        if "top_k_ids" in batch:
            teacher = TopK(batch["top_k_ids"][:, 1:], batch["top_k_logprobs"][:, 1:])
            totals["kl"] += forward_kl(logits, teacher, targets).item() * tokens
            totals["top1"] += (logits.argmax(-1).eq(teacher.ids[..., 0]) & counted).sum().item()
            offsets = counted.cumsum(dim=1) - 1  # response position of each counted target
            for position in range(min(int(offsets.max().item()) + 1, max_positions)):
                at_position = counted & offsets.eq(position)
                count = at_position.sum().item()
                if count:
                    kl_sums[position] += forward_kl(logits, teacher, targets.masked_fill(~at_position, -100)).item() * count
                    kl_counts[position] += count
    tokens = max(totals["tokens"], 1)
    scores: dict[str, float | list[float]] = {"cross_entropy": totals["cross_entropy"] / tokens}
    if "kl" in totals:
        scores["kl"] = totals["kl"] / tokens
        scores["top1_agreement"] = totals["top1"] / tokens
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


def timed_generation(model, tokenizer, rendered: list[str], config: EvaluateConfig, description: str, latency_prompts: int):
    """Greedy answers to every prompt (batched), the generation's tokens/s, and the median latency of single prompts (NaN for none)."""
    started = time.perf_counter()
    with tqdm(total=len(rendered), desc=description, unit="prompt") as bar:
        generations = generate(model, tokenizer, rendered, max_new_tokens=config.max_new_tokens, batch_size=config.batch_size, on_batch=bar.update)
    seconds = time.perf_counter() - started
    tokens_per_second = m.tokens_per_second(sum(len(g.token_ids) for g in generations), seconds)
    latencies = []
    for prompt in rendered[:latency_prompts]:
        started = time.perf_counter()
        generate(model, tokenizer, [prompt], max_new_tokens=config.max_new_tokens, batch_size=1)
        latencies.append(time.perf_counter() - started)
    return [g.text for g in generations], tokens_per_second, statistics.median(latencies) if latencies else float("nan")


def judged_win_rates(config: EvaluateConfig, teacher: str, conversations: list[list[dict]], answers: dict[str, list[str]],
                     references: list[str | None]) -> dict[str, float]:
    """``<role>_win_rate`` of each role's answers against the teacher's and ``student_win_rate_vs_baseline``, with 95% intervals."""
    from stillhouse.feedback.judge import PairJudgement, judge_pairs, verifier_scores, win_rate

    if config.win_rate_judge == "verifier":
        if any(reference is None for reference in references):
            raise InputError("evaluate.win_rate_judge: `verifier` needs a reference answer for every eval prompt; "
                             "use the `model` judge, or curate data whose reference column is filled")

        def judged(firsts: list[str], seconds: list[str]) -> list[PairJudgement]:
            # Right beats wrong; both right or both wrong is a tie (first_better 0.5), which counts half.
            return [PairJudgement(first_better=(a - b + 1) / 2, consistent=True)
                    for a, b in zip(verifier_scores(firsts, references), verifier_scores(seconds, references))]
    else:
        judge = resolve_model(config.judge_model, "evaluate.judge_model") if config.judge_model else teacher
        model, tokenizer = load_causal_lm(judge, device="auto"), load_tokenizer(judge)
        questions = [next((m["content"] for m in reversed(messages) if m["role"] == "user"), "") for messages in conversations]

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


def check_eval_set(config: EvaluateConfig, dataset: DatasetRef) -> None:
    """Refuse an empty eval split, or explicitly chosen reference metrics on data without references."""
    if dataset.eval_rows == 0:
        raise InputError("evaluate: the eval split has no rows; add data or raise curate.eval_fraction")
    needing = [g for g in config.metrics or [] if g in METRIC_GROUPS_NEEDING_REFERENCES]
    if needing and not dataset.has_references:
        raise InputError(f"evaluate.metrics: {', '.join(needing)} need reference answers, but the curated data has none; "
                         "set curate.reference_column to the column holding them, or drop those metrics")
    if "win_rate" in (config.metrics or []) and config.win_rate_judge == "verifier" and not dataset.has_references:
        raise InputError("evaluate.win_rate_judge: `verifier` judges by reference answers, but the curated data has none; "
                         "set curate.reference_column, or use win_rate_judge: model")


def evaluate_student(
    config: EvaluateConfig, dataset: DatasetRef, samples: SamplesRef, student: ModelRef, store: Store,
    progress: Callable[[float], None] | None = None, baseline: ModelRef | None = None,
) -> EvalReport:
    """Measure teacher, student and baseline on the eval split; the result is cached in the store by fingerprint.

    ``baseline`` (e.g. the SFT student a feedback stage started from) is evaluated as role ``baseline``
    and takes precedence over ``config.baseline``.
    """
    check_eval_set(config, dataset)
    if samples.teacher_is_served and "win_rate" in (config.metrics or []) and config.win_rate_judge == "model" and config.judge_model is None:
        raise InputError("evaluate.judge_model: win_rate's default judge is the teacher, but the teacher behind sample.engine `openai` is a "
                         "served model that can't be loaded here; set evaluate.judge_model to a local judge model, or evaluate.win_rate_judge: verifier")
    settings = config.model_dump(mode="json", exclude={"gate"})  # the gate decides promotion; it doesn't change measurements
    inputs = {"dataset": dataset.fingerprint, "samples": samples.fingerprint, "student": student.fingerprint}
    if baseline is not None:
        inputs["baseline"] = baseline.fingerprint
    stage_fingerprint = fingerprint("evaluate", settings, inputs, CODE_VERSION)

    def compute(folder: Path) -> dict:
        prompts = read_split(dataset, "eval")
        if samples.teacher_is_served:
            stored = read_teacher_outputs(samples.path, split="eval")
            stored_answers = stored[stored["sample_index"] == 0].set_index("prompt_id")["response_text"]
            prompts = prompts[prompts["prompt_id"].isin(stored_answers.index)].reset_index(drop=True)
            if prompts.empty:
                raise InputError(f"evaluate: the served teacher answered none of the eval prompts in {samples.path} "
                                 "(all skipped as overlong?); raise sample.context_length or shorten the prompts")
        if config.max_prompts is not None:
            prompts = prompts.head(config.max_prompts)
        groups = set(config.selected_groups(dataset.has_references, samples.top_k_logprobs > 0))
        conversations = [json.loads(messages) for messages in prompts["messages"]]
        with_references = prompts["reference"].notna() if dataset.has_references else pd.Series(False, index=prompts.index)
        metrics: dict[str, float] = {}
        answers: dict[str, list[str]] = {}
        kl_by_position: dict[str, list[float]] = {}
        roles = {"teacher": samples.teacher, "student": student.model_path}
        if baseline is not None:
            roles["baseline"] = baseline.model_path
        elif config.baseline is not None:
            roles["baseline"] = resolve_model(config.baseline, "evaluate.baseline")
        teacher_tokenizer = load_tokenizer(samples.teacher_tokenizer) if samples.teacher_tokenizer else None
        for step, (role, path) in enumerate(roles.items()):
            if role == "teacher" and samples.teacher_is_served:
                answers[role] = [stored_answers[prompt_id] for prompt_id in prompts["prompt_id"]]  # nothing to load or measure
                continue
            model, tokenizer = load_causal_lm(path, device="auto"), load_tokenizer(path)
            metrics[f"{role}_parameters"] = count_parameters(model)
            if "size" in groups:
                metrics[f"{role}_size_mb"] = m.size_on_disk_mb(path, sum(p.numel() * p.element_size() for p in model.parameters()))
            shared_vocabulary = teacher_tokenizer is not None and vocabulary_difference(tokenizer, teacher_tokenizer) is None
            with_top_k = role != "teacher" and shared_vocabulary and samples.top_k_logprobs > 0 and groups & {"kl", "agreement"}
            if groups & {"perplexity", "kl", "agreement"}:
                examples = build_examples(
                    dataset, samples, tokenizer, split="eval", shared_vocabulary=shared_vocabulary, with_top_k=bool(with_top_k),
                    max_seq_len=100_000, prompt_ids=set(prompts["prompt_id"]),
                )
                scores = score_responses(model, examples, tokenizer.pad_token_id, config.batch_size, vocab_size=len(tokenizer))
                if "perplexity" in groups:
                    metrics[f"{role}_perplexity"] = m.perplexity(scores["cross_entropy"])
                if "kl" in scores and "kl" in groups:
                    metrics[f"kl_teacher_{role}"] = scores["kl"]
                    kl_by_position[role] = scores["kl_by_position"]
                if "top1_agreement" in scores and "agreement" in groups:
                    metrics[f"{role}_top1_agreement"] = scores["top1_agreement"]
            if "reference_perplexity" in groups and with_references.any():
                kept = prompts[with_references]
                examples = reference_examples(tokenizer, [conversations[i] for i in range(len(prompts)) if with_references.iloc[i]], list(kept["reference"]))
                metrics[f"{role}_reference_perplexity"] = m.perplexity(
                    score_responses(model, examples, tokenizer.pad_token_id, config.batch_size, vocab_size=len(tokenizer))["cross_entropy"])
            rendered = render_prompts(tokenizer, conversations)
            answers[role], tokens_per_second, latency = timed_generation(
                model, tokenizer, rendered, config, f"evaluate {role}", latency_prompts=config.latency_prompts if "speed" in groups else 0)
            if "speed" in groups:
                metrics[f"{role}_tokens_per_second"], metrics[f"{role}_latency_seconds"] = tokens_per_second, latency
            if config.lm_eval is not None and role in config.lm_eval.roles:
                from stillhouse.evaluation.lm_eval_adapter import run_lm_eval

                for name, value in run_lm_eval(model, tokenizer, config.lm_eval).items():
                    metrics[f"{role}_lm_eval/{name}"] = value
            del model
            if progress is not None:
                progress((step + 1) / len(roles))

        for name, numerator, denominator in [("parameter_ratio", "student_parameters", "teacher_parameters"), ("size_ratio", "student_size_mb", "teacher_size_mb"),
                                             ("speed_ratio", "student_tokens_per_second", "teacher_tokens_per_second"),
                                             ("latency_ratio", "student_latency_seconds", "teacher_latency_seconds")]:
            value = m.ratio(metrics.get(numerator), metrics.get(denominator))
            if value is not None:
                metrics[name] = value
        table = prompts[["prompt_id", "messages", "reference", "category"]].assign(**{f"{role}_answer": answers[role] for role in roles})
        for role in roles:
            if role == "teacher":
                continue
            if "agreement" in groups:
                metrics[f"{role}_teacher_agreement"] = sum(m.exact_match(answers[role], answers["teacher"])) / len(prompts)
            if "rouge_l_teacher" in groups:
                metrics[f"{role}_rouge_l_teacher"] = m.mean_rouge_l(answers[role], answers["teacher"])
        if dataset.has_references and with_references.any():
            scored = table[with_references.to_numpy()]
            for role in roles:
                if "exact_match" in groups:
                    correct = pd.Series(m.exact_match(scored[f"{role}_answer"], scored["reference"]), index=scored.index)
                    table[f"{role}_correct"] = correct  # NaN where a prompt has no reference
                    metrics[f"{role}_exact_match"] = float(correct.mean())
                    for category, hits in correct.groupby(scored["category"]):
                        metrics[f"{role}_exact_match/{category}"] = float(hits.mean())
                if "rouge_l_reference" in groups:
                    metrics[f"{role}_rouge_l_reference"] = m.mean_rouge_l(list(scored[f"{role}_answer"]), list(scored["reference"]))
            accuracy_ratio = m.ratio(metrics.get("student_exact_match"), metrics.get("teacher_exact_match"))
            if accuracy_ratio is not None:
                metrics["accuracy_ratio_to_teacher"] = accuracy_ratio
        if "win_rate" in groups:
            references = [r if isinstance(r, str) else None for r in prompts["reference"]] if dataset.has_references else [None] * len(prompts)
            metrics.update(judged_win_rates(config, samples.teacher, conversations, answers, references))
        metrics = {name: float(value) for name, value in metrics.items() if not math.isnan(value)}
        table.to_parquet(folder / "generations.parquet", index=False)
        if config.report:
            write_report(folder / "report", metrics, title="Teacher vs student", loss_history=student.loss_history,
                         kl_by_position=kl_by_position, eval_prompts=len(prompts))
        return {"metrics": metrics, "eval_prompts": len(prompts), "kl_by_position": kl_by_position, "metric_groups": sorted(groups),
                "teacher_answers": "stored" if samples.teacher_is_served else "generated"}

    output = store.build("evaluate", stage_fingerprint, compute)
    return EvalReport(stage="evaluate", fingerprint=stage_fingerprint, path=str(output.path), cached=output.cached, metrics=output.manifest["metrics"])


def read_generations(report: EvalReport) -> pd.DataFrame:
    return pd.read_parquet(Path(report.path) / "generations.parquet")


def report_files(report: EvalReport) -> list[Path]:
    """The report's files (Markdown, HTML, PNG) in the stage folder; empty when evaluate.report was off."""
    folder = Path(report.path) / "report"
    return sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
