"""The `stillhouse` command: help, validation, and bad input refused before any model loads."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stillhouse.flows.cli import main

REPO = Path(__file__).parents[1]


def write_config(tmp_path, raw) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_help_describes_every_command():
    completed = subprocess.run(
        [sys.executable, "-m", "stillhouse.flows.cli", "--help"], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert completed.returncode == 0
    for command in ("run", "validate", "schema", "plan"):
        assert command in completed.stdout
    run_help = subprocess.run(
        [sys.executable, "-m", "stillhouse.flows.cli", "run", "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    ).stdout
    assert "--set SECTION.KEY=VALUE" in run_help and "--until" in run_help


def test_plan_prints_every_stage_for_this_machine(tmp_path, pipeline_raw, capsys):
    assert main(["plan", str(write_config(tmp_path, pipeline_raw))]) == 0
    out = capsys.readouterr().out
    for word in ("sample", "train", "evaluate", "peak", "fits"):
        assert word in out
    assert not (tmp_path / "store").exists()  # nothing ran


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--gpu-memory", "lots"], "--gpu-memory 'lots': expected a size such as 80GB"),
        (["--gpus", "0", "--gpu-memory", "80GB"], "give at least one node, one GPU"),
    ],
)
def test_bad_hardware_flags_are_refused_with_the_fix(tmp_path, pipeline_raw, capsys, flags, message):
    path = str(write_config(tmp_path, pipeline_raw))
    for command in ("plan", "validate"):
        assert main([command, path, *flags]) == 2
        assert message in capsys.readouterr().err


def test_schema_lists_fields_with_descriptions(capsys):
    assert main(["schema", "--json"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert "top_k_logprobs" in json.dumps(schema) and schema["properties"]["train"]
    assert main(["schema", "sample"]) == 0
    assert "sample.top_k_logprobs" in capsys.readouterr().out


def test_validate_accepts_a_good_config(tmp_path, pipeline_raw, capsys):
    assert main(["validate", str(write_config(tmp_path, pipeline_raw))]) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1].startswith(f"{tmp_path / 'exp.yaml'}: OK (tiny;")
    # 122 rows: one empty, one exact duplicate; a student from train.architecture takes the teacher's vocabulary.
    assert "121 prompts (1 empty, 1 exact duplicate) -> train" in out
    assert "Student: train.architecture (built from scratch): llama, 2 layers x 16 hidden" in out
    assert "vocabulary 85 (tokenizer: the teacher's)" in out  # the demo's character tokenizer


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda raw, tmp: raw["curate"].update(source=str(tmp / "missing.jsonl")), "curate.source: dataset file"),
        (lambda raw, tmp: raw["sample"].update(teacher=str(tmp / "no-teacher")), "sample.teacher: model path"),
        (
            lambda raw, tmp: raw["sample"].update(top_k_logprobs=100_000),
            "sample.top_k_logprobs: k=100000 is larger than the teacher's vocabulary",
        ),
        (lambda raw, tmp: raw["train"].update(learning_rate=-1), "train.learning_rate: Input should be greater than 0"),
    ],
)
def test_bad_input_is_refused_with_the_field_and_exit_code_2(tmp_path, pipeline_raw, capsys, change, message):
    change(pipeline_raw, tmp_path)
    assert main(["run", str(write_config(tmp_path, pipeline_raw))]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "store").exists()  # refused before any stage ran


@pytest.mark.slow
@pytest.mark.parametrize(
    "content, message",
    [
        ("", "has no rows"),
        ('{"question": "sort letters: cba", "reference": "abc"}\n', "curate.prompt_column: column 'prompt' is not in"),
    ],
)
def test_bad_data_fails_in_curation_before_the_teacher_is_loaded(
    prefect_harness, tmp_path, pipeline_raw, content, message
):
    from stillhouse.config import parse_config
    from stillhouse.errors import InputError
    from stillhouse.flows.distill import distill

    data = tmp_path / "data.jsonl"
    data.write_text(content)
    pipeline_raw["curate"]["source"] = str(data)
    with pytest.raises(InputError, match=message):
        distill(parse_config(pipeline_raw))
    assert not (tmp_path / "store" / "sample").exists()


@pytest.mark.slow
def test_a_failed_gate_exits_3_and_publishes_nothing(prefect_harness, tmp_path, pipeline_raw):
    pipeline_raw["evaluate"]["gate"] = {"max_kl": 0.0}  # a random student never matches the teacher exactly
    assert main(["run", str(write_config(tmp_path, pipeline_raw))]) == 3
    assert (tmp_path / "store" / "evaluate").is_dir() and not (tmp_path / "store" / "publish").exists()
