"""The evaluation stage end to end on tiny models: every metric group, a baseline, benchmarks and the report."""

import math

import pytest
from conftest import build_tiny_model, curate_and_sample
from conftest import model_ref as shared_model_ref

from stillhouse.config import EvaluateConfig, LmEvalConfig
from stillhouse.errors import InputError
from stillhouse.evaluation.lm_eval_adapter import lm_eval_available
from stillhouse.evaluation.stage import evaluate_student, report_files


@pytest.fixture(scope="module")
def sampled(tmp_path_factory, tiny_teacher, prompts_jsonl):
    return curate_and_sample(tmp_path_factory.mktemp("store"), tiny_teacher, prompts_jsonl)


def model_ref(path, name: str):
    return shared_model_ref(path, name, loss_history=[{"step": 5, "loss": 2.0}, {"step": 10, "loss": 1.5}])


def test_every_metric_group_with_a_baseline(sampled, tiny_teacher, tmp_path):
    store, dataset, samples = sampled
    baseline = build_tiny_model(tmp_path / "baseline", hidden_size=16, seed=3)
    config = EvaluateConfig(max_new_tokens=8, max_prompts=10, latency_prompts=2, baseline=str(baseline))
    report = evaluate_student(config, dataset, samples, model_ref(tiny_teacher, "teacher-copy"), store)
    metrics = report.metrics
    for role in ("teacher", "student", "baseline"):
        for name in (
            "perplexity",
            "reference_perplexity",
            "exact_match",
            "rouge_l_reference",
            "tokens_per_second",
            "latency_seconds",
            "size_mb",
            "parameters",
        ):
            assert f"{role}_{name}" in metrics, f"{role}_{name}"
    # The teacher measured as the student: its own answers, the same size and perplexities.
    assert metrics["student_rouge_l_teacher"] == 1.0 and metrics["student_teacher_agreement"] == 1.0
    assert metrics["student_top1_agreement"] > 0.99 and metrics["kl_teacher_student"] < 1e-3
    assert metrics["size_ratio"] == 1.0 and metrics["student_reference_perplexity"] == pytest.approx(
        metrics["teacher_reference_perplexity"]
    )
    assert metrics["baseline_size_mb"] < metrics["teacher_size_mb"] and "kl_teacher_baseline" in metrics
    assert all(math.isfinite(value) for value in metrics.values())
    assert {p.name for p in report_files(report)} >= {
        "report.md",
        "report.html",
        "loss_curve.png",
        "kl_by_position.png",
        "accuracy.png",
    }
    assert (
        "| metric | teacher | student | baseline | student / teacher |"
        in (report_files(report)[0].parent / "report.md").read_text()
    )


def test_a_baseline_model_ref_is_evaluated_as_role_baseline(sampled, tiny_teacher):
    store, dataset, samples = sampled
    config = EvaluateConfig(max_new_tokens=4, max_prompts=5, metrics=["perplexity"], report=False)
    report = evaluate_student(
        config,
        dataset,
        samples,
        model_ref(tiny_teacher, "teacher-copy"),
        store,
        baseline=model_ref(tiny_teacher, "sft"),
    )
    assert report.metrics["baseline_perplexity"] == pytest.approx(report.metrics["student_perplexity"])
    assert (
        report.fingerprint
        != evaluate_student(config, dataset, samples, model_ref(tiny_teacher, "teacher-copy"), store).fingerprint
    )


def test_only_the_chosen_groups_are_computed(sampled, tiny_teacher):
    store, dataset, samples = sampled
    report = evaluate_student(
        EvaluateConfig(max_new_tokens=4, max_prompts=5, metrics=["kl", "win_rate"], report=False),
        dataset,
        samples,
        model_ref(tiny_teacher, "teacher-copy"),
        store,
    )
    assert set(report.metrics) == {
        "kl_teacher_student",
        "teacher_parameters",
        "student_parameters",
        "parameter_ratio",
        "student_win_rate",
        "student_win_rate_low",
        "student_win_rate_high",
    }
    # The student's answers are the teacher's: the judge sees the same text both orders, so each pair is a tie (counted
    # half).
    assert (
        report.metrics["student_win_rate"] == 0.5
        and report.metrics["student_win_rate_low"] < 0.5 < report.metrics["student_win_rate_high"]
    )
    assert report_files(report) == []


