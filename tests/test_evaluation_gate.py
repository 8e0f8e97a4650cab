"""The promotion gate: thresholds, the champion comparison, and the whole register → gate path in MLflow."""

import json
from pathlib import Path

import pytest
from conftest import model_ref

from stillhouse.config import GateConfig
from stillhouse.evaluation.gate import check_candidate

CANDIDATE = {
    "student_exact_match": 0.6,
    "teacher_exact_match": 0.8,
    "kl_teacher_student": 0.4,
    "student_perplexity": 2.5,
    "student_exact_match/reverse": 0.5,
}


def test_a_candidate_within_every_threshold_passes():
    verdict = check_candidate(
        GateConfig(
            min_accuracy_ratio_to_teacher=0.75,
            max_kl=0.5,
            min={"student_exact_match/reverse": 0.5},
            max={"student_perplexity": 3},
        ),
        CANDIDATE,
    )
    assert verdict.passed and verdict.failures == [] and len(verdict.checks) == 5
    assert verdict.candidate_metrics["kl_teacher_student"] == 0.4 and verdict.champion_version is None


def test_each_failed_threshold_is_named_with_the_values():
    verdict = check_candidate(
        GateConfig(min_accuracy_ratio_to_teacher=0.9, max_kl=0.1, max={"student_perplexity": 2.0}), CANDIDATE
    )
    assert not verdict.passed
    assert verdict.failures == [
        "min_accuracy_ratio_to_teacher 0.9: student exact match 0.6 vs teacher 0.8 (needs >= 0.72)",
        "max_kl 0.1: kl_teacher_student is 0.4",
        "max.student_perplexity 2: student_perplexity is 2.5",
    ]


def test_a_metric_missing_from_the_report_fails_the_gate():
    verdict = check_candidate(GateConfig(min={"student_rouge_l_reference": 0.1}, must_beat_champion=False), CANDIDATE)
    assert not verdict.passed and "student_rouge_l_reference is missing" in verdict.failures[0]


def test_the_champion_comparison_knows_which_way_is_better():
    better = check_candidate(
        GateConfig(), CANDIDATE, champion={"student_exact_match": 0.55}, champion_version="3", candidate_version="4"
    )
    assert (
        better.passed
        and better.champion_metric == "student_exact_match"
        and better.champion_metrics == {"student_exact_match": 0.55}
    )
    worse = check_candidate(
        GateConfig(), CANDIDATE, champion={"student_exact_match": 0.7}, champion_version="3", candidate_version="4"
    )
    assert not worse.passed
    assert worse.failures == [
        "must_beat_champion on student_exact_match (higher is better, tolerance 0): "
        "candidate 0.6 vs champion version 3 0.7"
    ]
    assert check_candidate(
        GateConfig(champion_tolerance=0.1), CANDIDATE, champion={"student_exact_match": 0.7}, champion_version="3"
    ).passed
    # Perplexity is lower-is-better; MLflow's spelling of names ("/" as ".") is understood.
    lower = check_candidate(
        GateConfig(champion_metric="student_perplexity"),
        CANDIDATE,
        champion={"student_perplexity": 2.0},
        champion_version="3",
    )
    assert not lower.passed and "lower is better" in lower.failures[0]
    dotted = check_candidate(
        GateConfig(champion_metric="student_exact_match/reverse"),
        CANDIDATE,
        champion={"student_exact_match.reverse": 0.4},
        champion_version="3",
    )
    assert dotted.passed


def test_no_champion_the_same_version_or_a_disabled_gate_pass():
    assert check_candidate(GateConfig(), CANDIDATE).passed
    assert check_candidate(
        GateConfig(), CANDIDATE, champion={"student_exact_match": 0.9}, champion_version="2", candidate_version="2"
    ).passed
    assert check_candidate(GateConfig(enabled=False, max_kl=0.0), CANDIDATE).passed
    no_record = check_candidate(
        GateConfig(), CANDIDATE, champion={"other": 1.0}, champion_version="2", candidate_version="5"
    )
    assert not no_record.passed and "champion version 2 has no recorded student_exact_match" in no_record.failures[0]
    # Without references the default champion metric is the student's perplexity.
    assert (
        check_candidate(
            GateConfig(), {"student_perplexity": 3.0}, champion={"student_perplexity": 2.0}, champion_version="1"
        ).champion_metric
        == "student_perplexity"
    )


