"""The model card: the method line says what was really done, and the evaluation table is the terminal's.

.venv/bin/python -m pytest tests/test_card.py -q
"""

import copy

import pytest

from stillhouse.config import PipelineConfig
from stillhouse.evaluation.report import comparison_rows
from stillhouse.licenses import LicenseCheck
from stillhouse.public_names import check_public_names, public_names
from stillhouse.refs import DatasetRef, EvalReport, ModelRef, SamplesRef
from stillhouse.registry.card import distillation_method, evaluation_rows, method_description, model_card

BASE = {
    "name": "card",
    "curate": {"source": "prompts.jsonl"},
    "sample": {"teacher": "org/teacher", "top_k_logprobs": 16},
    "train": {"student": "org/student", "method": "kd"},
    "registry": {"model_name": "card-student"},
}
SFT_LINE = "black-box distillation: SFT (cross-entropy) on the teacher's responses"


def config(**sections) -> PipelineConfig:
    """BASE with the given sections' fields replaced (one level deep: `train={"kd": {...}}` replaces train.kd)."""
    raw = copy.deepcopy(BASE)
    for name, fields in sections.items():
        raw[name] = {**raw.get(name, {}), **fields}
    return PipelineConfig.model_validate(raw)


def kd_line(**kd) -> str:
    """The method line of a `kd` run with these train.kd fields."""
    return method_description(config(train={"method": "kd", "kd": kd}))


def test_sft_is_black_box_on_the_teachers_responses():
    assert method_description(config(train={"method": "sft"})) == SFT_LINE


def test_offline_forward_kl_names_the_stored_top_k_the_tail_tau_and_the_weights():
    assert method_description(config(train={"method": "kd", "kd_weight": 1.0, "ce_weight": 0.5})) == (
        "white-box distillation: forward KL(teacher‖student) to the teacher's top-16 log-probs stored by the "
        "sample stage, the rest of the teacher's mass as one extra outcome (tail: bucket), temperature τ = 1, "
        "loss = 1 × divergence + 0.5 × cross-entropy on the teacher's responses"
    )


def test_reverse_kl_with_a_dense_online_teacher_has_no_tail_and_its_own_tau():
    line = kd_line(kind="reverse_kl", teacher="online", temperature=2.0)
    assert line.startswith(
        "white-box distillation: reverse KL(student‖teacher) to the online teacher's full distribution (in memory)"
    )
    assert "temperature τ = 2" in line
    assert "tail" not in line and "top-16" not in line  # the stored top-k was not used
    assert "λ" not in line


def test_jsd_with_an_online_top_k_names_beta_k_and_the_renormalized_tail():
    line = kd_line(kind="jsd", beta=0.9, teacher="online", online_top_k=8, tail="renormalize")
    assert "generalized JSD (β = 0.9) to the online teacher's top-8 log-probs (in memory)" in line
    assert "both distributions renormalized over the top-k ids (tail: renormalize)" in line


@pytest.mark.parametrize(
    ("kind", "named"),
    [
        ("skew_forward_kl", "skew forward KL (α = 0.2)"),
        ("skew_reverse_kl", "skew reverse KL (α = 0.2)"),
        ("tvd", "total variation distance"),
    ],
)
def test_every_divergence_is_named(kind, named):
    assert f"white-box distillation: {named} to " in kd_line(kind=kind, alpha=0.2)


def test_gkd_names_lambda_and_the_rollouts():
    line = kd_line(kind="jsd", teacher="online", lmbda=0.5, rollout_max_new_tokens=32, rollout_temperature=0.7)
    assert line.startswith(
        "on-policy distillation (GKD): generalized JSD (β = 0.5) to the online teacher's full distribution"
    )
    assert (
        "on a λ = 0.5 share of batches the student's own samples instead (at most 32 new tokens at "
        "temperature 0.7), scored by the teacher without cross-entropy"
    ) in line


def test_a_served_teacher_is_named_as_such():
    served = {
        "teacher": "served-model",
        "engine": "openai",
        "top_k_logprobs": 5,
        "openai": {"tokenizer": "org/teacher"},
    }
    line = method_description(config(sample=served))
    assert "to the served teacher's top-5 log-probs stored by the sample stage (sample.engine openai)" in line
    assert "(tail: bucket)" in line


def test_a_weight_of_zero_drops_its_term():
    line = method_description(config(train={"method": "kd", "ce_weight": 0.0, "kd_weight": 2.0}))
    assert "loss = 2 × divergence on the teacher's responses" in line and "cross-entropy" not in line


def test_the_feedback_stage_is_appended():
    dpo = method_description(
        config(feedback={"method": "dpo", "beta": 0.2, "candidates": 6, "judge": {"kind": "verifier"}})
    )
    assert dpo.endswith("; then DPO (β = 0.2) on the judged best and worst of 6 candidates per prompt (verifier judge)")
    rpo = method_description(config(feedback={"method": "dpo", "sft_weight": 0.3}))
    assert rpo.endswith(", plus 0.3 × the chosen responses' NLL (RPO)")
    best_of_n = {"method": "best_of_n", "include_teacher": True}
    best = method_description(config(train={"method": "sft"}, feedback=best_of_n))
    assert best == f"{SFT_LINE}; then best-of-n: SFT on the judged best of 5 candidates per prompt (pointwise judge)"


