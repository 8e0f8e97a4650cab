"""Preflight fails fast on an MLflow server that doesn't answer, before any model loads."""

import time

import pytest
from servers import free_port

from stillhouse.errors import StillhouseError
from stillhouse.preflight import check_tracking_server


def test_an_unreachable_tracking_server_is_named_within_seconds():
    uri = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(StillhouseError, match=f"MLflow tracking server at {uri} does not answer"):
        check_tracking_server(uri, timeout_s=5)
    assert time.monotonic() - started < 30


def test_local_tracking_uris_need_no_server():
    check_tracking_server("sqlite:///nowhere/mlflow.db")  # no exception: nothing to reach


SERVED_KD = ["train.kd.teacher=served", "train.kd.online_top_k=20", "train.kd.lmbda=0.5"]


def served_kd_config(pipeline_raw, url: str, *more: str):
    from stillhouse.config import apply_overrides, parse_config

    served = [f"train.kd.served={{base_url: '{url}', api_key_env: null}}", "train.kd.served_model=tiny-teacher"]
    return parse_config(apply_overrides(pipeline_raw, SERVED_KD + served + list(more)))


def test_a_served_kd_teacher_is_probed_once_for_prompt_logprobs(pipeline_raw, tiny_teacher):
    from openai_server import FakeOpenAIServer

    from stillhouse.preflight import preflight

    with FakeOpenAIServer(tiny_teacher, served_name="tiny-teacher") as server:
        preflight(served_kd_config(pipeline_raw, server.url))
        (probe,) = server.requests
        assert probe["path"] == "/v1/completions" and probe["body"]["prompt_logprobs"] == 20

    # A server that ignores the field (not vLLM): the message names the setting, the URL and both fixes.
    with (
        FakeOpenAIServer(tiny_teacher, served_name="tiny-teacher", prompt_logprobs=False) as plain,
        pytest.raises(StillhouseError) as refused,
    ):
        preflight(served_kd_config(pipeline_raw, plain.url))
    message = str(refused.value)
    assert message.startswith("train.kd.teacher: served needs the top-k log-probs of given tokens")
    assert f"{plain.url}/completions" in message and "answered without `prompt_logprobs`" in message
    assert "vllm serve" in message and "train.kd.teacher: offline" in message

    # k above the server's --max-logprobs, and no server at all.
    with (
        FakeOpenAIServer(tiny_teacher, served_name="tiny-teacher", max_logprobs=5) as capped,
        pytest.raises(StillhouseError, match=r"HTTP 400 .* greater than max allowed: 5"),
    ):
        preflight(served_kd_config(pipeline_raw, capped.url))
    url = f"http://127.0.0.1:{free_port()}/v1"
    started = time.monotonic()
    with pytest.raises(StillhouseError, match=rf"train.kd.teacher: served .* {url}/completions.*ConnectError"):
        preflight(served_kd_config(pipeline_raw, url))
    assert time.monotonic() - started < 30  # one try: a preflight doesn't retry a dead server


def test_a_served_kd_teacher_refuses_a_student_of_another_vocabulary(pipeline_raw, tiny_teacher, tmp_path):
    from conftest import build_tiny_model

    from stillhouse.models import load_tokenizer
    from stillhouse.preflight import preflight

    other = build_tiny_model(tmp_path / "other-student", hidden_size=16)
    tokenizer = load_tokenizer(str(other))
    tokenizer.add_tokens(["<tool>"])
    tokenizer.save_pretrained(other)
    config = served_kd_config(
        pipeline_raw, "http://127.0.0.1:9/v1", "train.architecture=null", f"train.student={other}"
    )
    with pytest.raises(StillhouseError, match=r"train.kd.teacher: served sends the student's token ids .*<tool>"):
        preflight(config)  # before the server is asked


def test_more_vllm_gpus_than_this_machine_has_are_refused_before_anything_loads(pipeline_raw, monkeypatch):
    from stillhouse.config import apply_overrides, parse_config
    from stillhouse.preflight import preflight
    from stillhouse.sampling import vllm_engine

    monkeypatch.setattr(vllm_engine, "vllm_available", lambda: True)  # vLLM "installed", with 2 GPUs
    monkeypatch.setattr(vllm_engine, "local_gpu_count", lambda: 2)
    loaded = []
    monkeypatch.setattr(vllm_engine.VLLMEngine, "__init__", lambda self, *a, **k: loaded.append(k))
    config = parse_config(
        apply_overrides(
            pipeline_raw,
            ["sample.engine=vllm", "sample.vllm.tensor_parallel_size=2", "sample.vllm.pipeline_parallel_size=2"],
        )
    )
    with pytest.raises(
        StillhouseError,
        match=r"sample.vllm needs 4 GPUs \(tensor_parallel_size 2 x pipeline_parallel_size 2 x replicas 1\), "
        r"but this machine \(torch.cuda.device_count\(\)\) has 2",
    ):
        preflight(config)
    assert loaded == []


def test_run_checks_the_first_batch_and_validate_every_row(tmp_path, pipeline_raw):
    """`preflight` (run) reads a source's first batch; `validation_summary` (validate) every row, with curation's
    own row errors, and counts what `on_error: skip` would drop."""
    import json

    from stillhouse.config import apply_overrides, parse_config
    from stillhouse.errors import InputError
    from stillhouse.preflight import check_sources, validation_summary

    rows = [json.dumps({"prompt": f"reverse: {'abc'[i % 3]}{i}", "reference": "x"}) for i in range(250)]
    rows[219] = '{"prompt": "reverse: cut'  # line 220, in the third batch of 100
    data = tmp_path / "prompts.jsonl"
    data.write_text("\n".join(rows) + "\n")
    raw = apply_overrides(
        pipeline_raw, [f"curate.source={data}", "curate.batch_rows=100", "curate.category_column=null"]
    )
    config = parse_config(raw)
    check_sources(config)  # the first 100 rows are fine
    with pytest.raises(InputError, match=r"prompts.jsonl: line 220: not valid JSON.*set curate.on_error: skip"):
        validation_summary(config)

    skipping = validation_summary(parse_config(apply_overrides(raw, ["curate.on_error=skip"])))
    (source,) = skipping.sources
    assert (source.rows, source.skipped, source.format) == (249, 1, "columns")
    assert source.train_rows + source.eval_rows == 249 and 0 < source.eval_rows < 249
    assert skipping.store == str((tmp_path / "store").resolve()) and skipping.top_k == 4
