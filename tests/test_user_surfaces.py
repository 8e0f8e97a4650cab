"""What a new user sees (issue 17, items 5, 7, 8, 9): `validate`, the MLflow run names, the summary, `schema`.

Run as a user runs them: the `stillhouse` command in a subprocess, in a fresh folder, on the user's own .jsonl and
their own tiny Hugging Face teacher and student folders (built here, random weights).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import build_tiny_model

from stillhouse.flows.cli import main

STORED_STAGES = ("curate", "sample", "train", "evaluate", "register")
# `stillhouse ARGUMENTS`, then a last line naming the heavy libraries the command imported.
HEAVY_IMPORTS_PROBE = """
import json, sys
from stillhouse.flows.cli import main
code = main(sys.argv[1:])
heavy = ('torch', 'transformers', 'peft', 'trl', 'mlflow', 'prefect', 'datasketch')
print('HEAVY=' + json.dumps([name for name in heavy if name in sys.modules]))
sys.exit(code)
"""


def stillhouse(
    *arguments: str, cwd: Path, timeout: int = 600, report_heavy_imports: bool = False
) -> subprocess.CompletedProcess:
    """`stillhouse ARGUMENTS` in ``cwd``, output piped (not a terminal), as a user's shell or CI would run it.
    ``report_heavy_imports``: the output ends with the line `heavy_imports` reads."""
    env = {**os.environ, "PREFECT_HOME": str(cwd / "prefect-home"), "COLUMNS": "80"}
    env.pop("PREFECT_API_URL", None)
    command = ["-c", HEAVY_IMPORTS_PROBE] if report_heavy_imports else ["-m", "stillhouse.flows.cli"]
    return subprocess.run(
        [sys.executable, *command, *arguments],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def heavy_imports(completed: subprocess.CompletedProcess) -> list[str]:
    """The heavy libraries a `stillhouse(..., report_heavy_imports=True)` command imported."""
    return json.loads(completed.stdout.strip().splitlines()[-1].removeprefix("HEAVY="))


def messages_rows(count: int) -> list[dict]:
    """OpenAI `messages` rows with a reference and a category, as a user's export would look."""
    rows = []
    for index in range(count):
        word = "".join("abcdefghij"[int(digit)] for digit in f"{index:03d}")
        rows.append(
            {
                "messages": [{"role": "user", "content": f"reverse: {word}"}],
                "reference": word[::-1],
                "task": "reverse",
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def user_models(tmp_path_factory) -> dict[str, Path]:
    """The user's own teacher (4 layers x 48) and student (2 layers x 16) folders, as `save_pretrained` wrote them."""
    folder = tmp_path_factory.mktemp("user-models")
    return {
        "teacher": build_tiny_model(folder / "teacher", hidden_size=48, layers=4, seed=1),
        "student": build_tiny_model(folder / "student", hidden_size=16, layers=2, seed=2),
    }


def user_config(folder: Path, models: dict[str, Path], data: Path, **changes) -> Path:
    """The user's experiment YAML: their data, their teacher and student, KD with k = 4."""
    raw = {
        "name": "nu-sft",
        "store": "my-store",
        "curate": {"source": str(data), "category_column": "task", "eval_fraction": 0.2, "batch_rows": 100},
        "sample": {"teacher": str(models["teacher"]), "max_new_tokens": 6, "top_k_logprobs": 4, "batch_size": 32},
        "train": {"student": str(models["student"]), "method": "kd", "max_steps": 2, "batch_size": 8},
        "evaluate": {"max_new_tokens": 6, "batch_size": 32, "latency_prompts": 1},
        "tracking": {"uri": f"sqlite:///{folder / 'mlflow.db'}", "experiment": "mine"},
        "registry": {"model_name": "nu-student"},
    }
    for section, values in changes.items():
        raw[section].update(values)
    path = folder / "mine.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def assert_one_error_line(completed: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit 2, no traceback anywhere, and the last line is the one `error:` line holding every fragment."""
    output = completed.stdout + completed.stderr
    assert completed.returncode == 2, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in completed.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and completed.stderr.strip().splitlines()[-1] == errors[0], completed.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


# --- item 5: validate refuses what run would refuse, and says what it found -----------------------------------


def bad_data_cases(folder: Path) -> dict[str, tuple[Path, dict, list[str]]]:
    """name: (the data file, curate changes, fragments the error line must hold)."""
    good = messages_rows(150)
    lines = [json.dumps(row) for row in good]
    lines[129] = '{"messages": [{"role": "user", "content": "unterminated'  # line 130 of 150: past the first batch
    late = folder / "late-bad-row.jsonl"
    late.write_text("\n".join(lines) + "\n")
    csv_named_jsonl = folder / "export.jsonl"
    csv_named_jsonl.write_text("prompt,reference\nreverse: abc,cba\n")
    return {
        "empty file": (write_jsonl(folder / "empty.jsonl", []), {}, ["empty.jsonl", "has no rows"]),
        "sharegpt that is OpenAI messages": (
            write_jsonl(folder / "chats.jsonl", good),
            {"format": "sharegpt"},
            ["curate.format: `sharegpt` reads column 'conversations'", "chats.jsonl", "set curate.format: messages"],
        ),
        "CSV named .jsonl": (
            csv_named_jsonl,
            {},
            ["export.jsonl", "looks like a CSV header", "rename it to export.csv"],
        ),
        "missing column": (
            write_jsonl(folder / "questions.jsonl", [{"question": "reverse: abc", "reference": "cba"}]),
            {},
            ["curate.prompt_column: column 'prompt' is not in", "questions.jsonl", "set curate.format"],
        ),
        "malformed row past the first batch": (
            late,
            {},
            ["late-bad-row.jsonl: line 130: not valid JSON", "curate.on_error: skip"],
        ),
    }


@pytest.mark.slow
def test_validate_refuses_bad_data_with_one_error_line_naming_the_file_and_fix(tmp_path, user_models):
    for name, (data, curate, fragments) in bad_data_cases(tmp_path).items():
        config = user_config(tmp_path, user_models, data, curate=curate)
        completed = stillhouse("validate", config.name, cwd=tmp_path)
        try:
            assert_one_error_line(completed, *fragments)
        except AssertionError as failure:
            raise AssertionError(f"{name}: {failure}") from None
    assert not (tmp_path / "my-store").exists()  # validate writes nothing


@pytest.mark.parametrize("case", ["empty file", "sharegpt that is OpenAI messages", "CSV named .jsonl"])
def test_run_refuses_bad_data_before_prefect_or_a_model_starts(tmp_path, user_models, capsys, case):
    data, curate, fragments = bad_data_cases(tmp_path)[case]
    config = user_config(tmp_path, user_models, data, curate=curate)
    assert main(["run", str(config)]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: ") and all(fragment in error for fragment in fragments), error
    assert not (tmp_path / "mlflow.db").exists()  # refused before the pipeline's MLflow run was opened


@pytest.mark.slow
def test_a_failure_inside_a_stage_ends_in_one_error_line_without_a_traceback(tmp_path, user_models):
    """A bad row past preflight's first batch fails in curation, inside Prefect: still only the `error:` line."""
    data, _, _ = bad_data_cases(tmp_path)["malformed row past the first batch"]
    config = user_config(tmp_path, user_models, data)
    completed = stillhouse("run", config.name, "--until", "curate", cwd=tmp_path)
    assert_one_error_line(completed, "late-bad-row.jsonl: line 130: not valid JSON")
    assert "curate" in completed.stdout + completed.stderr  # it did fail in the stage, not in preflight


def test_validate_reads_files_without_importing_torch_transformers_or_mlflow(tmp_path, user_models):
    """`validate` stays under 2 s by reading config.json and tokenizer files itself (README: measured figures); a
    module that pulls torch, transformers or MLflow back into its path breaks that, and this test names it."""
    data = write_jsonl(tmp_path / "prompts.jsonl", messages_rows(60))
    mine = user_config(tmp_path, user_models, data, train={"method": "sft"})  # the user's own folders, SFT
    repository = Path(__file__).parents[1]
    for config, folder in (("configs/demo.yaml", repository), (mine.name, tmp_path)):
        completed = stillhouse("validate", config, cwd=folder, timeout=120, report_heavy_imports=True)
        assert completed.returncode == 0, completed.stderr[-3000:]
        assert ": OK (" in completed.stdout, completed.stdout
        assert heavy_imports(completed) == [], config


@pytest.mark.slow
def test_validate_prints_rows_splits_models_k_and_the_store(tmp_path, user_models):
    from transformers import AutoModelForCausalLM

    from stillhouse.config import load_config
    from stillhouse.data.curate import curate
    from stillhouse.store import Store

    rows = messages_rows(150)
    data = write_jsonl(tmp_path / "prompts.jsonl", rows + rows[:3] + [{"messages": [], "task": "reverse"}])
    config_path = user_config(tmp_path, user_models, data)
    completed = stillhouse("validate", config_path.name, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "deprecated" not in completed.stderr, completed.stderr  # no library noise (transformers 5: torch_dtype)
    out = completed.stdout

    # The split it announces is the one curation then makes (no filter removes any of these rows).
    config = load_config(config_path)
    dataset = curate(config.curate, Store(tmp_path / "curated"))
    assert (dataset.train_rows, dataset.eval_rows) != (0, 0)
    assert (
        f"prompts ({data}; file, format messages): 153 prompts (1 empty, 3 exact duplicates) "
        f"-> train {dataset.train_rows}, eval {dataset.eval_rows}" in out
    ), out
    assert f"splits: train {dataset.train_rows}, eval {dataset.eval_rows} (eval_fraction 0.2;" in out

    teacher = AutoModelForCausalLM.from_pretrained(user_models["teacher"])
    parameters = sum(p.numel() for p in teacher.parameters())
    assert (
        f"Teacher: {user_models['teacher']}: llama, 4 layers x 48 hidden, {parameters / 1000:.1f}K parameters, "
        f"vocabulary {teacher.config.vocab_size}" in out
    ), out
    assert f"Student: {user_models['student']}: llama, 2 layers x 16 hidden" in out
    assert "character-level (BPE without merges)" in out  # the demo's tokenizer: one token per character
    assert "k (sample.top_k_logprobs): 4" in out
    assert f"Store: {(tmp_path / 'my-store').resolve()}" in out
    assert out.strip().splitlines()[-1].startswith("mine.yaml: OK (nu-sft;")
    assert not (tmp_path / "my-store").exists()


# --- items 7 and 8: MLflow run names, description, experiment kind; the summary -------------------------------


@pytest.mark.slow
def test_a_run_is_named_after_its_method_and_overrides_and_the_summary_copies_cleanly(tmp_path, user_models):
    from mlflow.tracking import MlflowClient

    data = write_jsonl(tmp_path / "prompts.jsonl", messages_rows(60))
    config = user_config(tmp_path, user_models, data)
    completed = stillhouse(
        "run", config.name, "--set", "train.max_steps=3", "--set", "train.kd_weight=0.8", cwd=tmp_path
    )
    assert completed.returncode == 0, (completed.stdout + completed.stderr)[-4000:]
    out = completed.stdout

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mine")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # MLflow's "Model training" view
    runs = client.search_runs([experiment.experiment_id])
    names = {run.info.run_name for run in runs}
    assert "nu-sft · kd · max_steps=3 kd_weight=0.8" in names, names
    assert {"curate · kd", "sample · kd", "train · kd", "evaluate · kd", "register · kd"} <= names, names
    (parent,) = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    description = parent.data.tags["mlflow.note.content"]
    assert "stillhouse run mine.yaml --set train.max_steps=3 --set train.kd_weight=0.8" in description
    assert "- `train.max_steps=3`" in description and "- `train.kd_weight=0.8`" in description

    # The first run passes the gate with no champion to beat: its version holds both aliases, and says so.
    assert "Registered: models:/nu-student@candidate (version 1), also models:/nu-student@champion" in out, out
    assert str(client.get_model_version_by_alias("nu-student", "champion").version) == "1"
    # Piped, nothing is wrapped at 80 columns: the command and the URL are each on one line.
    browse = next(line for line in out.splitlines() if "mlflow ui --backend-store-uri" in line)
    assert browse.endswith(f"/#/experiments/{experiment.experiment_id}/runs/{parent.info.run_id}"), browse
    rerun = next(line for line in out.splitlines() if line.startswith("Rerun: "))
    assert rerun == "Rerun: stillhouse run mine.yaml --set train.max_steps=3 --set train.kd_weight=0.8"
    header = next(line for line in out.splitlines() if "stage" in line and "seconds" in line)
    assert "output" in header and "computed" in out, header  # the third column has a name
    assert "Traceback" not in out + completed.stderr


@pytest.mark.slow
def test_a_cached_rerun_of_the_demo_imports_no_model_library(tmp_path):
    """A rerun of the demo config, every stage reused, imports neither torch nor transformers (nor peft, TRL): with
    Prefect's and MLflow's, their imports were most of a cached rerun's time (README: measured figures)."""
    demo = str(Path(__file__).parents[1] / "configs" / "demo.yaml")
    small = ["--set", "curate.demo_rows=300", "--set", "train.max_steps=4", "--set", "evaluate.max_new_tokens=4"]
    first = stillhouse("run", demo, *small, cwd=tmp_path)
    assert first.returncode in (0, 3), (first.stdout + first.stderr)[-4000:]  # 3: the gate kept it back
    again = stillhouse("run", demo, *small, cwd=tmp_path, report_heavy_imports=True)
    assert again.returncode == first.returncode, (again.stdout + again.stderr)[-4000:]
    stages = {line.split()[1]: line for line in again.stdout.splitlines() if line.startswith("│ ")}
    assert all("reused from store" in stages[stage] for stage in STORED_STAGES), stages
    assert heavy_imports(again) == ["mlflow", "prefect"], again.stdout.splitlines()[-1]


# --- item 9: schema ---------------------------------------------------------------------------------------------


def test_schema_lists_sections_and_a_section_as_a_readable_table(tmp_path):
    sections = stillhouse("schema", cwd=tmp_path)
    assert sections.returncode == 0, sections.stderr
    lines = sections.stdout.splitlines()
    assert len(lines) < 30, sections.stdout
    for name in ("curate", "sample", "train", "evaluate", "registry", "publish"):
        assert any(line.split()[:1] == [name] for line in lines), name

    train = stillhouse("schema", "train", cwd=tmp_path)
    assert train.returncode == 0, train.stderr
    temperature = next(line for line in train.stdout.splitlines() if line.split()[:1] == ["train.kd.temperature"])
    assert temperature.split()[1:3] == ["float", "1.0"], temperature  # type and default, beside the path
    assert "train.max_steps" in train.stdout and "Optimizer steps." in train.stdout
    assert "curate." not in train.stdout and "$defs" not in train.stdout  # this section only, and no JSON
    assert max(len(line) for line in train.stdout.splitlines()) <= 160


def test_schema_json_is_behind_a_flag_and_a_closed_pipe_ends_quietly(tmp_path):
    whole = stillhouse("schema", "--json", cwd=tmp_path)
    assert whole.returncode == 0 and "top_k_logprobs" in json.loads(whole.stdout)["$defs"]["SampleConfig"]["properties"]
    section = json.loads(stillhouse("schema", "train", "--json", cwd=tmp_path).stdout)
    assert section["$ref"] == "#/$defs/TrainConfig" and "KDConfig" in section["$defs"]
    assert "CurateConfig" not in section["$defs"]  # only what the section refers to

    # `| head -1` closes the pipe after one line: no BrokenPipeError traceback, and a pipefail shell sees success.
    piped = subprocess.run(
        ["bash", "-o", "pipefail", "-c", f"{sys.executable} -m stillhouse.flows.cli schema --json | head -1"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert piped.stdout == "{\n" and piped.stderr == "" and piped.returncode == 0, piped.stderr


def test_an_unknown_schema_section_suggests_the_closest(tmp_path):
    completed = stillhouse("schema", "traan", cwd=tmp_path)
    assert completed.returncode == 2 and completed.stdout == ""
    assert completed.stderr.strip() == "error: unknown section 'traan'; did you mean 'train'?"
    unknown = stillhouse("schema", "zzz", cwd=tmp_path)
    assert unknown.returncode == 2 and "sections: name, store, curate, sample, train" in unknown.stderr
