"""Feedback-guided pieces: verdicts from log-probs, position-swap consistency, pairs, and DPO."""

import math

import pytest
import torch
from conftest import build_tiny_model
from transformers import AutoModelForCausalLM

from stillhouse.feedback.judge import (
    PairJudgement,
    judge_pairs,
    label_logprobs,
    parse_verdict,
    pointwise_scores,
    render_judge_prompts,
    verifier_scores,
)
from stillhouse.feedback.pairs import build_pairs
from stillhouse.models import load_tokenizer
from stillhouse.training.dpo import dpo_loss, train_dpo


@pytest.fixture(scope="module")
def judge(tiny_teacher):
    return AutoModelForCausalLM.from_pretrained(tiny_teacher).eval(), load_tokenizer(str(tiny_teacher))


def test_label_logprobs_equal_a_direct_forward_pass(judge):
    model, tokenizer = judge
    prompt = render_judge_prompts(tokenizer, ["Which is better?"])[0]
    scores = label_logprobs(model, tokenizer, [prompt], ["A", "10"])
    ids = tokenizer(prompt + "10", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logprobs = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    n = len(ids)
    expected_10 = logprobs[n - 3, ids[n - 2]] + logprobs[n - 2, ids[n - 1]]  # "1" then "0", each one character
    torch.testing.assert_close(scores[0, 1], expected_10, atol=1e-5, rtol=1e-5)


def test_both_orders_are_judged_and_averaged(judge):
    model, tokenizer = judge
    judgements = judge_pairs(model, tokenizer, ["sort letters: cba"] * 2, ["abc", "xyz"], ["xyz", "abc"])
    # Swapping the responses swaps the verdict: P(first better) of the two rows sum to 1.
    assert judgements[0].first_better + judgements[1].first_better == pytest.approx(1.0, abs=1e-5)
    assert judgements[0].consistent == judgements[1].consistent


def test_verdicts_respect_consistency_and_ties():
    assert PairJudgement(0.9, True).verdict(tie_margin=0.05) == "first"
    assert PairJudgement(0.2, True).verdict(tie_margin=0.05) == "second"
    assert PairJudgement(0.52, True).verdict(tie_margin=0.05) is None
    assert PairJudgement(0.9, False).verdict(tie_margin=0.05) is None
    assert parse_verdict("B") == "B" and parse_verdict("Answer: A.") == "A"
    assert parse_verdict("A or B") is None and parse_verdict("neither") is None


def test_pointwise_scores_are_expected_values_and_the_verifier_matches_references(judge):
    model, tokenizer = judge
    scores = pointwise_scores(model, tokenizer, ["reverse: abc"] * 2, ["cba", "abc"])
    assert all(1.0 <= score <= 10.0 for score in scores)
    assert verifier_scores([" cba", "abc"], ["cba", "cba"]) == [1.0, 0.0]


def test_pairs_take_best_and_worst_with_a_margin_and_drop_identical_responses():
    pairs, dropped = build_pairs(
        ["p1", "p2", "p3", "p4"],
        [["a", "b", "c"], ["same", "same"], ["x", "y"], ["u", "v"]],
        [[0.2, 0.9, 0.5], [0.1, 0.8], [0.50, 0.55], [1.0, 0.0]],
        min_margin=0.1,
    )
    assert [(p["prompt_id"], p["chosen"], p["rejected"]) for p in pairs] == [("p1", "b", "a"), ("p4", "u", "v")]
    assert pairs[0]["margin"] == pytest.approx(0.7)
    assert dropped == {"dropped_single_distinct_response": 1, "dropped_small_margin": 1}


def test_dpo_loss_formula():
    chosen, rejected = torch.tensor([-3.0, -1.0]), torch.tensor([-2.0, -4.0])
    reference_chosen, reference_rejected = torch.tensor([-3.5, -1.0]), torch.tensor([-2.0, -3.0])
    margins = torch.tensor([0.5 - 0.0, 0.0 - (-1.0)])
    expected = -torch.log(torch.sigmoid(0.2 * margins)).mean()
    torch.testing.assert_close(dpo_loss(chosen, rejected, reference_chosen, reference_rejected, beta=0.2), expected)
    assert dpo_loss(chosen, rejected, chosen, rejected) == pytest.approx(math.log(2))


@pytest.mark.slow
def test_trl_dpo_starts_at_log_2_and_learns_the_preference(tmp_path):
    student = build_tiny_model(tmp_path / "student", hidden_size=16)
    pairs = [
        {"prompt": [{"role": "user", "content": f"reverse: {word}"}], "chosen": word[::-1], "rejected": word}
        for word in ["abc", "dog", "kite", "moon", "star", "tree", "fish", "lamp"]
    ]
    result = train_dpo(
        str(student), pairs, tmp_path / "dpo", beta=0.1, learning_rate=5e-3, max_steps=30, batch_size=8, logging_steps=1
    )
    history = result["history"]
    # At step 1 the policy is the reference, so the sigmoid DPO loss is exactly log 2 (see dpo_loss).
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert history[-1]["loss"] < 0.6 and history[-1]["rewards/margins"] > 0 and history[-1]["rewards/accuracies"] > 0.5
    assert (tmp_path / "dpo" / "model" / "model.safetensors").is_file()


def test_win_rate_counts_ties_half_and_has_a_wilson_interval():
    from stillhouse.feedback.judge import win_rate

    judgements = [PairJudgement(0.9, True)] * 6 + [PairJudgement(0.1, True)] * 2 + [PairJudgement(0.9, False)] * 2
    result = win_rate(judgements)
    assert result.rate == pytest.approx(0.7) and result.pairs == 10
    # Wilson 95% interval for 7/10: (0.3968, 0.8922).
    assert result.low == pytest.approx(0.3968, abs=1e-3) and result.high == pytest.approx(0.8922, abs=1e-3)
    assert math.isnan(win_rate([]).rate)


@pytest.mark.slow
@pytest.mark.parametrize(
    "judge, method",
    [({"kind": "verifier"}, "dpo"), ({"kind": "pointwise"}, "best_of_n"), ({"kind": "pairwise"}, "dpo")],
)
def test_judged_pairs_then_training_from_an_sft_student(tmp_path, tiny_teacher, prompts_jsonl, judge, method):
    from conftest import curate_and_sample

    from stillhouse.config import FeedbackConfig, TrainConfig
    from stillhouse.feedback.stage import collect_preferences, read_pairs, train_on_feedback
    from stillhouse.training.stage import train_student

    store, dataset, samples = curate_and_sample(tmp_path / "store", tiny_teacher, prompts_jsonl)
    sft = train_student(
        TrainConfig(
            architecture={"hidden_size": 16, "num_layers": 2, "intermediate_size": 32, "num_heads": 2},
            max_steps=5,
            batch_size=8,
        ),
        dataset,
        samples,
        store,
    )
    config = FeedbackConfig(
        method=method,
        candidates=3,
        max_new_tokens=6,
        max_prompts=12,
        judge=judge,
        min_margin=0.0,
        max_steps=3,
        batch_size=4,
        max_unusable_share=1.0,
        include_teacher=True,
    )
    pairs = collect_preferences(config, dataset, samples, sft, store)
    table = read_pairs(pairs)
    assert len(table) == pairs.pairs and (table["chosen"] != table["rejected"]).all()
    assert pairs.counts["prompts"] == 12
    if judge["kind"] == "pairwise":
        assert 0 <= pairs.judge_consistency <= 1
    assert pairs.pairs > 0
    student = train_on_feedback(config, dataset, pairs, sft, store)
    assert AutoModelForCausalLM.from_pretrained(student.model_path).num_parameters() == sft.parameters
    # Only the DPO settings change: the judged pairs are reused.
    changed = config.model_copy(update={"learning_rate": 1e-3})
    assert collect_preferences(changed, dataset, samples, sft, store).cached


@pytest.mark.slow
def test_sft_then_dpo_chain_runs_in_the_flow_and_logs_its_metrics(prefect_harness, pipeline_raw):
    from mlflow.tracking import MlflowClient

    from stillhouse.config import parse_config
    from stillhouse.flows.distill import distill

    pipeline_raw["train"].update(method="sft")
    pipeline_raw["feedback"] = {
        "judge": {"kind": "pointwise"},
        "candidates": 3,
        "include_teacher": True,
        "max_new_tokens": 6,
        "max_prompts": 16,
        "min_margin": 0.0,
        "max_unusable_share": 1.0,
        "max_steps": 4,
        "batch_size": 4,
    }
    config = parse_config(pipeline_raw)
    result = distill(config, until="evaluate")
    assert result.sft_student.stage == "train" and result.student.stage == "feedback" and result.pairs.pairs > 0
    assert result.report.metrics["student_parameters"] == result.sft_student.parameters
    client = MlflowClient(config.tracking.uri)
    children = client.search_runs([result.experiment_id], f"tags.mlflow.parentRunId = '{result.mlflow_run_id}'")
    by_stage = {run.data.tags["stillhouse.stage"]: run for run in children}
    assert {"judge", "feedback"} <= set(by_stage)
    assert by_stage["judge"].data.metrics["pairs"] == result.pairs.pairs
    assert by_stage["judge"].inputs.dataset_inputs[0].dataset.digest == result.pairs.fingerprint
    assert client.get_metric_history(by_stage["feedback"].info.run_id, "rewards_margins")

    # Only the DPO settings change: curation, sampling, the SFT student and the judged pairs are reused.
    pipeline_raw["feedback"]["beta"] = 0.2
    rerun = distill(parse_config(pipeline_raw), until="train")
    assert rerun.cached == {"curate": True, "sample": True, "train": True, "judge": True, "feedback": False}