def test_the_verifier_win_rate_counts_right_over_wrong_as_a_win_and_equal_outcomes_as_ties():
    from stillhouse.evaluation.evaluate import judged_win_rates

    references = ["a", "b", "c", "d"]
    answers = {"teacher": ["a", "b", "c", "d"], "student": ["a", "b", "c", "x"], "baseline": ["a", "x", "x", "x"]}
    rates = judged_win_rates(EvaluateConfig(win_rate_judge="verifier"), "unused", [[]] * 4, answers, references)
    # Against the teacher: three ties and one loss; against the baseline: one tie, two wins, one tie (both wrong).
    assert rates["student_win_rate"] == pytest.approx(1.5 / 4) and rates["baseline_win_rate"] == pytest.approx(0.5 / 4)
    assert rates["student_win_rate_vs_baseline"] == pytest.approx(3 / 4)
    assert rates["student_win_rate_vs_baseline_low"] < 0.75 < rates["student_win_rate_vs_baseline_high"]


def test_the_win_rate_against_a_baseline_is_in_the_report(sampled, tiny_teacher):
    store, dataset, samples = sampled
    config = EvaluateConfig(
        max_new_tokens=4, max_prompts=5, metrics=["win_rate"], win_rate_judge="verifier", report=False
    )
    report = evaluate_student(
        config,
        dataset,
        samples,
        model_ref(tiny_teacher, "teacher-copy"),
        store,
        baseline=model_ref(tiny_teacher, "sft"),
    )
    assert report.metrics["student_win_rate_vs_baseline"] == 0.5  # the same model: every prompt a tie
    with pytest.raises(InputError, match="win_rate_judge: `verifier` judges by reference answers"):
        evaluate_student(
            config, dataset.model_copy(update={"has_references": False}), samples, model_ref(tiny_teacher, "x"), store
        )


def test_an_empty_eval_split_is_refused_before_loading_models(sampled, tiny_teacher):
    store, dataset, samples = sampled
    with pytest.raises(InputError, match="eval split has no rows"):
        evaluate_student(
            EvaluateConfig(), dataset.model_copy(update={"eval_rows": 0}), samples, model_ref(tiny_teacher, "x"), store
        )
    with pytest.raises(InputError, match="need reference answers"):
        evaluate_student(
            EvaluateConfig(metrics=["exact_match"]),
            dataset.model_copy(update={"has_references": False}),
            samples,
            model_ref(tiny_teacher, "x"),
            store,
        )


@pytest.mark.slow
@pytest.mark.skipif(
    not lm_eval_available(), reason="lm-evaluation-harness is not installed (pip install 'stillhouse[eval]')"
)
def test_lm_eval_results_join_the_metrics(sampled, tiny_teacher, tmp_path, monkeypatch):
    from test_evaluation_lm_eval import TASK_YAML

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "tiny.jsonl"
    data.write_text('{"question": "reverse: ab", "choices": ["ba", "ab"], "answer": 0}\n')
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny.yaml").write_text(TASK_YAML.format(data=data))
    store, dataset, samples = sampled
    config = EvaluateConfig(
        max_new_tokens=4,
        max_prompts=5,
        metrics=["perplexity"],
        lm_eval=LmEvalConfig(tasks=["stillhouse_tiny_choice"], include_path=str(tmp_path / "tasks"), roles=["student"]),
    )
    metrics = evaluate_student(config, dataset, samples, model_ref(tiny_teacher, "teacher-copy"), store).metrics
    assert (
        metrics["student_lm_eval/stillhouse_tiny_choice/acc"] in {0.0, 1.0}
        and "teacher_lm_eval/stillhouse_tiny_choice/acc" not in metrics
    )
