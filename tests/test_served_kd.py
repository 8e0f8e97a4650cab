"""``train.kd.teacher: served``: a teacher behind an OpenAI-compatible server scores the trainer's sequences.

The server is tests/openai_server.py with a REAL tiny model in its process: its ``/v1/completions`` answers
``prompt_logprobs`` in vLLM's format from a forward pass of that model. What is not vLLM is the server
itself (its batching, its kernels); the request and answer formats are vLLM's (`CompletionRequest`,
``choices[].prompt_logprobs``). The same model in this process is the reference: the served top-k must equal
its ``logits.log_softmax(-1).topk(k)``, and a GKD run must log the same losses as with the in-memory teacher.
"""

from __future__ import annotations

import time

import pytest
import torch
from conftest import build_tiny_model, curate_and_sample
from openai_server import FakeOpenAIServer
from servers import free_port
from transformers import AutoModelForCausalLM

from stillhouse.config import OpenAIEngineConfig, TrainConfig
from stillhouse.models import load_tokenizer
from stillhouse.sampling.openai_engine import EngineError
from stillhouse.training.served_teacher import ServedTeacher
from stillhouse.training.stage import train_student

SERVED_NAME = "tiny-teacher"
MAX_LOGPROBS = 20  # the test server's --max-logprobs, vLLM's default
ARCHITECTURE = {"hidden_size": 16, "num_layers": 2, "intermediate_size": 32, "num_heads": 2}


@pytest.fixture(scope="module")
def sharp_teacher(tmp_path_factory):
    """A random teacher with peaked next-token distributions (a random init's are nearly uniform)."""
    folder = build_tiny_model(tmp_path_factory.mktemp("sharp-teacher"), hidden_size=48, seed=2)
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)  # tied: logits scale by about 8 after the final norm
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def server(sharp_teacher):
    with FakeOpenAIServer(sharp_teacher, served_name=SERVED_NAME, max_logprobs=MAX_LOGPROBS) as running:
        yield running


def connection(url: str, **changes) -> OpenAIEngineConfig:
    return OpenAIEngineConfig(base_url=url, api_key_env=None, max_concurrency=4, backoff_seconds=0.0, **changes)


