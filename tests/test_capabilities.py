"""Capability rules (served teacher, stored top-k, references): on plain facts, then through config validation."""

import pytest

from stillhouse import capabilities as c
from stillhouse.config import METRIC_NAMES, ConfigError, apply_overrides, metric_group, parse_config

# (rule, facts that break it, changes of one fact that each keep it, a field its message names)
RULES = [
    (
        c.online_teacher_problem,
        {"teacher_is_served": True, "method": "kd", "kd_teacher": "online"},
        [{"teacher_is_served": False}, {"method": "sft"}, {"kd_teacher": "offline"}],
        "train.kd.teacher",
    ),
    (
        c.kd_vocabulary_problem,
        {"teacher_tokenizer_known": False, "method": "kd"},
        [{"teacher_tokenizer_known": True}, {"method": "sft"}],
        "sample.openai.tokenizer",
    ),
    (
        c.served_kd_vocabulary_problem,
        {"teacher_tokenizer_known": False, "method": "kd", "kd_teacher": "served"},
        [{"teacher_tokenizer_known": True}, {"method": "sft"}, {"kd_teacher": "offline"}],
        "sample.openai.tokenizer",
    ),
    (
        c.served_kd_student_vocabulary_problem,
        {"method": "kd", "kd_teacher": "served", "difference": "1 student-only tokens (e.g. ['<tool>'])"},
        [{"difference": None}, {"method": "sft"}, {"kd_teacher": "offline"}],
        "train.student",
    ),
    (
        c.served_kd_prompt_logprobs_problem,
        {"url": "http://10.0.0.5:8000/v1", "problem": "answered without `prompt_logprobs`"},
        [{"problem": None}],
        "train.kd.teacher: offline",
    ),
    (
        c.vllm_gpu_problem,
        {
            "tensor_parallel_size": 2,
            "pipeline_parallel_size": 2,
            "replicas": 2,
            "gpus_available": 4,
            "where": "this machine (torch.cuda.device_count())",
        },
        [{"gpus_available": 8}, {"replicas": 1}, {"tensor_parallel_size": 1}, {"pipeline_parallel_size": 1}],
        "sample.vllm.replicas",
    ),
    (
        c.student_from_scratch_problem,
        {"teacher_tokenizer_known": False, "student_from_scratch": True},
        [{"teacher_tokenizer_known": True}, {"student_from_scratch": False}],
        "train.student",
    ),
    (
        c.offline_kd_top_k_problem,
        {"method": "kd", "kd_teacher": "offline", "top_k_stored": False},
        [{"method": "sft"}, {"kd_teacher": "online"}, {"top_k_stored": True}],
        "sample.top_k_logprobs",
    ),
    (
        c.feedback_judge_problem,
        {"teacher_is_served": True, "judge_kind": "pointwise", "judge_model": None},
        [{"teacher_is_served": False}, {"judge_kind": "verifier"}, {"judge_model": "org/judge"}],
        "feedback.judge.model",
    ),
    (
        c.win_rate_judge_problem,
        {
            "teacher_is_served": True,
            "listed_metric_groups": ["exact_match", "win_rate"],
            "win_rate_judge": "model",
            "judge_model": None,
        },
        [
            {"teacher_is_served": False},
            {"listed_metric_groups": []},
            {"win_rate_judge": "verifier"},
            {"judge_model": "org/judge"},
        ],
        "evaluate.judge_model",
    ),
    (
        c.lm_eval_teacher_problem,
        {"teacher_is_served": True, "lm_eval_roles": ["teacher", "student"]},
        [{"teacher_is_served": False}, {"lm_eval_roles": ["student"]}, {"lm_eval_roles": []}],
        "evaluate.lm_eval.roles",
    ),
    (
        c.teacher_weight_gate_problem,
        {"teacher_is_served": True, "gate_metric_names": ["student_exact_match", "speed_ratio"]},
        [{"teacher_is_served": False}, {"gate_metric_names": ["student_exact_match", "kl_teacher_student"]}],
        "evaluate.gate",
    ),
    (
        c.reference_metrics_problem,
        {"listed_metric_groups": ["perplexity", "rouge_l_reference"], "has_references": False},
        [
            {"has_references": True},
            {"listed_metric_groups": ["perplexity", "rouge_l_teacher"]},
            {"listed_metric_groups": []},
        ],
        "curate.reference_column",
    ),
    (
        c.verifier_win_rate_problem,
        {"listed_metric_groups": ["win_rate"], "win_rate_judge": "verifier", "has_references": False},
        [{"has_references": True}, {"win_rate_judge": "model"}, {"listed_metric_groups": ["exact_match"]}],
        "curate.reference_column",
    ),
    (
        c.kl_top_k_problem,
        {"listed_metric_groups": ["kl"], "top_k_stored": False},
        [{"top_k_stored": True}, {"listed_metric_groups": ["perplexity"]}, {"listed_metric_groups": []}],
        "sample.top_k_logprobs",
    ),
]


@pytest.mark.parametrize("rule, broken, keeping, field", RULES, ids=[rule.__name__ for rule, *_ in RULES])
def test_a_rule_names_the_field_when_broken_and_is_silent_when_one_fact_changes(rule, broken, keeping, field):
    problem = rule(**broken)
    assert problem is not None and field in problem
    for change in keeping:
        assert rule(**{**broken, **change}) is None, change


def test_the_gate_rule_names_the_metric_it_refuses():
    problem = c.teacher_weight_gate_problem(
        teacher_is_served=True, gate_metric_names=["student_perplexity", "teacher_size_mb"]
    )
    assert "'teacher_size_mb' is measured on the teacher's weights" in problem


