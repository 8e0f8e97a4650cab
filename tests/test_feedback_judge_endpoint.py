"""A judge behind an OpenAI-compatible endpoint, and the sharded, resumable judge stage.

The endpoint is tests/openai_server.py's server serving the tiny teacher as "tiny-judge", extended
here (a subclass) with what a served judge can do wrong: return no log-probs, answer with no
verdict, or stall until the client times out.
"""

import json
import math
import threading
from collections import Counter

import pandas as pd
import pytest
import torch
from conftest import build_tiny_model, curate_and_sample
from openai_server import FakeOpenAIServer

from stillhouse.config import FeedbackConfig
from stillhouse.data.curate import read_split
from stillhouse.errors import StillhouseError
from stillhouse.feedback.judge import (
    PAIRWISE_RUBRIC,
    POINTWISE_RUBRIC,
    SCORE_LABELS,
    judge_pairs,
    label_logprobs,
    pairwise_answer,
    pointwise_answer,
    render_judge_prompts,
)
from stillhouse.feedback.stage import Judge, collect_preferences, judged_shard_name
from stillhouse.models import load_causal_lm, load_tokenizer
from stillhouse.refs import ModelRef
from stillhouse.sampling.engine import Generation
from stillhouse.store import Store

KEY = "sk-judge-secret"
VOCABULARY = 85  # the character tokenizer's: every label is among the top log-probs


class JudgeServer(FakeOpenAIServer):
    """The shared fake server plus three ways a served judge misbehaves, each switched on by a test."""

    def __init__(self, model_folder):
        super().__init__(model_folder, served_name="tiny-judge")
        self.text_only = (
            False  # a constrained-decoding server that returns no log-probs: the most likely label, as text
        )
        self.unusable_marker = None  # prompts containing this get an answer that names no label
        self.stall_marker = None  # prompts containing this are held until `release` (the client times out first)
        self.release = threading.Event()

    @staticmethod
    def answer(text: str) -> dict:
        return {
            "id": "chatcmpl-judge",
            "object": "chat.completion",
            "model": "tiny-judge",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                    "logprobs": None,
                }
            ],
        }

    def most_likely_label(self, messages: list[dict]) -> str:
        labels = ("A", "B") if "Response A:" in messages[-1]["content"] else SCORE_LABELS
        prompt = render_judge_prompts(self.tokenizer, [messages[-1]["content"]])
        with self._lock:
            scores = label_logprobs(self.model, self.tokenizer, prompt, labels)[0]
        return labels[int(scores.argmax())]

    def complete(self, body: dict) -> dict:
        content = body["messages"][-1]["content"]
        if self.stall_marker is not None and self.stall_marker in content:
            self.release.wait(30)
        if self.unusable_marker is not None and self.unusable_marker in content:
            return self.answer("I cannot decide.")
        if self.text_only:
            return self.answer(self.most_likely_label(body["messages"]))
        return super().complete(body)


@pytest.fixture(scope="module")
def server(tiny_teacher):
    running = JudgeServer(tiny_teacher)
    with running:
        try:
            yield running
        finally:
            running.release.set()  # let a stalled handler finish, so the server stops at once


@pytest.fixture(autouse=True)
def fresh_server(server, monkeypatch):
    server.requests.clear()
    server.faults.clear()
    server.text_only, server.unusable_marker, server.stall_marker = False, None, None
    server.release.clear()
    monkeypatch.setenv("TEST_JUDGE_KEY", KEY)


@pytest.fixture(scope="module")
def judge_model(tiny_teacher):
    return load_causal_lm(str(tiny_teacher), device="cpu"), load_tokenizer(str(tiny_teacher))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_teacher, prompts_jsonl):
    """(dataset, samples, student): curated prompts, the teacher's samples, and a tiny student (a real model folder)."""
    root = tmp_path_factory.mktemp("judge-inputs")
    _, dataset, samples = curate_and_sample(root / "store", tiny_teacher, prompts_jsonl)
    folder = build_tiny_model(root / "student", hidden_size=16, seed=2)
    student = ModelRef(
        stage="train",
        fingerprint="tiny-student-seed-2",
        path=str(folder),
        cached=True,
        model_path=str(folder),
        parameters=sum(p.numel() for p in load_causal_lm(str(folder), device="cpu").parameters()),
        train_seconds=0.0,
        final_loss=None,
    )
    return dataset, samples, student


