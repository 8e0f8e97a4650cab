"""Config: every shipped YAML loads; bad keys, types and values fail with the field path."""

from pathlib import Path

import pytest

from stillhouse.config import ConfigError, PipelineConfig, load_config, parse_config

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    config = load_config(path)
    assert isinstance(config, PipelineConfig)
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("#"), f"{path.name} must open with a comment giving the command that runs it"
    assert "stillhouse run" in path.read_text().split("\n\n")[0]


def test_every_field_has_a_description():
    def walk(model, prefix=""):
        for name, field in model.model_fields.items():
            assert field.description, f"{prefix}{name} has no description"
            annotation = field.annotation
            for candidate in getattr(annotation, "__args__", (annotation,)):
                if isinstance(candidate, type) and hasattr(candidate, "model_fields"):
                    walk(candidate, f"{prefix}{name}.")

    walk(PipelineConfig)


def test_unknown_key_names_its_path(pipeline_raw):
    pipeline_raw["train"]["learning_rat"] = 0.1
    with pytest.raises(ConfigError, match=r"train\.learning_rat: unknown key"):
        parse_config(pipeline_raw)


def test_wrong_type_and_impossible_value_are_reported_together(pipeline_raw):
    pipeline_raw["train"]["max_steps"] = "many"
    pipeline_raw["curate"]["eval_fraction"] = 1.5
    with pytest.raises(ConfigError) as error:
        parse_config(pipeline_raw, origin="exp.yaml")
    message = str(error.value)
    assert message.startswith("exp.yaml: invalid configuration (2 problem(s))")
    assert "train.max_steps" in message and "'many'" in message
    assert "curate.eval_fraction" in message and "less than 1" in message


def test_missing_section_is_named(pipeline_raw):
    del pipeline_raw["sample"]
    with pytest.raises(ConfigError, match=r"sample: required field is missing"):
        parse_config(pipeline_raw)


def test_kd_without_top_k_is_refused_with_the_fix(pipeline_raw):
    pipeline_raw["sample"]["top_k_logprobs"] = 0
    with pytest.raises(ConfigError, match=r"store the teacher's top-k"):
        parse_config(pipeline_raw)


def test_student_needs_exactly_one_source(pipeline_raw):
    pipeline_raw["train"]["student"] = "org/model"
    with pytest.raises(ConfigError, match="exactly one of `student`"):
        parse_config(pipeline_raw)


def test_a_schedule_whose_warmup_and_decay_overlap_is_refused(pipeline_raw):
    pipeline_raw["train"] |= {"lr_scheduler": "warmup_stable_decay", "warmup_ratio": 0.3, "decay_ratio": 0.8}
    with pytest.raises(ConfigError, match=r"warmup_ratio \(0.3\) \+ decay_ratio \(0.8\) is over 1"):
        parse_config(pipeline_raw)


def test_overrides_apply_with_yaml_types(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text((Path(__file__).parents[1] / "configs" / "demo.yaml").read_text())
    config = load_config(
        path, ["train.max_steps=7", "publish.repo_id=alice/demo", "curate.max_rows=null", "train.method=kd"]
    )
    assert config.train.max_steps == 7 and config.publish.repo_id == "alice/demo" and config.train.method == "kd"
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(path, ["train.max_steps"])
    with pytest.raises(ConfigError, match=r"train\.max_steps"):
        load_config(path, ["train.max_steps=-1"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_a_served_teacher_cannot_be_used_in_memory(pipeline_raw):
    pipeline_raw["sample"]["engine"] = "openai"
    pipeline_raw["train"]["kd"] = {"teacher": "online"}
    with pytest.raises(ConfigError, match="can't be loaded here"):
        parse_config(pipeline_raw)