def test_teacher_weight_metrics_and_reference_groups_are_known_names():
    assert all(metric_group(name) is not None for name in c.TEACHER_WEIGHT_METRICS)
    assert all(name.startswith("teacher_") or name.endswith("_ratio") for name in c.TEACHER_WEIGHT_METRICS)
    assert set(c.METRIC_GROUPS_NEEDING_REFERENCES) <= set(METRIC_NAMES)


def test_assert_no_problem_raises_the_first_problem_as_an_internal_error():
    c.assert_no_problem(None, None)
    with pytest.raises(AssertionError, match="^first: set x$"):
        c.assert_no_problem(None, "first: set x", "second: set y")


SERVED = ["sample.engine=openai", "sample.openai.tokenizer=org/tokenizer"]

# (rule, its facts in the broken config, overrides of the tiny pipeline that break it, one more override that keeps it)
CONFIG_CASES = [
    (
        c.online_teacher_problem,
        {"teacher_is_served": True, "method": "kd", "kd_teacher": "online"},
        SERVED + ["train.kd.teacher=online"],
        "train.kd.teacher=offline",
    ),
    (
        c.kd_vocabulary_problem,
        {"teacher_tokenizer_known": False, "method": "kd"},
        ["sample.engine=openai", "train.architecture=null", "train.student=org/student"],
        "sample.openai.tokenizer=org/tokenizer",
    ),
    (
        c.student_from_scratch_problem,
        {"teacher_tokenizer_known": False, "student_from_scratch": True},
        ["sample.engine=openai", "train.method=sft"],
        "sample.openai.tokenizer=org/tokenizer",
    ),
    (
        c.served_kd_vocabulary_problem,
        {"teacher_tokenizer_known": False, "method": "kd", "kd_teacher": "served"},
        ["sample.engine=openai", "train.kd.teacher=served", "train.kd.online_top_k=20"],
        "sample.openai.tokenizer=org/tokenizer",
    ),
    (
        c.offline_kd_top_k_problem,
        {"method": "kd", "kd_teacher": "offline", "top_k_stored": False},
        ["sample.top_k_logprobs=0"],
        "train.method=sft",
    ),
    (
        c.feedback_judge_problem,
        {"teacher_is_served": True, "judge_kind": "pointwise", "judge_model": None},
        SERVED + ["feedback={}"],
        "feedback.judge.kind=verifier",
    ),
    (
        c.win_rate_judge_problem,
        {
            "teacher_is_served": True,
            "listed_metric_groups": ["win_rate"],
            "win_rate_judge": "model",
            "judge_model": None,
        },
        SERVED + ["evaluate.metrics=[win_rate]"],
        "evaluate.judge_model=org/judge",
    ),
    (
        c.lm_eval_teacher_problem,
        {"teacher_is_served": True, "lm_eval_roles": ["teacher", "student"]},
        SERVED + ["evaluate.lm_eval.tasks=[x]"],
        "evaluate.lm_eval.roles=[student]",
    ),
    (
        c.teacher_weight_gate_problem,
        {"teacher_is_served": True, "gate_metric_names": ["speed_ratio"]},
        SERVED + ["evaluate.gate.max.speed_ratio=2"],
        "sample.engine=hf",
    ),
    (
        c.reference_metrics_problem,
        {"listed_metric_groups": ["exact_match"], "has_references": False},
        ["curate.reference_column=null", "evaluate.metrics=[exact_match]"],
        "evaluate.metrics=[perplexity]",
    ),
    (
        c.kl_top_k_problem,
        {"listed_metric_groups": ["kl"], "top_k_stored": False},
        ["sample.top_k_logprobs=0", "train.method=sft", "evaluate.metrics=[kl]"],
        "sample.top_k_logprobs=4",
    ),
]


@pytest.mark.parametrize(
    "rule, facts, breaking, keeping", CONFIG_CASES, ids=[rule.__name__ for rule, *_ in CONFIG_CASES]
)
def test_config_validation_refuses_with_the_rules_own_message_and_accepts_the_fix(
    pipeline_raw, rule, facts, breaking, keeping
):
    raw = apply_overrides(pipeline_raw, breaking)
    with pytest.raises(ConfigError) as error:
        parse_config(raw)
    assert rule(**facts) in str(error.value)
    parse_config(apply_overrides(raw, [keeping]))


def test_the_messages_name_the_fix():
    problem = c.served_kd_prompt_logprobs_problem(url="http://10.0.0.5:8000/v1", problem="answered without it")
    assert "http://10.0.0.5:8000/v1/completions" in problem and "vllm serve" in problem
    problem = c.vllm_gpu_problem(
        tensor_parallel_size=4, pipeline_parallel_size=2, replicas=2, gpus_available=8, where="the Ray cluster at auto"
    )
    assert problem.startswith(
        "sample.vllm needs 16 GPUs (tensor_parallel_size 4 x pipeline_parallel_size 2 x replicas 2), "
        "but the Ray cluster at auto has 8"
    )
    assert "train.kd.teacher: served" in c.online_teacher_problem(
        teacher_is_served=True, method="kd", kd_teacher="online"
    )


def test_a_served_sampler_allows_the_served_kd_teacher_the_way_out_of_online(pipeline_raw):
    raw = apply_overrides(pipeline_raw, SERVED + ["train.kd.teacher=online"])
    with pytest.raises(ConfigError, match="train.kd.teacher: served"):
        parse_config(raw)
    config = parse_config(
        apply_overrides(raw, ["train.kd.teacher=served", "train.kd.online_top_k=20", "train.kd.lmbda=0.5"])
    )
    assert config.train.kd.teacher == "served" and config.train.kd.served is None  # null: sample.openai's server