def feedback_config(
    server, kind="pointwise", *, top_logprobs=VOCABULARY, max_unusable_share=1.0, **openai
) -> FeedbackConfig:
    endpoint = {
        "base_url": server.url,
        "api_key_env": "TEST_JUDGE_KEY",
        "max_concurrency": 2,
        "backoff_seconds": 0.0,
        **openai,
    }
    return FeedbackConfig(
        candidates=3,
        max_new_tokens=6,
        max_prompts=8,
        min_margin=0.0,
        max_unusable_share=max_unusable_share,
        judge={
            "kind": kind,
            "engine": "openai",
            "model": "tiny-judge",
            "openai": endpoint,
            "top_logprobs": top_logprobs,
            "max_tokens": 3,
            "shard_prompts": 4,
        },
    )


def endpoint_judge(server, **settings):
    return Judge(feedback_config(server, **settings), judge_path="unused for a served judge").endpoint


QUESTIONS = ["reverse: abc", "sort: dcb", "reverse: kite", "upper: moon"]
FIRSTS = ["cba", "bcd", "etik", "MOON"]
SECONDS = ["abc", "dcb", "kite", "moon"]
PROMPT_IDS = [f"p{i}" for i in range(4)]


# -- reading verdicts from an endpoint's answer ----------------------------------------------------------------------


def choice(text: str, *positions: dict[str, float]) -> Generation:
    """An endpoint's answer as the `openai` engine reads it for the judge (token strings kept), whose positions have
    these top log-probs (the first entry is the chosen token); no positions: a server that sent no log-probs."""
    if not positions:
        return Generation([], text)
    return Generation(
        [],
        text,
        tokens=[next(iter(top)) for top in positions],
        top_k_tokens=[list(top) for top in positions],
        top_k_logprobs=[[math.log(p) for p in top.values()] for top in positions],
    )


def test_labels_are_read_from_the_top_logprobs_renormalized_and_from_the_text_without_them():
    # " A" and "ĠA" spell the same label; other tokens are left out before renormalizing.
    assert pairwise_answer(choice("A", {" A": 0.3, "ĠA": 0.1, "B": 0.2, "C": 0.4})) == pytest.approx(0.4 / 0.6)
    # Leading whitespace tokens are skipped: the verdict is at the answer's first real token.
    assert pairwise_answer(choice(" B", {" ": 0.9, "A": 0.1}, {"B": 0.75, "A": 0.25})) == pytest.approx(0.25)
    assert pairwise_answer(choice("Answer: B")) == 0.0 and pairwise_answer(choice("A.")) == 1.0
    assert (
        pairwise_answer(choice("A or B")) is None and pairwise_answer(choice("no idea", {"no": 0.9, "x": 0.1})) is None
    )
    # Pointwise: the expected value over the score labels.
    assert pointwise_answer(choice("8", {"8": 0.5, "6": 0.25, "x": 0.25})) == pytest.approx((8 * 0.5 + 6 * 0.25) / 0.75)
    # "10" spelled "1", "0": the answer went through "1", so the next position's P("0") splits P("1").
    assert pointwise_answer(choice("10", {"1": 0.6, "2": 0.4}, {"0": 0.5, "<eos>": 0.5})) == pytest.approx(
        (10 * 0.3 + 1 * 0.3 + 2 * 0.4) / 1.0
    )
    assert pointwise_answer(choice("Score: 7")) == 7.0
    assert pointwise_answer(choice("between 3 and 4")) is None and pointwise_answer(choice("")) is None


# -- the endpoint judge against the served tiny model ----------------------------------------------------------------