def test_the_short_tag_is_unchanged():
    assert distillation_method(config(train={"method": "sft"})) == "sft"
    assert distillation_method(config()) == "kd"
    assert distillation_method(config(train={"method": "kd", "kd": {"teacher": "online", "lmbda": 0.5}})) == "gkd"
    assert distillation_method(config(feedback={"method": "dpo"})) == "kd+dpo"


METRICS = {
    "teacher_exact_match": 0.9,
    "student_exact_match": 0.5,
    "baseline_exact_match": 0.1,
    "student_perplexity": 3.2,
    "kl_teacher_student": 0.25,
    "baseline_tokens_per_second": 40.0,
    "teacher_parameters": 1000.0,
    "student_parameters": 250.0,
    "parameter_ratio": 0.25,
}


def test_the_evaluation_table_uses_the_terminal_tables_labels():
    header, rows = comparison_rows(METRICS)
    student, teacher = header.index("student"), header.index("teacher")
    expected = {
        row[0].replace("<", "&lt;").replace(">", "&gt;"): (row[teacher] or "–", row[student] or "–")
        for row in rows
        if row[teacher] or row[student]
    }
    cells = [line.removeprefix("| ").removesuffix(" |").split(" | ") for line in evaluation_rows(METRICS)]
    assert {label: tuple(values) for label, *values in cells} == expected
    assert len(cells) == 4  # exact match, KL, perplexity, parameters; the baseline-only speed row is left out


def card_refs() -> tuple[DatasetRef, SamplesRef, ModelRef, EvalReport]:
    common = {"path": "/x", "cached": True}
    dataset = DatasetRef(
        stage="curate", fingerprint="d" * 16, train_rows=96, eval_rows=24, has_references=True, counts={}, **common
    )
    samples = SamplesRef(
        stage="sample",
        fingerprint="s" * 16,
        rows=120,
        teacher="t",
        teacher_revision="abc",
        tokenizer_fingerprint="tok",
        top_k_logprobs=16,
        generated_tokens=960,
        **common,
    )
    student = ModelRef(
        stage="train",
        fingerprint="m" * 16,
        model_path="/x",
        parameters=250,
        train_seconds=3.0,
        final_loss=1.0,
        **common,
    )
    report = EvalReport(stage="evaluate", fingerprint="e" * 16, metrics=METRICS, **common)
    return dataset, samples, student, report


def test_the_card_carries_the_method_line_the_short_tag_and_the_table():
    pipeline = config(
        train={"method": "kd", "kd": {"kind": "reverse_kl", "teacher": "online"}}, feedback={"method": "dpo"}
    )
    check = LicenseCheck("apache-2.0", "apache-2.0", "apache-2.0")
    card = model_card(pipeline, *card_refs(), check, {})

    assert f"| method | {method_description(pipeline)} |" in card.content
    assert card.data.stillhouse["method"] == "kd+dpo" and {"kd", "dpo", "distillation-kd"} <= set(card.data.tags)
    for line in evaluation_rows(METRICS):
        assert line in card.content


def test_hub_ids_name_themselves_and_fill_the_metadata():
    pipeline = config(curate={"source": "HuggingFaceH4/ultrachat_200k"}, publish={"repo_id": "alice/student"})
    check_public_names(pipeline)  # Hub ids are public: nothing to set
    card = model_card(pipeline, *card_refs(), LicenseCheck("apache-2.0", "apache-2.0", "apache-2.0"), {})
    assert card.data.base_model == "org/student" and card.data.datasets == ["HuggingFaceH4/ultrachat_200k"]
    assert "from the teacher **org/teacher**" in card.content and "fine-tuned from org/student" in card.content


def test_the_demo_teacher_and_task_are_public_as_the_projects_demo():
    pipeline = config(
        curate={"source": "builtin:demo"},
        sample={"teacher": "builtin:demo-teacher"},
        train={
            "student": None,
            "architecture": {"hidden_size": 16, "num_layers": 2, "intermediate_size": 32, "num_heads": 2},
        },
        publish={"repo_id": "alice/demo-student"},
    )
    check_public_names(pipeline)  # the project's own demo needs no publish.*_name
    names = public_names(pipeline)
    assert names.teacher == "the Stillhouse demo teacher (builtin:demo-teacher)" and names.base_model is None
    card = model_card(pipeline, *card_refs(), LicenseCheck("apache-2.0", "apache-2.0", None), {})
    assert "from the teacher **the Stillhouse demo teacher (builtin:demo-teacher)**" in card.content
    assert "| data | the Stillhouse demo task (builtin:demo) |" in card.content
    assert card.data.datasets is None and card.data.base_model is None  # nothing on the Hub to link


def test_a_publish_only_run_is_named_beside_the_training_run():
    lineage = {"mlflow_run_id": "trained-run", "mlflow_publish_run_id": "publish-run"}
    card = model_card(config(), *card_refs(), LicenseCheck("apache-2.0", "apache-2.0", "apache-2.0"), lineage)
    assert "Trained in MLflow run\n`trained-run`" in card.content
    assert "; published from MLflow run `publish-run`" in card.content and card.data.stillhouse["mlflow_run_id"] == (
        "trained-run"
    )
    same = model_card(
        config(),
        *card_refs(),
        LicenseCheck("apache-2.0", "apache-2.0", "apache-2.0"),
        {"mlflow_run_id": "one-run", "mlflow_publish_run_id": "one-run"},
    )
    assert "published from" not in same.content