def padded_batch(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Three rows of one length: right-padded, left-padded (as rollouts are), and full."""
    texts = ["sort: dcba", "reverse: hello world", "sort: 93 17 42 8 55"]
    rows = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor(
        [
            rows[0] + [pad] * (width - len(rows[0])),
            [pad] * (width - len(rows[1])) + rows[1],
            rows[2] + [pad] * (width - len(rows[2])),
        ]
    )
    attention_mask = torch.tensor(
        [
            [1] * len(rows[0]) + [0] * (width - len(rows[0])),
            [0] * (width - len(rows[1])) + [1] * len(rows[1]),
            [1] * len(rows[2]) + [0] * (width - len(rows[2])),
        ]
    )
    return input_ids, attention_mask


def test_served_top_k_equals_the_in_process_models_at_every_attended_position(server, sharp_teacher):
    tokenizer = load_tokenizer(str(sharp_teacher))
    input_ids, attention_mask = padded_batch(tokenizer)
    k = MAX_LOGPROBS
    teacher = ServedTeacher(connection(server.url), SERVED_NAME, top_k=k)
    server.requests.clear()
    try:
        served = teacher.top_k(input_ids, attention_mask)
    finally:
        teacher.close()
    batch, length = input_ids.shape
    assert served.ids.shape == served.logprobs.shape == (batch, length - 1, k)
    assert served.ids.dtype == torch.long and served.logprobs.dtype == torch.float32

    # The reference: the model in this process on the padded batch, as the in-memory teacher scores it
    # (positions from the mask, as for left-padded rollouts).
    model = AutoModelForCausalLM.from_pretrained(sharp_teacher).eval()
    with torch.no_grad():
        logits = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=(attention_mask.cumsum(-1) - 1).clamp(min=0),
        ).logits[:, :-1]
    values, ids = logits.float().log_softmax(-1).topk(k, dim=-1)
    predicts = attention_mask[:, :-1].bool() & attention_mask[:, 1:].bool()  # t and t+1 both attended
    assert predicts.sum() == attention_mask.sum() - batch
    assert torch.equal(served.ids[predicts], ids[predicts])
    torch.testing.assert_close(served.logprobs[predicts], values[predicts], atol=1e-4, rtol=0)
    assert (served.ids[~predicts] == 0).all() and (served.logprobs[~predicts] == 0).all()

    # Only each row's attended tokens were sent, as token ids, with vLLM's fields.
    bodies = sorted((request["body"] for request in server.requests), key=lambda body: len(body["prompt"]))
    sent = sorted((row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask)), key=len)
    assert [body["prompt"] for body in bodies] == sent
    assert all(request["path"] == "/v1/completions" for request in server.requests)
    assert all(
        body["model"] == SERVED_NAME and body["max_tokens"] == 1 and body["prompt_logprobs"] == k for body in bodies
    )


def test_rows_go_concurrently_and_retries_are_the_openai_engines(server, sharp_teacher):
    tokenizer = load_tokenizer(str(sharp_teacher))
    input_ids, attention_mask = padded_batch(tokenizer)
    teacher = ServedTeacher(connection(server.url), SERVED_NAME, top_k=4, sleep=lambda seconds: None)
    try:
        reference = teacher.top_k(input_ids, attention_mask)
        server.faults += ["sleep:1.5"] * 3
        started = time.monotonic()
        again = teacher.top_k(input_ids, attention_mask)
        assert time.monotonic() - started < 3.5  # three rows that each take 1.5 s, in flight together (4.5 s if not)
        server.faults += ["500", "429"]
        retried = teacher.top_k(input_ids, attention_mask)
    finally:
        teacher.close()
    for result in (again, retried):
        assert torch.equal(result.ids, reference.ids) and torch.equal(result.logprobs, reference.logprobs)


def test_a_server_without_prompt_logprobs_or_a_k_above_its_limit_is_named(sharp_teacher):
    tokenizer = load_tokenizer(str(sharp_teacher))
    input_ids, attention_mask = padded_batch(tokenizer)
    with FakeOpenAIServer(sharp_teacher, served_name=SERVED_NAME, prompt_logprobs=False) as plain:
        teacher = ServedTeacher(connection(plain.url), SERVED_NAME, top_k=4)
        with pytest.raises(EngineError, match=r"/v1/completions answered without `prompt_logprobs`"):
            teacher.top_k(input_ids, attention_mask)
        assert "failed the probe request" in teacher.probe()
        teacher.close()
    with FakeOpenAIServer(sharp_teacher, served_name=SERVED_NAME, max_logprobs=5) as capped:
        teacher = ServedTeacher(connection(capped.url), SERVED_NAME, top_k=6)
        with pytest.raises(EngineError, match=r"HTTP 400 .* greater than max allowed: 5"):
            teacher.top_k(input_ids, attention_mask)
        teacher.close()
    teacher = ServedTeacher(connection(f"http://127.0.0.1:{free_port()}/v1", max_retries=0), SERVED_NAME, top_k=4)
    assert "ConnectError" in teacher.probe()
    teacher.close()


def gkd_config(kd: dict) -> TrainConfig:
    return TrainConfig.model_validate(
        {
            "architecture": ARCHITECTURE,
            "method": "kd",
            "max_steps": 8,
            "batch_size": 8,
            "learning_rate": 0.01,
            "logging_steps": 1,
            "warmup_ratio": 0.0,
            "ce_weight": 0.5,
            "kd": {"kind": "jsd", "lmbda": 0.5, "rollout_max_new_tokens": 6, "online_top_k": MAX_LOGPROBS, **kd},
        }
    )


def test_gkd_with_the_served_teacher_logs_the_in_memory_teachers_losses(server, sharp_teacher, prompts_jsonl, tmp_path):
    """Needs training/train.py to wire ``kd.teacher: served`` to `ServedTeacher` (another change); fails until then."""
    store, dataset, samples = curate_and_sample(tmp_path / "store", sharp_teacher, prompts_jsonl)
    online = train_student(gkd_config({"teacher": "online"}), dataset, samples, store)
    served_kd = {
        "teacher": "served",
        "served": connection(server.url).model_dump(),
        "served_model": SERVED_NAME,
    }
    server.requests.clear()
    served = train_student(gkd_config(served_kd), dataset, samples, store)
    assert server.requests, "the served teacher was never asked"
    assert [point["step"] for point in served.loss_history] == [point["step"] for point in online.loss_history]
    assert len(online.loss_history) == 8
    for got, want in zip(served.loss_history, online.loss_history):
        assert got["loss"] == pytest.approx(want["loss"], abs=1e-4), (got, want)