def test_pairwise_verdicts_from_top_logprobs_equal_the_local_judge_on_the_same_model(server, judge_model):
    model, tokenizer = judge_model
    served = endpoint_judge(server, kind="pairwise").judge_pairs(QUESTIONS, FIRSTS, SECONDS, PROMPT_IDS, "test")
    local = judge_pairs(model, tokenizer, QUESTIONS, FIRSTS, SECONDS)
    for got, want in zip(served, local, strict=True):
        assert got.first_better == pytest.approx(want.first_better, abs=1e-4) and got.consistent == want.consistent
    assert all(0 < j.first_better < 1 and j.first_better != 0.5 for j in served)  # probabilities, not hard A/B answers
    assert len(server.requests) == 2 * len(QUESTIONS)  # both orders
    body = server.requests[0]["body"]
    assert body["model"] == "tiny-judge" and body["temperature"] == 0.0 and body["max_tokens"] == 3
    assert body["logprobs"] is True and body["top_logprobs"] == VOCABULARY
    assert {r["authorization"] for r in server.requests} == {f"Bearer {KEY}"}


def test_pointwise_scores_are_the_expected_value_over_the_served_label_probabilities(server, judge_model):
    model, tokenizer = judge_model
    served = endpoint_judge(server).pointwise_scores(QUESTIONS, FIRSTS, PROMPT_IDS, "test")
    digit = {label: tokenizer.convert_tokens_to_ids(label) for label in [*SCORE_LABELS[:9], "0"]}
    for question, response, score in zip(QUESTIONS, FIRSTS, served, strict=True):
        prompt = render_judge_prompts(tokenizer, [POINTWISE_RUBRIC.format(prompt=question, response=response)])[0]
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            probabilities = model(torch.tensor([ids])).logits[0, -1].float().softmax(-1)
        weights = {int(label): float(probabilities[digit[label]]) for label in SCORE_LABELS[:9]}
        if int(probabilities.argmax()) == digit["1"]:  # the served answer starts with "1": "10" is split off it
            with torch.no_grad():
                then_zero = float(
                    model(torch.tensor([ids + [digit["1"]]])).logits[0, -1].float().softmax(-1)[digit["0"]]
                )
            weights[10], weights[1] = weights[1] * then_zero, weights[1] * (1 - then_zero)
        assert score == pytest.approx(sum(v * w for v, w in weights.items()) / sum(weights.values()), abs=1e-4)
        assert 1.0 <= score <= 10.0


def test_without_logprobs_the_verdict_is_read_from_the_text(server, judge_model):
    model, tokenizer = judge_model
    server.text_only = True
    served = endpoint_judge(server, kind="pairwise").judge_pairs(QUESTIONS, FIRSTS, SECONDS, PROMPT_IDS, "test")
    forward = [PAIRWISE_RUBRIC.format(prompt=q, first=a, second=b) for q, a, b in zip(QUESTIONS, FIRSTS, SECONDS)]
    swapped = [PAIRWISE_RUBRIC.format(prompt=q, first=b, second=a) for q, a, b in zip(QUESTIONS, FIRSTS, SECONDS)]
    says_a = (
        label_logprobs(model, tokenizer, render_judge_prompts(tokenizer, forward + swapped), ("A", "B")).argmax(-1) == 0
    )
    for index, judgement in enumerate(served):
        in_order, reversed_order = (
            float(says_a[index]),
            1.0 - float(says_a[len(QUESTIONS) + index]),
        )  # P(first better), hard
        assert judgement.first_better == (in_order + reversed_order) / 2 and judgement.consistent == (
            in_order == reversed_order
        )

    # A server that refuses `logprobs`: top_logprobs 0 asks for none and reads the text.
    server.requests.clear()
    scores = endpoint_judge(server, top_logprobs=0).pointwise_scores(QUESTIONS, FIRSTS, PROMPT_IDS, "test")
    assert all("logprobs" not in r["body"] and "top_logprobs" not in r["body"] for r in server.requests)
    contents = [POINTWISE_RUBRIC.format(prompt=q, response=r) for q, r in zip(QUESTIONS, FIRSTS)]
    best = label_logprobs(model, tokenizer, render_judge_prompts(tokenizer, contents), SCORE_LABELS).argmax(-1)
    assert scores == [float(SCORE_LABELS[int(i)]) for i in best]


