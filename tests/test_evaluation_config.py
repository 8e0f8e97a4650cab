"""Evaluation and gate settings: defaults, ranges, and bad input refused when the config is validated."""

import pytest

from stillhouse.config import (
    METRIC_NAMES,
    ConfigError,
    EvaluateConfig,
    GateConfig,
    LmEvalConfig,
    metric_group,
    parse_config,
)


def test_every_new_field_has_a_description():
    for model in (EvaluateConfig, GateConfig, LmEvalConfig):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"


def test_defaults_keep_old_configs_and_compute_what_the_data_supports(pipeline_raw):
    config = parse_config(pipeline_raw)
    assert (
        config.evaluate.metrics is None
        and config.evaluate.gate.must_beat_champion
        and config.evaluate.gate.champion_alias == "champion"
    )
    assert "exact_match" in config.evaluate.selected_groups(has_references=True, has_top_k=True)
    assert config.evaluate.selected_groups(has_references=False, has_top_k=False) == [
        "perplexity",
        "agreement",
        "rouge_l_teacher",
        "speed",
        "size",
    ]


def test_metric_names_map_to_their_groups():
    assert metric_group("student_exact_match/reverse") == "exact_match"
    assert metric_group("kl_teacher_student") == "kl" and metric_group("parameter_ratio") == "always"
    assert metric_group("student_lm_eval/hellaswag/acc") == "lm_eval"
    assert metric_group("student_accuracy") is None
    assert all(
        metric_group(name) == group for group, names in METRIC_NAMES.items() for name in names if "<" not in name
    )


@pytest.mark.parametrize(
    "section, value, message",
    [
        (
            "gate",
            {"min": {"student_acuracy": 0.5}},
            "evaluate.gate.min.student_acuracy: unknown metric 'student_acuracy'",
        ),
        ("gate", {"champion_metric": "bleu"}, "evaluate.gate.champion_metric: unknown metric 'bleu'"),
        ("gate", {"max": {"student_latency_seconds": 1}}, None),
        ("gate", {"min_accuracy_ratio_to_teacher": 0}, "greater than 0"),
        ("gate", {"max_kl": -1}, "greater than or equal to 0"),
        ("gate", {"champion_tolerance": -0.1}, "greater than or equal to 0"),
        ("gate", {"max": {"baseline_perplexity": 3}}, "needs evaluate.baseline"),
        ("metrics", ["exact_match", "bogus"], "metrics"),
        ("metrics", [], "at least 1"),
        ("latency_prompts", 0, "greater than 0"),
    ],
)
def test_bad_evaluation_settings_are_refused(pipeline_raw, section, value, message):
    pipeline_raw["evaluate"][section] = value
    if message is None:
        parse_config(pipeline_raw)
        return
    with pytest.raises(ConfigError, match="evaluate") as error:
        parse_config(pipeline_raw)
    assert message in str(error.value)


def test_a_metric_needing_references_the_data_lacks_is_refused(pipeline_raw):
    pipeline_raw["curate"]["reference_column"] = None
    parse_config(pipeline_raw)  # null metrics: exact match is simply not computed
    pipeline_raw["evaluate"]["metrics"] = ["perplexity", "exact_match"]
    with pytest.raises(ConfigError, match="exact_match, which need reference answers"):
        parse_config(pipeline_raw)
    pipeline_raw["evaluate"]["metrics"] = None
    pipeline_raw["evaluate"]["gate"] = {"min_accuracy_ratio_to_teacher": 0.9}
    with pytest.raises(ConfigError, match="no references"):
        parse_config(pipeline_raw)


def test_a_gate_on_a_metric_the_config_does_not_compute_is_refused(pipeline_raw):
    pipeline_raw["evaluate"]["metrics"] = ["perplexity"]
    pipeline_raw["evaluate"]["gate"] = {"max_kl": 0.5}
    with pytest.raises(ConfigError, match="add 'kl' to evaluate.metrics"):
        parse_config(pipeline_raw)
    pipeline_raw["evaluate"] = {"gate": {"max_kl": 0.5}}
    pipeline_raw["sample"]["top_k_logprobs"] = 0
    pipeline_raw["train"]["method"] = "sft"
    with pytest.raises(ConfigError, match="sample.top_k_logprobs is 0"):
        parse_config(pipeline_raw)
    pipeline_raw["evaluate"] = {"gate": {"min": {"student_lm_eval/tiny/acc": 0.5}}}
    with pytest.raises(ConfigError, match="evaluate.lm_eval is not set"):
        parse_config(pipeline_raw)


def test_an_eval_set_with_zero_rows_is_refused(pipeline_raw):
    pipeline_raw["curate"]["max_rows"] = 5
    pipeline_raw["curate"]["eval_fraction"] = 0.1
    with pytest.raises(ConfigError, match="the eval set would be empty"):
        parse_config(pipeline_raw)