@pytest.mark.integration
def test_evaluate_register_gate_in_mlflow(prefect_harness, tmp_path, tiny_teacher, prompts_jsonl):
    """A perfect student becomes champion; a worse one is refused, keeps `candidate`, and the verdict is in MLflow."""
    import torch
    from conftest import build_tiny_model, curate_and_sample
    from mlflow.tracking import MlflowClient
    from prefect import flow
    from transformers import AutoModelForCausalLM

    from stillhouse.config import parse_config
    from stillhouse.refs import ModelRef
    from stillhouse.registry.tracking import start_pipeline_run
    from stillhouse.tasks.evaluate import evaluate_task
    from stillhouse.tasks.gate import gate_task
    from stillhouse.tasks.register import register_task

    _, dataset, samples = curate_and_sample(tmp_path / "store", tiny_teacher, prompts_jsonl)
    raw = {
        "name": "gate",
        "store": str(tmp_path / "store"),
        "curate": {"source": str(prompts_jsonl), "category_column": "task", "eval_fraction": 0.2},
        "sample": {"teacher": str(tiny_teacher), "max_new_tokens": 8, "top_k_logprobs": 4, "batch_size": 32},
        "train": {"architecture": {"hidden_size": 16, "num_layers": 2, "intermediate_size": 32, "num_heads": 2}},
        "evaluate": {
            "max_new_tokens": 8,
            "max_prompts": 12,
            "latency_prompts": 2,
            "gate": {"champion_metric": "kl_teacher_student", "max_kl": 5.0},
        },
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "gate"},
        "registry": {"model_name": "gated-student"},
    }
    config = parse_config(raw)

    def as_student(path: Path, name: str) -> ModelRef:
        return model_ref(path, name, loss_history=[{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}])

    @flow
    def evaluate_and_gate(student: ModelRef):
        tracking = start_pipeline_run(config, None)
        report = evaluate_task(config, dataset, samples, student, tracking)
        registered = register_task(config, student, report, tracking)
        return tracking, report, registered, gate_task(config, report, registered, tracking)

    # 1. The teacher itself as the student: KL ~0 (the stored top-k is float16), no champion yet: it passes and becomes
    # champion.
    tracking, report, registered, verdict = evaluate_and_gate(as_student(tiny_teacher, "teacher-copy"))
    client = MlflowClient(config.tracking.uri)
    assert verdict.passed and verdict.promoted and verdict.champion_version is None
    assert str(client.get_model_version_by_alias("gated-student", "champion").version) == registered.version

    # The report's files are in the stage folder and in MLflow, with the numbers MLflow holds.
    runs = {
        r.data.tags["stillhouse.stage"]: r
        for r in client.search_runs([tracking.experiment_id], f"tags.mlflow.parentRunId = '{tracking.parent_run_id}'")
    }
    logged = {a.path for a in client.list_artifacts(runs["evaluate"].info.run_id, "report")}
    assert {
        "report/report.md",
        "report/report.html",
        "report/loss_curve.png",
        "report/kl_by_position.png",
        "report/accuracy.png",
        "report/categories.png",
    } <= logged
    markdown = (Path(report.path) / "report" / "report.md").read_text()
    mlflow_metrics = runs["evaluate"].data.metrics
    assert (
        f"{mlflow_metrics['student_perplexity']:.3f}" in markdown
        and f"{mlflow_metrics['kl_teacher_student']:.4f}" in markdown
    )
    assert f"{mlflow_metrics['teacher_parameters']:,.0f}" in markdown and "exact match · reverse" in markdown
    assert runs["gate"].data.tags["stillhouse.gate"] == "passed" and runs["gate"].data.metrics["gate_passed"] == 1.0

    # 2. Another random model: its KL to the teacher is far above the champion's, so it is refused.
    worse = build_tiny_model(tmp_path / "worse", hidden_size=16, seed=5)
    model = AutoModelForCausalLM.from_pretrained(worse)
    with (
        torch.no_grad()
    ):  # random weights give near-uniform, teacher-like outputs; scaled up they are confidently different
        model.model.embed_tokens.weight.mul_(30)
    model.save_pretrained(worse)
    tracking, report, registered, verdict = evaluate_and_gate(as_student(worse, "random"))
    champion = client.get_model_version_by_alias("gated-student", "champion")
    assert not verdict.passed and not verdict.promoted and str(champion.version) != registered.version
    assert str(client.get_model_version_by_alias("gated-student", "candidate").version) == registered.version
    [failure] = verdict.failures
    assert (
        failure.startswith("must_beat_champion on kl_teacher_student (lower is better")
        and f"vs champion version {champion.version} " in failure
    )
    gate_run = client.search_runs(
        [tracking.experiment_id],
        f"tags.mlflow.parentRunId = '{tracking.parent_run_id}' and tags.`stillhouse.stage` = 'gate'",
    )[0]
    assert gate_run.data.tags["stillhouse.gate"] == "failed" and gate_run.data.tags[
        "stillhouse.champion_version"
    ] == str(champion.version)
    assert (
        gate_run.data.metrics["champion.kl_teacher_student"]
        < 0.01
        < gate_run.data.metrics["candidate.kl_teacher_student"]
    )
    saved = json.loads(
        Path(client.download_artifacts(gate_run.info.run_id, "gate_verdict.json", str(tmp_path))).read_text()
    )
    assert saved["failures"] == verdict.failures
    assert client.get_run(tracking.parent_run_id).data.tags["stillhouse.gate"] == "failed"
    assert client.get_model_version("gated-student", registered.version).tags["stillhouse.gate"] == "failed"