def test_a_malformed_answer_is_unusable_not_a_failure_and_the_judge_never_asks_for_token_ids(server):
    server.faults += ["malformed"]  # the first request gets a 200 whose choice has no message
    scores = endpoint_judge(server, max_concurrency=1).pointwise_scores(QUESTIONS, FIRSTS, PROMPT_IDS, "test")
    assert scores[0] is None and all(score is not None for score in scores[1:])
    # The verdict is read from the labels' spelling: token ids would hide it, whatever the endpoint settings say.
    assert len(server.requests) == len(QUESTIONS)
    assert not any("return_tokens_as_token_ids" in request["body"] for request in server.requests)


# -- the judge stage through the endpoint: unusable answers, shards, timeouts and resume ----------------------------


def train_questions(dataset, count: int = 8) -> list[str]:
    return [json.loads(m)[-1]["content"] for m in read_split(dataset, "train")["messages"].head(count)]


def test_an_answer_with_no_verdict_is_counted_and_its_candidate_dropped(server, inputs, tmp_path):
    dataset, samples, student = inputs
    questions = train_questions(dataset)
    server.unusable_marker = f"Question: {questions[5]}\n"
    pairs = collect_preferences(
        feedback_config(server, "pairwise", max_unusable_share=0.5), dataset, samples, student, Store(tmp_path)
    )
    table = pd.read_parquet(f"{pairs.path}/candidates.parquet")
    nan_scores = [sum(math.isnan(s) for s in scores) for scores in table["scores"]]
    compared = [
        sum(text != texts[0] for text in texts) for texts in table["candidates"]
    ]  # candidates judged against the first
    assert nan_scores[5] == compared[5] > 0 and sum(nan_scores) == nan_scores[5]
    counts = pairs.counts
    assert counts["judge_unusable"] == compared[5] and counts["judge_verdicts"] == sum(compared)
    assert counts["judge_inconsistent"] + counts["judge_ties"] <= counts["judge_verdicts"] - counts["judge_unusable"]
    usable = counts["judge_verdicts"] - counts["judge_unusable"]
    assert pairs.judge_consistency == pytest.approx((usable - counts["judge_inconsistent"]) / usable)
    # The prompt whose comparisons were all unusable keeps only its first candidate: no pair.
    assert table["prompt_id"][5] not in set(pd.read_parquet(f"{pairs.path}/pairs.parquet")["prompt_id"])
    assert not any(KEY in p.read_bytes().decode("utf-8", "replace") for p in tmp_path.rglob("*") if p.is_file())


def test_too_many_unusable_verdicts_fail_the_stage_keeping_the_judged_shards(server, inputs, tmp_path):
    dataset, samples, student = inputs
    server.unusable_marker = ""  # every answer
    with pytest.raises(
        StillhouseError, match=r"100% of 24 judge verdicts \(24\) were unusable .* feedback.max_unusable_share \(50%\)"
    ):
        collect_preferences(feedback_config(server, max_unusable_share=0.5), dataset, samples, student, Store(tmp_path))
    [folder] = (tmp_path / "judge").iterdir()
    assert sorted(p.name for p in folder.iterdir()) == [
        judged_shard_name(0),
        judged_shard_name(1),
    ]  # no manifest, no pairs


