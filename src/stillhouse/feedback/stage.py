"""The feedback stages: judge the student's candidates into preference pairs, then learn from them.

    collect_preferences(config.feedback, dataset, samples, student, store) -> PairsRef   # stage "judge"
    train_on_feedback(config.feedback, dataset, pairs, student, store) -> ModelRef       # stage "feedback"

Each is its own store entry, so changing only the DPO settings reuses the judged pairs, and the SFT
student before them is reused as it is (dSFT -> dDPO).

The judge stage works in shards of ``feedback.judge.shard_prompts`` prompts, like sampling: each
shard's candidates and scores are written atomically (``judged-00000.parquet``) as it finishes, so a
run that fails (a judge endpoint that keeps timing out) keeps its finished shards and a rerun judges
only the missing ones. A shard's content depends only on the config, the prompts and its index
(candidates sampled under ``seed + 100003 i``), so the resumed run ends with what an uninterrupted
one writes. pairs.parquet and candidates.parquet are assembled from the shards, the manifest last.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from stillhouse.capabilities import assert_no_problem, feedback_judge_problem
from stillhouse.config import FeedbackConfig
from stillhouse.data.curate import read_split
from stillhouse.errors import InputError, StillhouseError
from stillhouse.feedback.judge import (
    PAIRWISE_RUBRIC,
    POINTWISE_RUBRIC,
    EndpointJudge,
    judge_pairs,
    pointwise_scores,
    verifier_scores,
)
from stillhouse.feedback.pairs import build_pairs
from stillhouse.models import count_parameters, load_causal_lm, load_tokenizer, resolve_model
from stillhouse.refs import DatasetRef, ModelRef, PairsRef, SamplesRef
from stillhouse.sampling.hf_engine import generate, render_prompts
from stillhouse.sampling.teacher_outputs import read_teacher_outputs
from stillhouse.store import Store, fingerprint

CODE_VERSION = 2
TRAINING_FIELDS = {"method", "beta", "sft_weight", "learning_rate", "max_steps", "batch_size", "threads"}
SHARD_SEED_STRIDE = 100_003  # shard i samples its candidates under seed + SHARD_SEED_STRIDE * i
ROUND_SEED_STRIDE = 7919  # ... and its r-th candidate per prompt under a further + ROUND_SEED_STRIDE * r
TALLIES = ("judge_verdicts", "judge_unusable", "judge_comparisons", "judge_consistent", "judge_ties")


def judged_shard_name(index: int) -> str:
    return f"judged-{index:05d}.parquet"


def sample_candidates(
    config: FeedbackConfig, model, tokenizer, conversations: list[list[dict]], seed: int
) -> list[list[str]]:
    """``config.candidates`` sampled responses of the student per conversation."""
    prompts = render_prompts(tokenizer, conversations)
    rounds = [
        [
            g.text
            for g in generate(
                model,
                tokenizer,
                prompts,
                max_new_tokens=config.max_new_tokens,
                temperature=config.temperature,
                seed=seed + ROUND_SEED_STRIDE * index,
            )
        ]
        for index in range(config.candidates)
    ]
    return [list(texts) for texts in zip(*rounds)]


class Judge:
    """The configured judge, loaded once per run: a model in this process, an endpoint, or the reference answers."""

    def __init__(self, config: FeedbackConfig, judge_path: str):
        self.config, self.settings = config, config.judge
        self.model = self.tokenizer = self.endpoint = None
        if self.settings.kind == "verifier":
            return
        if self.settings.engine == "openai":
            from stillhouse.sampling.openai_engine import OpenAIEngine

            # The sampling engine's HTTP client, retries and backoff, keeping the answer's tokens as the server spells
            # them: the verdict is read from the labels (" A", "10"), so no tokenizer or server token ids are involved.
            engine = OpenAIEngine(
                self.settings.openai, self.settings.model, token_ids=False, settings_field="feedback.judge.openai"
            )
            self.endpoint = EndpointJudge(
                engine, max_tokens=self.settings.max_tokens, top_logprobs=self.settings.top_logprobs
            )
        else:
            self.model, self.tokenizer = load_causal_lm(judge_path, device="auto"), load_tokenizer(judge_path)

    def close(self) -> None:
        if self.endpoint is not None:
            self.endpoint.engine.close()

    def score(
        self,
        questions: list[str],
        candidates: list[list[str]],
        references: list[str | None],
        prompt_ids: list[str],
        where: str,
    ) -> tuple[list[list[float]], list[dict[str, int]]]:
        """Scores per candidate (higher is better; NaN where the judge's answer was unusable) and per-prompt tallies.

        Pairwise: every candidate against the prompt's first, both orders; the first (and any copy of
        it) scores 0.5 unjudged, and a tie or an order-inconsistent comparison scores 0.5 too: no
        preference over the first. Error messages name ``where`` (the shard) and ``prompt_ids[i]``.
        """
        settings = self.settings
        tallies = [dict.fromkeys(TALLIES, 0) for _ in candidates]
        if settings.kind == "verifier":
            return [
                verifier_scores(texts, [reference] * len(texts)) for texts, reference in zip(candidates, references)
            ], tallies
        # (prompt row, candidate column) of every candidate the judge sees; pairwise skips the first and its copies
        jobs = [
            (row, column)
            for row, texts in enumerate(candidates)
            for column, text in enumerate(texts)
            if settings.kind == "pointwise" or text != texts[0]
        ]
        questions_of = [questions[row] for row, _ in jobs]
        answers_of = [candidates[row][column] for row, column in jobs]
        ids_of = [prompt_ids[row] for row, _ in jobs]
        scores = [[0.5 if settings.kind == "pairwise" else math.nan] * len(texts) for texts in candidates]
        if settings.kind == "pointwise":
            rubric = settings.rubric or POINTWISE_RUBRIC
            if self.endpoint is not None:
                flat = self.endpoint.pointwise_scores(questions_of, answers_of, ids_of, where, rubric=rubric)
            else:
                flat = pointwise_scores(self.model, self.tokenizer, questions_of, answers_of, rubric=rubric)
            for (row, column), value in zip(jobs, flat):
                tallies[row]["judge_verdicts"] += 1
                tallies[row]["judge_unusable"] += value is None
                scores[row][column] = math.nan if value is None else value
            return scores, tallies
        rubric = settings.rubric or PAIRWISE_RUBRIC
        firsts = [candidates[row][0] for row, _ in jobs]
        if self.endpoint is not None:
            judgements = self.endpoint.judge_pairs(questions_of, answers_of, firsts, ids_of, where, rubric=rubric)
        else:
            judgements = judge_pairs(self.model, self.tokenizer, questions_of, answers_of, firsts, rubric=rubric)
        for (row, column), judgement in zip(jobs, judgements):
            tally = tallies[row]
            tally["judge_verdicts"] += 1
            if judgement is None:  # an order whose answer named no verdict: the candidate is dropped
                tally["judge_unusable"] += 1
                scores[row][column] = math.nan
                continue
            tally["judge_comparisons"] += 1
            tally["judge_consistent"] += judgement.consistent
            verdict = judgement.verdict(settings.tie_margin)
            tally["judge_ties"] += judgement.consistent and verdict is None
            scores[row][column] = judgement.first_better if verdict is not None else 0.5
        return scores, tallies


def _judge_shard(
    config: FeedbackConfig,
    judge: Judge,
    student_model,
    student_tokenizer,
    prompts: pd.DataFrame,
    teacher_responses: pd.Series | None,
    index: int,
    label: str,
) -> pd.DataFrame:
    """Candidates of one shard's prompts, sampled from the student then judged: one row per prompt."""
    conversations = [json.loads(m) for m in prompts["messages"]]
    candidates = sample_candidates(
        config, student_model, student_tokenizer, conversations, seed=config.seed + SHARD_SEED_STRIDE * index
    )
    if teacher_responses is not None:
        candidates = [
            texts + [teacher_responses.get(pid, texts[0])] for texts, pid in zip(candidates, prompts["prompt_id"])
        ]
    questions = [messages[-1]["content"] for messages in conversations]
    scores, tallies = judge.score(
        questions, candidates, prompts["reference"].tolist(), prompts["prompt_id"].tolist(), f"judge {label}"
    )
    frame = pd.DataFrame({"prompt_id": prompts["prompt_id"].tolist(), "candidates": candidates, "scores": scores})
    for name in TALLIES:
        frame[name] = [tally[name] for tally in tallies]
    return frame