def test_the_default_floor_keeps_a_student_that_learned_nothing_from_becoming_champion():
    untrained = {"student_exact_match": 0.013, "teacher_exact_match": 0.76, "kl_teacher_student": 3.1}
    verdict = check_candidate(GateConfig(), untrained)
    assert not verdict.passed
    assert verdict.failures == [
        "default floor (evaluate.gate.default_floor): student exact match 0.013 vs teacher 0.76 (needs >= 0.38, "
        "half the teacher's; set evaluate.gate.min_accuracy_ratio_to_teacher to choose)"
    ]
    assert check_candidate(GateConfig(), {**untrained, "student_exact_match": 0.5}).passed
    # Without references, the KL floor; with an explicit threshold or the floor off, no default.
    assert (
        check_candidate(GateConfig(), {"kl_teacher_student": 3.1})
        .failures[0]
        .startswith("default floor (evaluate.gate.default_floor): kl_teacher_student is 3.1 (needs <= 2")
    )
    assert check_candidate(GateConfig(), {"kl_teacher_student": 0.4}).passed
    assert check_candidate(GateConfig(min_accuracy_ratio_to_teacher=0.01), untrained).passed
    assert check_candidate(GateConfig(default_floor=False), untrained).passed
    # A teacher that gets nothing right gives no ratio to hold the student to.
    assert check_candidate(GateConfig(), {"student_exact_match": 0.0, "teacher_exact_match": 0.0}).passed


@pytest.mark.slow
def test_a_first_version_below_the_floor_is_registered_not_promoted_and_the_console_says_so(tmp_path):
    """As a user meets it: `stillhouse run` in a subprocess, the demo teacher (99.5% exact match), a 2-step student."""
    import subprocess
    import sys

    import yaml
    from mlflow.tracking import MlflowClient

    config = yaml.safe_load((Path(__file__).parents[1] / "configs" / "demo.yaml").read_text())
    config.update(
        store=str(tmp_path / "store"), tracking={"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "floor"}
    )
    config["curate"].update(demo_rows=400, eval_fraction=0.1)
    config["train"].update(max_steps=2, logging_steps=1)
    config["evaluate"].update(latency_prompts=1)
    path = tmp_path / "floor.yaml"
    path.write_text(yaml.safe_dump(config))
    completed = subprocess.run(
        [sys.executable, "-m", "stillhouse.flows.cli", "run", str(path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
        env={**__import__("os").environ, "COLUMNS": "200"},
    )
    assert completed.returncode == 3, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "default floor (evaluate.gate.default_floor)" in completed.stdout
    assert "stays @candidate and was not published" in completed.stdout
    # Not a terminal: no progress-bar rewrites, and no library deprecation noise.
    assert "\r" not in completed.stdout + completed.stderr
    assert "FutureWarning" not in completed.stderr
    client = MlflowClient(config["tracking"]["uri"])
    (version,) = client.search_model_versions("name='stillhouse-demo-student'")
    assert version.tags["stillhouse.gate"] == "failed"
    registered = client.get_registered_model("stillhouse-demo-student")
    assert registered.aliases == {"candidate": version.version}, "registered, but no @champion"
