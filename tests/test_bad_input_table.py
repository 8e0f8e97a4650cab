"""Bad input, table-driven: every case goes through a real entry point (load_config, `stillhouse
validate`, curation, sampling) and must end in a clear error that names where and what to do, or in a
documented, counted skip. Only Stillhouse's own errors are caught: a library traceback, or a run
that succeeds silently, fails the case.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import upload_to_default_hub

from stillhouse.config import ConfigError, CurateConfig, SampleConfig, load_config
from stillhouse.data.curate import curate
from stillhouse.errors import StillhouseError
from stillhouse.flows.cli import main
from stillhouse.sampling.sample import check_teacher, sample_teacher
from stillhouse.store import Store


@dataclass
class Case:
    id: str
    run: Callable[[Path, dict], str]  # returns "<ErrorType>: message", "exit 2: stderr" or "skipped: counts"
    expect: str  # a regex the outcome must match


def outcome_of(call: Callable[[], object]) -> str:
    try:
        result = call()
    except (ConfigError, StillhouseError) as error:
        return f"{type(error).__name__}: {error}"
    raise AssertionError(f"accepted silently: {result!r}")


# Entry points -------------------------------------------------------------------------------------


def yaml_file(text: str) -> Callable[[Path, dict], str]:
    def run(tmp_path: Path, raw: dict) -> str:
        path = tmp_path / "exp.yaml"
        path.write_text(text)
        return outcome_of(lambda: load_config(path))

    return run


def config_change(change: Callable[[dict, Path], None], overrides: tuple[str, ...] = ()) -> Callable[[Path, dict], str]:
    """`stillhouse validate` (config, then preflight: data files, teacher, k) on the test config, changed."""

    def run(tmp_path: Path, raw: dict) -> str:
        change(raw, tmp_path)
        path = tmp_path / "exp.yaml"
        path.write_text(yaml.safe_dump(raw))
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            code = main(["validate", str(path), *sum((["--set", o] for o in overrides), [])])
        assert code == 2, f"`stillhouse validate` exited {code}; stderr: {stderr.getvalue()}"
        assert not (tmp_path / "store").exists()  # refused before any stage ran
        return f"exit 2: {stderr.getvalue()}"

    return run


def section(where: str, **values) -> Callable[[dict, Path], None]:
    def change(raw: dict, tmp_path: Path) -> None:
        node = raw
        for part in where.split(".") if where else []:
            node = node.setdefault(part, {})
        node.update(values)

    return change


def prompt_row(text: str) -> dict:
    return {"prompt": text}


def messages_of(text: str) -> dict:
    return {"messages": [{"role": "user", "content": text}]}


def data_file(
    content: str | bytes,
    suffix: str = ".jsonl",
    good_row: Callable[[str], dict] = prompt_row,
    counted: bool = False,
    **settings,
) -> Callable[[Path, dict], str]:
    """Curation of a file of 30 good rows then ``content``; with ``on_error: skip`` or filters the outcome is the
    counts."""

    def run(tmp_path: Path, raw: dict) -> str:
        path = tmp_path / f"data{suffix}"
        good = "".join(json.dumps(good_row(f"good question number {i} about sorting")) + "\n" for i in range(30))
        path.write_bytes(good.encode() + (content if isinstance(content, bytes) else content.encode()))
        config = CurateConfig(source=str(path), reference_column=None, eval_fraction=0.2, **settings)
        if counted:  # the row is expected to be dropped and counted, not refused
            counts = curate(config, Store(tmp_path / "store")).counts
            return f"skipped: {json.dumps({k: v for k, v in counts.items() if v})}"
        return outcome_of(lambda: curate(config, Store(tmp_path / "store")))

    return run


def messages_row(*messages: tuple[str, object], **settings) -> Callable[[Path, dict], str]:
    return data_file(
        json.dumps({"messages": [{"role": r, "content": c} for r, c in messages]}) + "\n",
        good_row=messages_of,
        format="messages",
        prompt_column="messages",
        **settings,
    )


def huge_prompt_sampled(tmp_path: Path, raw: dict) -> str:
    """A 10 MB prompt passes curation (no length bound set) and is refused by sampling before any generation."""
    path = tmp_path / "huge.jsonl"
    rows = [{"prompt": f"good question number {i} about sorting"} for i in range(30)] + [
        {"prompt": "sort: " + "z y x " * 2_500_000}
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    store = Store(tmp_path / "store")
    dataset = curate(CurateConfig(source=str(path), reference_column=None, eval_fraction=0.2), store)
    assert dataset.train_rows + dataset.eval_rows == 31
    outcome = outcome_of(
        lambda: sample_teacher(
            SampleConfig(teacher=raw["sample"]["teacher"], max_new_tokens=4, top_k_logprobs=0), dataset, store
        )
    )
    assert not list((tmp_path / "store").glob("sample/*/shard-*.parquet"))  # nothing was sampled
    return outcome


TEN_MB = "sort: " + "z y x " * 1_750_000  # 10.5 MB

# A "billion laughs": eight levels of nine aliases each expand to 9^8 (43 million) values.
ALIAS_BOMB = (
    "a: &a [x, x, x, x, x, x, x, x, x]\n"
    + "".join(f"{child}: &{child} [{', '.join(['*' + parent] * 9)}]\n" for parent, child in zip("abcdefg", "bcdefgh"))
    + "name: *h\n"
)

CASES = [
    # Config files
    Case(
        "yaml-not-a-mapping",
        yaml_file("- curate\n- sample\n"),
        r"ConfigError: .*exp.yaml: expected a mapping of sections",
    ),
    Case("yaml-a-scalar", yaml_file("just some words\n"), r"ConfigError: .*exp.yaml: expected a mapping"),
    Case("yaml-syntax-error", yaml_file("name: [unclosed\n"), r"ConfigError: .*exp.yaml: not valid YAML"),
    Case(
        "yaml-empty-file",
        yaml_file(""),
        r"ConfigError: .*exp.yaml: invalid configuration .*name: required field is missing",
    ),
    Case(
        "typo-top-level-section",
        config_change(lambda raw, tmp: raw.update(trian={"max_steps": 3})),
        r"exit 2: .*trian: unknown key; did you mean `train`\?",
    ),
    Case("typo-nested-key", config_change(section("train", max_step=3)), r"exit 2: .*train.max_step: unknown key"),
    Case(
        "wrong-type-int",
        config_change(section("train", max_steps="ten")),
        r"exit 2: .*train.max_steps: Input should be a valid integer.*\(got 'ten'\)",
    ),
    Case(
        "wrong-type-bool",
        config_change(section("train", bf16="maybe")),
        r"exit 2: .*train.bf16: Input should be a valid boolean",
    ),
    Case(
        "wrong-type-section",
        config_change(lambda raw, tmp: raw.update(sample="teacher")),
        r"exit 2: .*sample: Input should be a valid dictionary",
    ),
    Case(
        "zero-batch-size",
        config_change(section("train", batch_size=0)),
        r"exit 2: .*train.batch_size: Input should be greater than 0",
    ),
    Case(
        "negative-max-new-tokens",
        config_change(section("sample", max_new_tokens=-5)),
        r"exit 2: .*sample.max_new_tokens: Input should be greater than 0",
    ),
    Case(
        "zero-max-rows",
        config_change(section("curate", max_rows=0)),
        r"exit 2: .*curate.max_rows: Input should be greater than 0",
    ),
    Case(
        "negative-shard-rows",
        config_change(section("sample", shard_rows=-1)),
        r"exit 2: .*sample.shard_rows: Input should be greater than 0",
    ),
    Case(
        "temperature-below-zero",
        config_change(section("sample", temperature=-0.5)),
        r"exit 2: .*sample.temperature: Input should be greater than or equal to 0",
    ),
    Case(
        "n-greedy-samples",
        config_change(section("sample", n=4)),
        r"exit 2: .*n=4 greedy responses would all be the same; set temperature > 0",
    ),
    Case(
        "unknown-loss-name",
        config_change(section("train.kd", kind="kl_forward")),
        r"exit 2: .*train.kd.kind: Input should be 'forward_kl', 'reverse_kl'",
    ),
    Case(
        "unknown-method",
        config_change(section("train", method="distill")),
        r"exit 2: .*train.method: Input should be 'sft' or 'kd'",
    ),
    Case(
        "k-larger-than-vocabulary",
        config_change(section("sample", top_k_logprobs=100_000)),
        r"exit 2: .*sample.top_k_logprobs: k=100000 is larger than the teacher's vocabulary \(\d+\); "
        r"use a k of at most",
    ),
    Case(
        "kd-without-top-k",
        config_change(section("sample", top_k_logprobs=0)),
        r"exit 2: .*train.method is `kd` but sample.top_k_logprobs is 0",
    ),
    Case(
        "empty-eval-split",
        config_change(section("curate", max_rows=5, eval_fraction=0.1)),
        r"exit 2: .*the eval set would be empty",
    ),
    Case(
        "bad-override",
        config_change(lambda raw, tmp: None, overrides=("train.max_steps",)),
        r"exit 2: .*--set 'train.max_steps': expected section.key=value",
    ),
    Case(
        "repo-id-dotdot",
        config_change(section("publish", repo_id="alice/..")),
        r"exit 2: .*publish.repo_id: .*must not start or end with `.`",
    ),
    Case(
        "yaml-alias-bomb",
        yaml_file(ALIAS_BOMB),
        r"ConfigError: .*exp.yaml: the YAML expands to more than 100,000 values through its aliases",
    ),
    Case(
        "config-over-1mb",
        yaml_file("name: big\n# " + "x" * 1_100_000 + "\n"),
        r"ConfigError: .*exp.yaml: 1,100,\d+ bytes is too large for a config \(the limit is 1,000,000\)",
    ),
    Case(
        "tag-huge-width",
        config_change(section("publish", tag="{version:>2000000000}")),
        r"exit 2: .*publish.tag: .*keep the format of {version} plain",
    ),
    Case(
        "tag-unknown-field",
        config_change(section("publish", tag="v{version}-{oops}")),
        r"exit 2: .*publish.tag: .*unknown field {oops}; only {version} and {name} are filled in",
    ),
    Case(
        "model-name-slash",
        config_change(section("registry", model_name="team/student")),
        r"exit 2: .*registry.model_name: .*MLflow model names can't contain `/` or `:`",
    ),
    Case(
        "experiment-nul",
        config_change(section("tracking", experiment="runs\x00x")),
        r"exit 2: .*tracking.experiment: .*control or invisible characters \(U\+0000\)",
    ),
    Case(
        "experiment-bidi-override",
        config_change(section("tracking", experiment="abc\u202edcba")),
        r"exit 2: .*tracking.experiment: .*control or invisible characters \(U\+202E\)",
    ),
    Case(
        "repo-id-non-ascii",
        config_change(section("publish", repo_id="alice/stüdent")),
        r"exit 2: .*publish.repo_id: .*is not a Hub repo id: write `namespace/name` with ASCII letters",
    ),
    Case(
        "processes-beyond-the-cores",
        config_change(section("train", num_processes=64, batch_size=64)),
        r"exit 2: .*train.num_processes.*64.*CPU",
    ),
    Case(
        "nodes-without-rendezvous",
        config_change(section("train", nodes=2)),
        r"exit 2: .*train: .*nodes is 2 but rendezvous is not set",
    ),
    Case(
        "served-kd-teacher-without-top-k",
        config_change(section("train.kd", teacher="served")),
        r"exit 2: .*kd.teacher: served needs online_top_k",
    ),
    Case(
        "set-unbalanced-bracket",
        config_change(lambda raw, tmp: None, overrides=("train.max_steps=[1,",)),
        r"exit 2: error: --set 'train.max_steps=\[1,': the value is not valid YAML",
    ),
    Case(
        "set-yaml-tag",
        config_change(lambda raw, tmp: None, overrides=("train.max_steps=!!python/object:os.system ls",)),
        r"exit 2: error: --set .*: the value is not valid YAML \(could not determine a constructor",
    ),
    Case(
        "repo-id-absolute",
        config_change(section("publish", repo_id="/srv/models")),
        r"exit 2: .*publish.repo_id: .*is not a Hub repo id: write `namespace/name`",
    ),
    Case(
        "name-dotdot", config_change(section("", name="..")), r"exit 2: .*name: .*'..' is not usable as a folder name"
    ),
    Case(
        "name-absolute-path", config_change(section("", name="/tmp/x")), r"exit 2: .*name: String should match pattern"
    ),
    Case(
        "teacher-path-missing",
        config_change(lambda raw, tmp: raw["sample"].update(teacher=str(tmp / "nope"))),
        r"exit 2: .*sample.teacher: model path .* does not exist",
    ),
    Case(
        "teacher-dotdot-path",
        config_change(section("sample", teacher="../../no/such/teacher")),
        r"exit 2: .*sample.teacher: model path '../../no/such/teacher' does not exist",
    ),
    Case(
        "data-file-missing",
        config_change(lambda raw, tmp: raw["curate"].update(source=str(tmp / "missing.jsonl"))),
        r"exit 2: .*curate.source: dataset file",
    ),
    # Data rows
    Case(
        "broken-json-line",
        data_file('{"prompt": "unterminated\n'),
        r"InputError: .*data.jsonl: line 31: not valid JSON.*set curate.on_error: skip",
    ),
    Case(
        "broken-json-line-skipped",
        data_file('{"prompt": "unterminated\n', on_error="skip", counted=True),
        r'skipped: .*"skipped_malformed": 1',
    ),
    Case(
        "json-list-not-object", data_file('["a", "list"]\n'), r"InputError: .*line 31: .*is a JSON list, not an object"
    ),
    Case("wrong-type-prompt", data_file('{"prompt": 42}\n'), r"InputError: .*line 31: .*"),
    Case(
        "missing-column",
        data_file('{"question": "where is the prompt?"}\n'),
        r"InputError: .*line 31: has no value in column 'prompt'",
    ),
    Case(
        "empty-string-prompt",
        data_file('{"prompt": ""}\n{"prompt": "   "}\n', counted=True),
        r'skipped: .*"dropped_empty": 2',
    ),
    Case(
        "invalid-utf8",
        data_file('{"prompt": "café"}\n'.encode("latin-1")),
        r"InputError: .*line 31: invalid UTF-8 .*re-encode the file as UTF-8",
    ),
    Case(
        "invalid-utf8-skipped",
        data_file('{"prompt": "café"}\n'.encode("latin-1"), on_error="skip", counted=True),
        r'skipped: .*"skipped_malformed": 1',
    ),
    Case(
        "empty-file",
        lambda tmp, raw: (
            outcome_of(
                lambda: curate(
                    CurateConfig(source=str(Path(tmp / "e.jsonl").resolve()), reference_column=None), Store(tmp / "s")
                )
            )
            if (tmp / "e.jsonl").write_text("") is not None
            else ""
        ),
        r"InputError: .*has no rows",
    ),
    # An answer with no question: the trailing answer is cut (as for full conversations), nothing is left, dropped as
    # empty (tests/test_curate.py).
    Case(
        "roles-assistant-only",
        messages_row(("assistant", "I answer nothing"), counted=True),
        r'skipped: .*"dropped_empty": 1',
    ),
    Case(
        "roles-two-users-in-a-row",
        messages_row(("user", "one"), ("user", "two")),
        r"InputError: .*line 31: .*turn 2 is 'user' where 'assistant' was expected",
    ),
    Case(
        "roles-system-in-the-middle",
        messages_row(("user", "one"), ("assistant", "two"), ("system", "three"), ("user", "four")),
        r"InputError: .*line 31: .*system",
    ),
    Case("roles-unknown-role", messages_row(("wizard", "abracadabra")), r"InputError: .*line 31: .*role 'wizard'"),
    Case(
        "messages-not-a-list",
        data_file(
            '{"messages": {"role": "user", "content": "hi"}}\n',
            good_row=messages_of,
            format="messages",
            prompt_column="messages",
        ),
        r"InputError: .*line 31: column 'messages' holds a dict, not a list of messages",
    ),
    Case(
        "message-content-wrong-type",
        messages_row(("user", {"text": "a dict"})),
        r"InputError: .*line 31: .*message 1 content",
    ),
    Case(
        "prompt-10mb-length-filter",
        data_file(json.dumps({"prompt": TEN_MB}) + "\n", filters={"length": {"max_chars": 100_000}}, counted=True),
        r'skipped: .*"dropped_too_long_chars": 1',
    ),
    Case(
        "prompt-10mb-sampled",
        huge_prompt_sampled,
        r"InputError: prompt '.+' \(\w+ split\): \d+ tokens \+ max_new_tokens 4 exceed the teacher's context of 128; "
        r"set sample.overlong_prompts",
    ),
]


# Tokenizing a 10 MB prompt takes ~25 s: that case belongs to the full suite, not the quick loop.
SLOW_CASES = {"prompt-10mb-sampled"}


@pytest.mark.parametrize(
    "case",
    [pytest.param(case, marks=pytest.mark.slow) if case.id in SLOW_CASES else case for case in CASES],
    ids=[case.id for case in CASES],
)
def test_bad_input_gives_a_clear_error_or_a_counted_skip(case, tmp_path, pipeline_raw):
    outcome = case.run(tmp_path, pipeline_raw)
    print(
        f"\n| {case.id} | {' / '.join(line.strip() for line in outcome.strip().splitlines())[:400]} |"
    )  # a row of the closing table
    assert "Traceback" not in outcome
    assert re.search(case.expect, outcome, re.DOTALL), outcome


def test_a_teacher_revision_that_does_not_exist_is_named(hub, tiny_teacher, monkeypatch):
    """On the loopback Hub: the repo exists, the branch doesn't; refused from the config alone, before weights."""
    upload_to_default_hub(hub, monkeypatch, tiny_teacher, "alice/teacher")
    assert check_teacher(SampleConfig(teacher="alice/teacher", revision="main")).vocab_size > 0
    outcome = outcome_of(lambda: check_teacher(SampleConfig(teacher="alice/teacher", revision="no-such-branch")))
    print(f"\n| teacher-revision-missing | {outcome[:300]} |")
    assert re.search(
        r"InputError: sample.teacher/sample.revision: cannot read 'alice/teacher' at revision 'no-such-branch' "
        r".*check the id and revision",
        outcome,
    ), outcome


