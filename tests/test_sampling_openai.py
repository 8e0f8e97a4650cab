"""The `openai` engine against an OpenAI-compatible server on 127.0.0.1 serving the tiny teacher."""

import json

import numpy as np
import pytest
from openai_server import FakeOpenAIServer

from stillhouse.config import CurateConfig, OpenAIEngineConfig, SampleConfig
from stillhouse.data.curate import curate
from stillhouse.sampling.openai_engine import EngineError
from stillhouse.sampling.sample import sample_teacher
from stillhouse.sampling.teacher_outputs import read_teacher_outputs
from stillhouse.store import Store

KEY = "sk-test-secret-key"


@pytest.fixture(scope="module")
def server(tiny_teacher):
    with FakeOpenAIServer(tiny_teacher) as running:
        yield running


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from stillhouse.demo.tasks import make_examples

    folder = tmp_path_factory.mktemp("openai-data")
    (folder / "prompts.jsonl").write_text("".join(json.dumps(row) + "\n" for row in make_examples(12, seed=3)))
    return curate(CurateConfig(source=str(folder / "prompts.jsonl"), eval_fraction=0.5), Store(folder / "store"))


@pytest.fixture(autouse=True)
def fresh_server(server, monkeypatch):
    server.faults.clear()
    server.requests.clear()
    monkeypatch.setenv("TEST_OPENAI_KEY", KEY)


def openai_config(server, tiny_teacher, **openai) -> SampleConfig:
    settings = {
        "base_url": server.url,
        "api_key_env": "TEST_OPENAI_KEY",
        "max_concurrency": 3,
        "backoff_seconds": 0.0,
        **openai,
    }
    return SampleConfig(
        teacher="tiny-teacher",
        engine="openai",
        max_new_tokens=6,
        top_k_logprobs=4,
        shard_rows=8,
        openai=OpenAIEngineConfig(**settings),
    )


def test_text_and_logprobs_match_the_hf_engine_and_the_key_stays_out_of_the_store(
    server, tiny_teacher, dataset, tmp_path
):
    hf = sample_teacher(
        SampleConfig(teacher=str(tiny_teacher), max_new_tokens=6, top_k_logprobs=4, shard_rows=8),
        dataset,
        Store(tmp_path / "hf"),
    )
    served = sample_teacher(openai_config(server, tiny_teacher), dataset, Store(tmp_path / "openai"))
    expected, rows = read_teacher_outputs(hf.path), read_teacher_outputs(served.path)
    assert served.rows == hf.rows == 12 and served.generated_tokens == hf.generated_tokens
    assert rows["response_text"].tolist() == expected["response_text"].tolist()
    assert [list(ids) for ids in rows["response_token_ids"]] == [list(ids) for ids in expected["response_token_ids"]]
    for got, want in zip(rows.itertuples(), expected.itertuples()):
        assert np.array_equal(np.stack(got.top_k_ids), np.stack(want.top_k_ids))
        np.testing.assert_allclose(
            np.stack(got.top_k_logprobs).astype(float), np.stack(want.top_k_logprobs).astype(float), atol=2e-3
        )
        # The server's tail is 1 - Σ exp(top): the same mass, less exactly.
        np.testing.assert_allclose(
            np.exp(got.tail_logprobs.astype(float)), np.exp(want.tail_logprobs.astype(float)), atol=5e-3
        )

    assert len(server.requests) == 12
    body = server.requests[0]["body"]
    assert (
        body["model"] == "tiny-teacher"
        and body["top_logprobs"] == 4
        and body["logprobs"]
        and body["return_tokens_as_token_ids"]
    )
    assert {r["authorization"] for r in server.requests} == {f"Bearer {KEY}"}
    assert not any(
        KEY in p.read_bytes().decode("utf-8", "replace") for p in (tmp_path / "openai").rglob("*") if p.is_file()
    )


def test_token_strings_map_to_ids_through_the_tokenizer(server, tiny_teacher, dataset, tmp_path):
    config = openai_config(server, tiny_teacher, return_token_ids=False, tokenizer=str(tiny_teacher))
    by_name = read_teacher_outputs(sample_teacher(config, dataset, Store(tmp_path / "names")).path)
    by_id = read_teacher_outputs(
        sample_teacher(openai_config(server, tiny_teacher), dataset, Store(tmp_path / "ids")).path
    )
    assert "return_tokens_as_token_ids" not in server.requests[0]["body"]
    assert [list(ids) for ids in by_name["response_token_ids"]] == [list(ids) for ids in by_id["response_token_ids"]]


def test_a_429_and_a_timeout_are_retried(server, tiny_teacher, dataset, tmp_path):
    server.faults += ["429", "500", "sleep:1.5"]
    samples = sample_teacher(
        openai_config(server, tiny_teacher, max_concurrency=1, timeout_seconds=0.5), dataset, Store(tmp_path)
    )
    assert samples.rows == 12
    assert len(server.requests) == 12 + 3  # each failed try was retried once


def test_retries_give_up_with_an_error_naming_the_shard(server, tiny_teacher, dataset, tmp_path):
    server.faults += ["429"] * 3
    with pytest.raises(EngineError, match=r"shard 0 \(shard-00000.parquet\), prompt '.+': HTTP 429 .* after 3 tries"):
        sample_teacher(openai_config(server, tiny_teacher, max_concurrency=1, max_retries=2), dataset, Store(tmp_path))


def test_a_malformed_response_fails_clearly_naming_the_shard_and_leaves_no_shard(
    server, tiny_teacher, dataset, tmp_path
):
    server.faults += ["malformed"]
    with pytest.raises(
        EngineError, match=r"shard 0 \(shard-00000.parquet\), prompt '.+': malformed response .*KeyError.*content"
    ) as error:
        sample_teacher(openai_config(server, tiny_teacher, max_concurrency=1), dataset, Store(tmp_path))
    assert KEY not in str(error.value)
    assert not list(tmp_path.rglob("shard-*.parquet"))


def test_the_served_tokenizer_and_server_change_the_fingerprint_but_how_it_is_reached_does_not(dataset):
    from stillhouse.sampling.sample import stage_fingerprint

    def served(**openai) -> str:
        config = SampleConfig(
            teacher="tiny-teacher",
            engine="openai",
            max_new_tokens=4,
            openai=OpenAIEngineConfig(**{"base_url": "http://127.0.0.1:1/v1", **openai}),
        )
        return stage_fingerprint(config, dataset, revision="served")

    plain = served()
    assert served(api_key_env="OTHER_KEY", max_concurrency=3, max_retries=1, timeout_seconds=5) == plain
    assert served(tokenizer="/models/tokenizer") != plain
    assert served(return_token_ids=False) != plain
    assert served(base_url="http://127.0.0.1:2/v1") != plain
