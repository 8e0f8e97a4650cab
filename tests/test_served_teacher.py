"""A served teacher (sample.engine `openai`) through every stage after sampling.

The teacher is the tiny local model behind the in-process OpenAI-compatible server; nothing after the
sample stage may load it. Training learns from the stored responses (and, with the served model's
tokenizer named, its stored top-k), evaluation takes the teacher's answers from the store, and what
would need the teacher's weights is refused with the field to change, before any work.
"""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_model
from openai_server import FakeOpenAIServer
from transformers import AutoTokenizer

from stillhouse.capabilities import TEACHER_WEIGHT_METRICS
from stillhouse.config import (
    ConfigError,
    CurateConfig,
    EvaluateConfig,
    OpenAIEngineConfig,
    SampleConfig,
    TrainConfig,
    parse_config,
)
from stillhouse.data.curate import curate, read_split
from stillhouse.errors import InputError
from stillhouse.evaluation import metrics as m
from stillhouse.evaluation.stage import evaluate_student, read_generations
from stillhouse.models import load_causal_lm
from stillhouse.preflight import preflight
from stillhouse.refs import SamplesRef
from stillhouse.sampling.sample import sample_teacher
from stillhouse.sampling.teacher_outputs import read_teacher_outputs
from stillhouse.store import Store
from stillhouse.training.stage import train_student

SERVED_NAME = "tiny-teacher"


@pytest.fixture(scope="module")
def server(tiny_teacher):
    with FakeOpenAIServer(tiny_teacher, served_name=SERVED_NAME) as running:
        yield running


@pytest.fixture(scope="module")
def tiny_student(tmp_path_factory):
    """A pretrained-looking student with the teacher's (character) tokenizer: a shared vocabulary."""
    return build_tiny_model(tmp_path_factory.mktemp("student"), hidden_size=16, seed=2)


def served_sample(server, tokenizer=None) -> dict:
    openai = {"base_url": server.url, "api_key_env": None, "backoff_seconds": 0.0, "tokenizer": tokenizer}
    return {
        "teacher": SERVED_NAME,
        "engine": "openai",
        "max_new_tokens": 8,
        "top_k_logprobs": 4,
        "shard_rows": 40,
        "openai": openai,
    }


def served_pipeline(pipeline_raw, server, tiny_teacher, tiny_student, *, tokenizer=True, **train) -> dict:
    pipeline_raw["sample"] = served_sample(server, str(tiny_teacher) if tokenizer else None)
    pipeline_raw["train"].pop("architecture")
    pipeline_raw["train"].update(student=str(tiny_student), **train)
    return pipeline_raw


def first_weight(folder) -> torch.Tensor:
    return load_causal_lm(str(folder), device="cpu").model.embed_tokens.weight.detach().clone()


@pytest.mark.integration
def test_the_whole_pipeline_runs_on_a_served_teacher(prefect_harness, pipeline_raw, server, tiny_teacher, tiny_student):
    """curate -> sample (served, top-k) -> kd train -> evaluate -> register, with the teacher never loaded after
    sampling."""
    from stillhouse.flows.distill import distill

    config = parse_config(served_pipeline(pipeline_raw, server, tiny_teacher, tiny_student, method="kd"))
    server.requests.clear()
    result = distill(config, until="register")

    samples = result.samples
    assert samples.teacher_is_served and samples.teacher == SERVED_NAME
    assert samples.teacher_tokenizer == str(tiny_teacher.resolve())
    manifest = json.loads((Path(samples.path) / "manifest.json").read_text())
    assert manifest["teacher_is_served"] is True and manifest["teacher_tokenizer"] == samples.teacher_tokenizer
    # One request per curated prompt, train and eval: training and evaluation asked the server nothing.
    assert len(server.requests) == samples.rows == result.dataset.train_rows + result.dataset.eval_rows

    # The student learned (white-box, from the served teacher's stored top-k): its weights moved, its loss is finite.
    assert result.student.loss_history and math.isfinite(result.student.final_loss)
    assert not torch.equal(first_weight(result.student.model_path), first_weight(tiny_student))

    metrics = result.report.metrics
    # Measured without the teacher's weights: its answers (from the store), the student on its responses.
    for present in (
        "teacher_exact_match",
        "student_exact_match",
        "student_teacher_agreement",
        "student_rouge_l_teacher",
        "student_perplexity",
        "kl_teacher_student",
        "student_top1_agreement",
        "student_parameters",
    ):
        assert present in metrics, present
    for absent in (
        "teacher_perplexity",
        "teacher_reference_perplexity",
        "teacher_parameters",
        "parameter_ratio",
        "teacher_size_mb",
        "size_ratio",
        "teacher_tokens_per_second",
        "speed_ratio",
        "teacher_latency_seconds",
        "latency_ratio",
    ):
        assert absent not in metrics, absent
    assert not TEACHER_WEIGHT_METRICS & set(metrics)  # the list config validation checks gates against

    # The teacher's answers are exactly its stored eval responses, and its exact match is theirs.
    table = read_generations(result.report)
    stored = read_teacher_outputs(samples.path, split="eval").set_index("prompt_id")["response_text"]
    assert table["teacher_answer"].tolist() == [stored[pid] for pid in table["prompt_id"]]
    assert len(table) == result.dataset.eval_rows
    expected = sum(m.exact_match(table["teacher_answer"], table["reference"])) / len(table)
    assert metrics["teacher_exact_match"] == pytest.approx(expected)
    assert json.loads((Path(result.report.path) / "manifest.json").read_text())["teacher_answers"] == "stored"

    assert result.registered is not None and result.registered.version