def test_an_unreachable_hub_fails_validate_once_naming_the_teacher_and_the_fix(tmp_path, pipeline_raw):
    """`stillhouse validate` with a Hub teacher while the Hub drops every connection and the cache is empty: one
    round of the Hub client's retries, not a second one through transformers (with refused connections each round
    is about 25 s of backoff), then an error that says the Hub can't be reached and what to do. The endpoint is a
    local socket that accepts and closes; it counts the attempts."""
    import os
    import socket
    import subprocess
    import sys
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    attempts = []

    def drop_connections() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:  # closed at the end of the test
                return
            attempts.append(1)
            connection.close()

    threading.Thread(target=drop_connections, daemon=True).start()
    raw = {**pipeline_raw, "sample": {**pipeline_raw["sample"], "teacher": "example-org/hub-teacher"}}
    config = tmp_path / "hub-teacher.yaml"
    config.write_text(yaml.safe_dump(raw))
    env = {
        **os.environ,
        "HF_ENDPOINT": f"http://127.0.0.1:{listener.getsockname()[1]}",
        "HF_HOME": str(tmp_path / "empty-hf-home"),
    }
    try:
        validated = subprocess.run(
            [sys.executable, "-m", "stillhouse.flows.cli", "validate", str(config)],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
    finally:
        listener.close()
    assert validated.returncode == 2, validated.stderr[-2000:]
    assert "sample.teacher/sample.revision: cannot read 'example-org/hub-teacher'" in validated.stderr
    assert "the Hub can't be reached and the local cache has no copy" in validated.stderr
    assert "Traceback" not in validated.stderr
    # At most one file's request and its 5 retries (the client retries a dropped connection once).
    assert len(attempts) <= 6, f"{len(attempts)} connections"
