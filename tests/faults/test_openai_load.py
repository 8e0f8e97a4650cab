"""Load: 10,000 prompts through the `openai` engine against a server that refuses ~10% of tries with
429 or 503 — every prompt is answered exactly once and lands in the store exactly once.

The server echoes each prompt back (no model), so the test measures the client: concurrency,
retries, and that an answer is never lost, duplicated or attached to the wrong prompt.
"""

import json
import time

import pytest
from openai_server import FakeOpenAIServer

from stillhouse.config import CurateConfig, OpenAIEngineConfig, SampleConfig
from stillhouse.data.curate import curate
from stillhouse.sampling.sample import read_prompts, sample_teacher
from stillhouse.sampling.teacher_outputs import read_teacher_outputs
from stillhouse.store import Store

pytestmark = [pytest.mark.slow, pytest.mark.integration]

PROMPTS = 10_000


def test_ten_thousand_prompts_each_answered_once_through_429s_and_503s(tmp_path, monkeypatch):
    data = tmp_path / "prompts.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"question {i}: what is {i} plus {i * 7 % 101}?"}) + "\n" for i in range(PROMPTS))
    )
    dataset = curate(CurateConfig(source=str(data), reference_column=None), Store(tmp_path / "store"))
    assert dataset.train_rows + dataset.eval_rows == PROMPTS
    monkeypatch.setenv("LOAD_TEST_KEY", "sk-load-test")
    with FakeOpenAIServer(None, served_name="echo", failure_share=0.1, failure_seed=0, record_requests=False) as server:
        config = SampleConfig(
            teacher="echo",
            engine="openai",
            max_new_tokens=32,
            top_k_logprobs=0,
            shard_rows=2500,
            openai=OpenAIEngineConfig(
                base_url=server.url,
                api_key_env="LOAD_TEST_KEY",
                max_concurrency=16,
                max_retries=8,
                backoff_seconds=0.001,
                timeout_seconds=30,
            ),
        )
        started = time.perf_counter()
        samples = sample_teacher(config, dataset, Store(tmp_path / "store"))
        seconds = time.perf_counter() - started

    tries, failures = sum(server.tries.values()), sum(server.failures.values())
    print(
        f"{PROMPTS} prompts in {seconds:.1f} s ({PROMPTS / seconds:.0f}/s); {tries} tries, "
        f"{server.failures[429]} x 429 and {server.failures[503]} x 503 ({failures / tries:.1%})"
    )
    # About 10% of tries failed, both kinds, and each was retried until answered.
    assert 0.08 < failures / tries < 0.12 and server.failures[429] > 0 and server.failures[503] > 0
    assert tries == PROMPTS + failures
    # Every prompt was answered exactly once by the server ...
    assert len(server.answered) == PROMPTS and set(server.answered.values()) == {1}
    # ... and stored exactly once, with its own answer (the echo of its own text).
    assert samples.rows == PROMPTS
    rows = read_teacher_outputs(samples.path)
    assert len(rows) == PROMPTS and not rows["prompt_id"].duplicated().any()
    prompts = read_prompts(dataset).set_index("prompt_id")
    expected = {pid: json.loads(messages)[-1]["content"] for pid, messages in prompts["messages"].items()}
    assert dict(zip(rows["prompt_id"], rows["response_text"])) == expected
    assert all(list(ids) == list(text.encode()) for ids, text in zip(rows["response_token_ids"], rows["response_text"]))