@pytest.mark.slow
def test_a_judge_that_keeps_timing_out_fails_its_shard_and_a_rerun_judges_only_the_missing_ones(
    server, inputs, tmp_path
):
    dataset, samples, student = inputs
    questions = train_questions(dataset)
    config = feedback_config(server, max_concurrency=1, max_retries=1, timeout_seconds=1.0)
    server.stall_marker = f"Question: {questions[4]}\n"  # the first prompt of shard 1
    with pytest.raises(StillhouseError) as failure:
        collect_preferences(config, dataset, samples, student, Store(tmp_path / "interrupted"))
    message = str(failure.value)
    assert (
        f"judge shard 1 ({judged_shard_name(1)}) of 2" in message
        and "ReadTimeout" in message
        and "after 2 tries" in message
    )
    assert f"{server.url}/chat/completions" in message and "feedback.judge.openai.timeout_seconds" in message
    assert "1 finished shard(s) are kept" in message and KEY not in message
    stalled = Counter(
        r["body"]["messages"][-1]["content"]
        for r in server.requests
        if server.stall_marker in r["body"]["messages"][-1]["content"]
    )
    assert stalled and set(stalled.values()) == {
        2
    }  # each stalled request was tried twice (retried once), then given up
    [folder] = (tmp_path / "interrupted" / "judge").iterdir()
    assert sorted(p.name for p in folder.iterdir()) == [judged_shard_name(0)]
    finished = pd.read_parquet(folder / judged_shard_name(0))

    server.stall_marker = None
    server.release.set()
    server.requests.clear()
    resumed = collect_preferences(config, dataset, samples, student, Store(tmp_path / "interrupted"))
    asked = [r["body"]["messages"][-1]["content"] for r in server.requests]
    assert len(asked) == 4 * 3  # shard 1 only: 4 prompts, 3 candidates each
    assert not any(f"Question: {q}\n" in content for q in questions[:4] for content in asked)
    pd.testing.assert_frame_equal(pd.read_parquet(folder / judged_shard_name(0)), finished)  # kept as it was

    uninterrupted = collect_preferences(config, dataset, samples, student, Store(tmp_path / "uninterrupted"))
    assert resumed.fingerprint == uninterrupted.fingerprint and not resumed.cached
    assert resumed.pairs == uninterrupted.pairs and resumed.counts == uninterrupted.counts
    for name in ("candidates.parquet", "pairs.parquet"):
        pd.testing.assert_frame_equal(
            pd.read_parquet(f"{resumed.path}/{name}"), pd.read_parquet(f"{uninterrupted.path}/{name}")
        )
    assert collect_preferences(config, dataset, samples, student, Store(tmp_path / "interrupted")).cached


def test_a_served_judge_needs_the_served_model_name_and_needs_no_teacher_in_memory(pipeline_raw):
    from stillhouse.config import ConfigError, parse_config

    pipeline_raw["feedback"] = {
        "judge": {"kind": "pairwise", "engine": "openai", "openai": {"base_url": "http://127.0.0.1:9/v1"}}
    }
    with pytest.raises(
        ConfigError, match=r"feedback\.judge.*judge\.model is not set: name the model the server serves"
    ):
        parse_config(pipeline_raw)
    # With the name, a teacher that is itself only served is fine: nothing has to be loaded here.
    pipeline_raw["feedback"]["judge"]["model"] = "tiny-judge"
    pipeline_raw["sample"].update(
        engine="openai", teacher="tiny-teacher", openai={"tokenizer": pipeline_raw["sample"]["teacher"]}
    )
    pipeline_raw["train"].update(method="sft")
    assert parse_config(pipeline_raw).feedback.judge.engine == "openai"


def test_how_the_endpoint_is_reached_does_not_change_the_judged_pairs_fingerprint(server):
    from stillhouse.feedback.stage import judge_settings

    config = feedback_config(server)
    patient = feedback_config(server, timeout_seconds=600, max_retries=9, max_concurrency=64, api_key_env="OTHER_KEY")
    assert judge_settings(config) == judge_settings(patient)
    moved = feedback_config(server, base_url="http://127.0.0.1:1/v1")
    assert judge_settings(config) != judge_settings(moved)
    local = FeedbackConfig(judge={"kind": "pointwise"})
    assert judge_settings(local) == judge_settings(
        local.model_copy(update={"judge": local.judge.model_copy(update={"top_logprobs": 5})})
    )