def sample_served(server, folder, tokenizer=None):
    """(store, dataset, samples): 24 demo prompts curated in ``folder`` and answered by the served teacher."""
    from stillhouse.demo.tasks import make_examples

    (folder / "prompts.jsonl").write_text("".join(json.dumps(row) + "\n" for row in make_examples(24, seed=5)))
    store = Store(folder / "store")
    dataset = curate(
        CurateConfig(source=str(folder / "prompts.jsonl"), category_column="task", eval_fraction=0.25), store
    )
    sample = served_sample(server, tokenizer)
    sample["openai"] = OpenAIEngineConfig(**sample["openai"])
    return store, dataset, sample_teacher(SampleConfig(**sample), dataset, store)


@pytest.fixture(scope="module")
def served_without_tokenizer(server, tmp_path_factory):
    """The served teacher's tokenizer unknown: the server's token ids are kept, but nothing says whose vocabulary they
    are."""
    return sample_served(server, tmp_path_factory.mktemp("served-data"))


def test_a_student_built_from_scratch_takes_the_named_served_tokenizer_and_learns_its_top_k(
    server, tiny_teacher, tmp_path
):
    store, dataset, samples = sample_served(server, tmp_path, tokenizer=str(tiny_teacher))
    assert samples.teacher_is_served and samples.teacher_tokenizer == str(tiny_teacher.resolve())
    shape = {"hidden_size": 16, "num_layers": 1, "intermediate_size": 32, "num_heads": 2}
    config = TrainConfig(architecture=shape, method="kd", max_steps=3, batch_size=4, logging_steps=1, threads=1)
    student = train_student(config, dataset, samples, store)
    assert len(student.loss_history) == 3 and math.isfinite(student.final_loss)
    assert (
        AutoTokenizer.from_pretrained(student.model_path).get_vocab()
        == AutoTokenizer.from_pretrained(tiny_teacher).get_vocab()
    )


def test_black_box_sft_and_evaluation_work_without_the_teachers_tokenizer(served_without_tokenizer, tiny_student):
    store, dataset, samples = served_without_tokenizer
    assert samples.teacher_is_served and samples.teacher_tokenizer is None
    config = TrainConfig(
        student=str(tiny_student),
        method="sft",
        max_steps=4,
        batch_size=4,
        logging_steps=1,
        learning_rate=0.01,
        threads=1,
    )
    student = train_student(config, dataset, samples, store)
    assert len(student.loss_history) == 4 and math.isfinite(student.final_loss)
    assert not torch.equal(first_weight(student.model_path), first_weight(tiny_student))

    report = evaluate_student(EvaluateConfig(max_new_tokens=8, batch_size=16), dataset, samples, student, store)
    metrics = report.metrics
    # The responses were re-tokenized with the student's tokenizer (no shared vocabulary is known): perplexity, no KL.
    assert (
        math.isfinite(metrics["student_perplexity"])
        and "kl_teacher_student" not in metrics
        and "student_top1_agreement" not in metrics
    )
    assert (
        "teacher_exact_match" in metrics and "teacher_perplexity" not in metrics and "teacher_parameters" not in metrics
    )
    eval_prompts = read_split(dataset, "eval")
    stored = read_teacher_outputs(samples.path, split="eval").set_index("prompt_id")["response_text"]
    assert read_generations(report)["teacher_answer"].tolist() == [stored[pid] for pid in eval_prompts["prompt_id"]]