def _write_atomic(frame: pd.DataFrame, path: Path) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    frame.to_parquet(temporary, index=False)
    os.replace(temporary, path)


def judge_settings(config: FeedbackConfig) -> dict:
    """What decides the judged pairs: not the training fields,
    nor how the endpoint is reached (key, retries, timeouts)."""
    settings = config.model_dump(mode="json", exclude=TRAINING_FIELDS)
    judge = settings["judge"]
    if config.judge.engine == "openai":
        judge["openai"] = {"base_url": config.judge.openai.base_url}
    else:
        for name in ("openai", "top_logprobs", "max_tokens"):
            judge.pop(name)
    return settings


def collect_preferences(
    config: FeedbackConfig,
    dataset: DatasetRef,
    samples: SamplesRef,
    student: ModelRef,
    store: Store,
    progress: Callable[[float], None] | None = None,
) -> PairsRef:
    if config.judge.kind == "verifier" and not dataset.has_references:
        raise InputError(
            "feedback.judge.kind: `verifier` needs reference answers, and the curated data has none; "
            "set curate.reference_column, or use a `pointwise` or `pairwise` judge"
        )
    # The config validator refused a served teacher as the default judge;
    # reaching this is a bug or a hand-built reference.
    assert_no_problem(
        feedback_judge_problem(
            teacher_is_served=samples.teacher_is_served, judge_kind=config.judge.kind, judge_model=config.judge.model
        )
    )
    if config.judge.engine == "openai" and config.judge.kind != "verifier":
        judge_path = f"{config.judge.model}@{config.judge.openai.base_url}"
    elif config.judge.model:
        judge_path = resolve_model(config.judge.model, "feedback.judge.model")
    else:
        judge_path = samples.teacher
    stage_fingerprint = fingerprint(
        "judge",
        judge_settings(config),
        {"dataset": dataset.fingerprint, "samples": samples.fingerprint, "student": student.fingerprint},
        CODE_VERSION,
    )
    store.claim("judge", stage_fingerprint)  # on an s3:// store, fetches the shards an interrupted run uploaded

    def compute(folder: Path) -> dict:
        if config.threads:
            torch.set_num_threads(config.threads)
        prompts = read_split(dataset, "train")
        if config.max_prompts is not None:
            prompts = prompts.head(config.max_prompts)
        for partial in folder.glob(".judged-*.tmp"):  # left by a killed run
            partial.unlink(missing_ok=True)
        size = config.judge.shard_prompts
        shards = -(-len(prompts) // size)
        pending = [index for index in range(shards) if not (folder / judged_shard_name(index)).exists()]
        if pending:
            _judge_pending_shards(
                config,
                judge_path,
                samples,
                student,
                store,
                stage_fingerprint,
                folder,
                prompts,
                shards,
                pending,
                progress,
            )
        table = pd.concat(
            [pd.read_parquet(folder / judged_shard_name(index)) for index in range(shards)], ignore_index=True
        )
        return _assemble(config, folder, prompts, table, judge_path)

    output = store.build("judge", stage_fingerprint, compute)
    manifest = output.manifest
    return PairsRef(
        stage="judge",
        fingerprint=stage_fingerprint,
        path=str(output.path),
        cached=output.cached,
        pairs=manifest["pairs"],
        counts=manifest["counts"],
        judge_consistency=manifest["judge_consistency"],
    )


def _judge_pending_shards(
    config: FeedbackConfig,
    judge_path: str,
    samples: SamplesRef,
    student: ModelRef,
    store: Store,
    stage_fingerprint: str,
    folder: Path,
    prompts: pd.DataFrame,
    shards: int,
    pending: list[int],
    progress: Callable[[float], None] | None,
) -> None:
    """Sample and judge each missing shard, writing each as it finishes; the first failure stops the run,
    naming its shard."""
    from stillhouse.sampling.openai_engine import EngineError

    size = config.judge.shard_prompts
    teacher_responses = None
    if config.include_teacher:
        teacher_responses = read_teacher_outputs(samples.path, split="train").set_index("prompt_id")["response_text"]
    student_model, student_tokenizer = (
        load_causal_lm(student.model_path, device="auto"),
        load_tokenizer(student.model_path),
    )
    judge = Judge(config, judge_path)
    bar = tqdm(total=shards, initial=shards - len(pending), desc="judge candidates", unit="shard")
    try:
        for index in pending:
            name = judged_shard_name(index)
            label = f"shard {index} ({name}) of {shards}"
            try:
                frame = _judge_shard(
                    config,
                    judge,
                    student_model,
                    student_tokenizer,
                    prompts.iloc[index * size : (index + 1) * size],
                    teacher_responses,
                    index,
                    label,
                )
            except EngineError as error:
                done = sum((folder / judged_shard_name(i)).exists() for i in range(shards))
                raise StillhouseError(
                    f"{error}. The judge stage stopped at {label}; the {done} finished shard(s) are kept in {folder}, "
                    "and a rerun judges only the missing ones"
                ) from None
            _write_atomic(frame, folder / name)
            store.upload_partial("judge", stage_fingerprint, folder / name)
            bar.update(1)
            if progress is not None:
                progress(bar.n / shards)
    finally:
        bar.close()
        judge.close()


def _assemble(
    config: FeedbackConfig, folder: Path, prompts: pd.DataFrame, table: pd.DataFrame, judge_path: str
) -> dict:
    """pairs.parquet and candidates.parquet from the shards, after the checks on unusable answers and
    prompts without a pair."""
    tallies = {name: int(table[name].sum()) for name in TALLIES}
    if tallies["judge_verdicts"] and tallies["judge_unusable"] / tallies["judge_verdicts"] > config.max_unusable_share:
        share = tallies["judge_unusable"] / tallies["judge_verdicts"]
        raise StillhouseError(
            f"feedback.judge: {share:.0%} of {tallies['judge_verdicts']} judge verdicts ({tallies['judge_unusable']}) "
            "were unusable (an answer named no label), more than feedback.max_unusable_share "
            f"({config.max_unusable_share:.0%}) ({judge_path}). Make the rubric ask for the label only, raise "
            "feedback.judge.max_tokens, or use a judge that returns log-probs (feedback.judge.top_logprobs > 0); "
            "the judged shards are kept in " + str(folder)
        )
    candidates = [list(texts) for texts in table["candidates"]]
    scores = [[float(value) for value in values] for values in table["scores"]]
    usable = [
        [(text, value) for text, value in zip(texts, values) if not math.isnan(value)]
        for texts, values in zip(candidates, scores)
    ]
    pairs, dropped = build_pairs(
        table["prompt_id"].tolist(),
        [[t for t, _ in row] for row in usable],
        [[v for _, v in row] for row in usable],
        config.min_margin,
    )
    unusable = 1 - len(pairs) / len(prompts)
    if unusable > config.max_unusable_share:
        raise StillhouseError(
            f"feedback: {unusable:.0%} of {len(prompts)} prompts gave no usable pair ({dropped}); more than "
            f"feedback.max_unusable_share ({config.max_unusable_share:.0%}). Sample more candidates, raise the "
            "temperature, or lower feedback.min_margin"
        )
    messages = dict(zip(prompts["prompt_id"], prompts["messages"]))
    pairs_table = pd.DataFrame(pairs, columns=["prompt_id", "chosen", "rejected", "margin"])
    pairs_table.insert(1, "messages", [messages[pid] for pid in pairs_table["prompt_id"]])
    pairs_table.to_parquet(folder / "pairs.parquet", index=False)
    pd.DataFrame({"prompt_id": table["prompt_id"], "candidates": candidates, "scores": scores}).to_parquet(
        folder / "candidates.parquet", index=False
    )
    consistency = tallies["judge_consistent"] / tallies["judge_comparisons"] if tallies["judge_comparisons"] else None
    counts = {
        "prompts": len(prompts),
        "pairs": len(pairs),
        **dropped,
        "judge_verdicts": tallies["judge_verdicts"],
        "judge_unusable": tallies["judge_unusable"],
    }
    if config.judge.kind == "pairwise":
        counts.update(
            judge_inconsistent=tallies["judge_comparisons"] - tallies["judge_consistent"],
            judge_ties=tallies["judge_ties"],
        )
    return {
        "pairs": len(pairs),
        "counts": counts,
        "judge_consistency": consistency if config.judge.kind == "pairwise" else None,
        "judge": judge_path,
        "shards": [judged_shard_name(i) for i in range(-(-len(prompts) // config.judge.shard_prompts))],
    }


def read_pairs(pairs: PairsRef) -> pd.DataFrame:
    return pd.read_parquet(Path(pairs.path) / "pairs.parquet")


def train_on_feedback(
    config: FeedbackConfig, dataset: DatasetRef, pairs: PairsRef, student: ModelRef, store: Store
) -> ModelRef:
    """DPO on the pairs (reference: the student before it), or best-of-n SFT on each pair's chosen response."""
    stage_fingerprint = fingerprint(
        "feedback",
        config.model_dump(mode="json", exclude={"threads"}),
        {"pairs": pairs.fingerprint, "student": student.fingerprint},
        CODE_VERSION,
    )

    def compute(folder: Path) -> dict:
        from stillhouse.training.dpo import train_best_of_n, train_dpo

        if config.threads:
            torch.set_num_threads(config.threads)
        table = read_pairs(pairs)
        if table.empty:
            raise StillhouseError(
                f"feedback: the judge produced no preference pairs ({pairs.counts}); sample more candidates, "
                "raise feedback.temperature, or lower feedback.min_margin"
            )
        rows = [
            {"prompt": json.loads(m), "chosen": c, "rejected": r}
            for m, c, r in zip(table["messages"], table["chosen"], table["rejected"])
        ]
        train = train_dpo if config.method == "dpo" else train_best_of_n
        result = train(
            student.model_path,
            rows,
            folder,
            beta=config.beta,
            learning_rate=config.learning_rate,
            max_steps=config.max_steps,
            batch_size=config.batch_size,
            seed=config.seed,
            sft_weight=config.sft_weight,
            warmup_ratio=config.warmup_ratio,
            logging_steps=max(1, config.max_steps // 25),
        )
        model = load_causal_lm(str(folder / "model"), device="cpu")
        history = [
            {
                "step": h["step"],
                "loss": h["loss"],
                **{k.replace("/", "_"): v for k, v in h.items() if k not in ("step", "loss")},
            }
            for h in result["history"]
        ]
        return {
            "model_path": str(folder / "model"),
            "parameters": count_parameters(model),
            "train_seconds": result["seconds"],
            "final_loss": history[-1]["loss"] if history else None,
            "loss_history": history,
        }

    output = store.build("feedback", stage_fingerprint, compute)
    return ModelRef.from_manifest("feedback", stage_fingerprint, output.path, output.cached, output.manifest)