def test_stages_refuse_what_needs_the_served_teachers_weights(served_without_tokenizer, tiny_student, tmp_path):
    """Called directly with hand-built configs (no config validation in front), each stage refuses before any work.

    Config validation refuses these configs first (see the test below), so here the refusal is an internal
    error (AssertionError), with the same message naming the field and the fix.
    """
    _, dataset, samples = served_without_tokenizer
    store = Store(tmp_path / "store")
    from_scratch = TrainConfig(
        architecture={"hidden_size": 16, "num_layers": 1, "intermediate_size": 32, "num_heads": 2},
        max_steps=2,
        batch_size=4,
    )
    with pytest.raises(AssertionError, match="sample.openai.tokenizer"):
        train_student(from_scratch, dataset, samples, store)
    kd = TrainConfig(student=str(tiny_student), method="kd", max_steps=2, batch_size=4)
    with pytest.raises(AssertionError, match=r"sample.openai.tokenizer is null"):
        train_student(kd, dataset, samples, store)
    assert not list((tmp_path / "store").glob("train/*/manifest.json"))
    student = train_student(
        TrainConfig(student=str(tiny_student), max_steps=1, batch_size=4, threads=1), dataset, samples, store
    )
    with pytest.raises(AssertionError, match=r"evaluate.judge_model.*win_rate_judge: verifier"):
        evaluate_student(EvaluateConfig(metrics=["win_rate"]), dataset, samples, student, store)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"tokenizer": False}, r"train.architecture .* set sample.openai.tokenizer .* or set train.student"),
        ({"tokenizer": False, "student": True, "method": "kd"}, r"train.method `kd` .*sample.openai.tokenizer is null"),
        (
            {"student": True, "method": "kd", "kd": {"teacher": "online"}},
            r"can't be loaded here, but train.kd.teacher: online",
        ),
        (
            {"student": True, "evaluate": {"metrics": ["exact_match", "win_rate"]}},
            r"set evaluate.judge_model .* evaluate.win_rate_judge: verifier",
        ),
        (
            {"student": True, "feedback": {}},
            r"set feedback.judge.model .* feedback.judge.engine: openai.*feedback.judge.kind: verifier",
        ),
        (
            {"student": True, "evaluate": {"gate": {"max": {"speed_ratio": 2.0}}}},
            r"evaluate.gate: metric 'speed_ratio' is measured on the teacher's weights",
        ),
        ({"student": True, "evaluate": {"lm_eval": {"tasks": ["x"]}}}, r"evaluate.lm_eval.roles lists `teacher`"),
    ],
)
def test_config_validation_refuses_a_served_teacher_where_its_weights_or_tokenizer_are_needed(
    pipeline_raw, server, tiny_teacher, tiny_student, change, message
):
    pipeline_raw["sample"] = served_sample(server, None if change.get("tokenizer") is False else str(tiny_teacher))
    if change.get("student"):
        pipeline_raw["train"].pop("architecture")
        pipeline_raw["train"]["student"] = str(tiny_student)
    pipeline_raw["train"]["method"] = change.get("method", "sft")
    if "kd" in change:
        pipeline_raw["train"]["kd"] = change["kd"]
    if "evaluate" in change:
        pipeline_raw["evaluate"].update(change["evaluate"])
    if "feedback" in change:
        pipeline_raw["feedback"] = change["feedback"]
    with pytest.raises(ConfigError, match=message):
        parse_config(pipeline_raw)


def test_what_a_served_teacher_allows_passes_validation(pipeline_raw, server, tiny_teacher, tiny_student):
    # Built from scratch with the named tokenizer; a verifier judges win rate; the feedback judge is served too.
    pipeline_raw["sample"] = served_sample(server, str(tiny_teacher))
    pipeline_raw["evaluate"].update(metrics=["exact_match", "win_rate"], win_rate_judge="verifier")
    pipeline_raw["feedback"] = {"judge": {"engine": "openai", "model": SERVED_NAME, "openai": {"base_url": server.url}}}
    preflight(parse_config(pipeline_raw))


def test_preflight_refuses_kd_when_the_student_does_not_share_the_served_tokenizer(
    pipeline_raw, server, tiny_teacher, tmp_path
):
    """`stillhouse validate` (preflight) catches it from tokenizers alone, before anything is sampled."""
    other = build_tiny_model(tmp_path / "other-student", hidden_size=16, seed=3)
    tokenizer = AutoTokenizer.from_pretrained(other)
    tokenizer.add_tokens(["<student-only>"])
    tokenizer.save_pretrained(other)
    served_pipeline(pipeline_raw, server, tiny_teacher, other, method="kd")
    with pytest.raises(InputError, match=r"`kd` compares token distributions.*1 student-only tokens"):
        preflight(parse_config(pipeline_raw))
    assert not (tmp_path / "store").exists()


def test_references_written_before_the_served_fields_still_load():
    old = {
        "stage": "sample",
        "fingerprint": "f",
        "path": "/p",
        "cached": True,
        "rows": 3,
        "teacher": "/models/teacher",
        "teacher_revision": "r",
        "tokenizer_fingerprint": "t",
        "top_k_logprobs": 4,
        "generated_tokens": 12,
    }
    ref = SamplesRef.model_validate(old)
    assert ref.teacher_tokenizer == "/models/teacher" and not ref.teacher_is_served
    served = SamplesRef.model_validate({**old, "teacher": "name", "teacher_is_served": True})
    assert served.teacher_tokenizer is None
    assert SamplesRef.model_validate_json(ref.model_dump_json()) == ref
