"""The engine protocol: every engine has its one signature; the `hf` engine equals the batched `generate` it
wraps; the `vllm` engine reads vLLM's outputs right (against a stand-in `vllm` module: no GPU here); the tail helper."""

import inspect
import math
import sys
import types

import pytest

from stillhouse.config import OpenAIEngineConfig, SampleConfig
from stillhouse.models import load_causal_lm, load_tokenizer
from stillhouse.sampling import vllm_engine
from stillhouse.sampling.engine import Engine, Generation, Prompt, SamplingSettings, tail_logprob
from stillhouse.sampling.hf_engine import HFEngine, generate, render_prompts
from stillhouse.sampling.openai_engine import OpenAIEngine
from stillhouse.sampling.vllm_engine import VLLMEngine

ENGINES = [HFEngine, VLLMEngine, OpenAIEngine]
CONVERSATIONS = [[{"role": "user", "content": text}] for text in ["sort letters: dcba", "reverse: hello there", "hi"]]


@pytest.mark.parametrize("engine", ENGINES, ids=lambda engine: engine.__name__)
def test_every_engine_has_the_protocols_signatures(engine):
    for name in ("generate", "close"):
        wanted = inspect.signature(getattr(Engine, name))
        got = inspect.signature(getattr(engine, name))
        # Names, kinds, defaults and annotations (strings under `from __future__ import annotations`) all match.
        assert got == wanted, f"{engine.__name__}.{name}{got} differs from Engine.{name}{wanted}"


def test_engines_built_here_are_engines(tiny_teacher):
    model, tokenizer = load_causal_lm(str(tiny_teacher), device="cpu"), load_tokenizer(str(tiny_teacher))
    served = OpenAIEngine(OpenAIEngineConfig(base_url="http://127.0.0.1:1/v1"), "tiny-teacher")
    try:
        assert isinstance(HFEngine(model, tokenizer), Engine) and isinstance(served, Engine)
    finally:
        served.close()


@pytest.fixture(scope="module")
def teacher(tiny_teacher):
    return load_causal_lm(str(tiny_teacher), device="cpu"), load_tokenizer(str(tiny_teacher))


def fields(generations: list[Generation]) -> list[tuple]:
    return [(g.sample_index, g.token_ids, g.text, g.top_k_ids, g.top_k_logprobs, g.tail_logprobs) for g in generations]


@pytest.mark.parametrize("sampling", [{}, {"temperature": 1.0, "top_k": 20, "n": 2}], ids=["greedy", "sampled"])
def test_the_hf_engine_equals_the_batched_generate_it_wraps(teacher, sampling):
    model, tokenizer = teacher
    rendered = render_prompts(tokenizer, CONVERSATIONS)
    token_ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in rendered]
    settings = SamplingSettings(max_new_tokens=6, top_k_logprobs=3, stop=("zz",), **sampling)
    expected = generate(
        model, tokenizer, token_ids, max_new_tokens=6, batch_size=2, top_k_logprobs=3, stop=["zz"], seed=5, **sampling
    )
    engine = HFEngine(model, tokenizer, batch_size=2)
    finished = []
    prompts = [Prompt(f"p{i}", messages, ids) for i, (messages, ids) in enumerate(zip(CONVERSATIONS, token_ids))]
    got = engine.generate(prompts, settings, seed=5, where="test", on_progress=finished.append)
    assert fields(got) == fields(expected) and sum(finished) == len(CONVERSATIONS)
    # Without token ids, the engine renders the messages itself: the same answers.
    unrendered = [Prompt(f"p{i}", messages) for i, messages in enumerate(CONVERSATIONS)]
    assert fields(engine.generate(unrendered, settings, seed=5, where="test")) == fields(expected)


def test_the_sampling_settings_are_the_configs():
    config = SampleConfig(
        teacher="x", max_new_tokens=9, temperature=0.7, top_p=0.9, top_k=5, n=3, stop=["\n\n"], top_k_logprobs=8
    )
    assert SamplingSettings.from_config(config) == SamplingSettings(
        max_new_tokens=9, temperature=0.7, top_p=0.9, top_k=5, n=3, stop=("\n\n",), top_k_logprobs=8
    )


def test_the_tail_is_what_the_top_k_leave_and_minus_infinity_when_nothing_is_left():
    assert tail_logprob([math.log(0.5), math.log(0.25)]) == pytest.approx(math.log(0.25), abs=1e-12)
    assert tail_logprob([math.log(0.9)]) == pytest.approx(math.log(0.1), abs=1e-12)
    assert tail_logprob([]) == 0.0  # no top-k: the whole mass is the tail
    assert tail_logprob([0.0]) == float("-inf")  # one token holds all of it
    assert tail_logprob([math.log(0.6), math.log(0.6)]) == float("-inf")  # a server's rounding can overshoot 1


def test_the_vllm_engine_turns_vllms_outputs_into_generations(monkeypatch):
    loaded, asked = {}, {}

    def position(*entries):  # (token id, log-prob, rank) -> vLLM's {token id: Logprob}
        return {token_id: types.SimpleNamespace(logprob=logprob, rank=rank) for token_id, logprob, rank in entries}

    class LLM:
        def __init__(self, **settings):
            loaded.update(settings)

        def generate(self, prompts, params, use_tqdm):
            asked.update(prompts=prompts, params=params)
            # Prompt-major outputs, n completions each; the sampled token 9, ranked 5th, rides along at position 0.
            logprobs = [position((9, -3.0, 5), (4, -0.5, 1), (7, -1.5, 2)), position((2, -0.1, 1), (3, -2.5, 2))]
            completions = [
                [
                    types.SimpleNamespace(token_ids=(9, 2), text=f"answer {p} {s}", logprobs=logprobs)
                    for s in range(params["n"])
                ]
                for p in range(len(prompts))
            ]
            return [types.SimpleNamespace(outputs=outputs) for outputs in completions]

    stand_in = types.ModuleType("vllm")
    stand_in.LLM, stand_in.SamplingParams, stand_in.TokensPrompt = LLM, dict, lambda prompt_token_ids: prompt_token_ids
    monkeypatch.setitem(sys.modules, "vllm", stand_in)
    monkeypatch.setattr(vllm_engine, "check_vllm", lambda: None)

    engine = VLLMEngine(
        "/models/teacher", revision=None, dtype="bfloat16", seed=1, gpu_memory_utilization=0.5, max_logprobs=20
    )
    assert loaded == {
        "model": "/models/teacher",
        "revision": None,
        "dtype": "bfloat16",
        "seed": 1,
        "gpu_memory_utilization": 0.5,
        "max_logprobs": 20,
    }
    settings = SamplingSettings(max_new_tokens=4, temperature=0.8, n=2, top_k_logprobs=2)
    finished = []
    generations = engine.generate(
        [Prompt("a", [], [1, 2]), Prompt("b", [], [3])], settings, seed=7, where="shard 0", on_progress=finished.append
    )
    assert asked["prompts"] == [[1, 2], [3]] and finished == [2]
    assert asked["params"] == {
        "n": 2,
        "temperature": 0.8,
        "top_p": 1.0,
        "top_k": -1,
        "max_tokens": 4,
        "stop": None,
        "include_stop_str_in_output": True,
        "seed": 7,
        "logprobs": 2,
    }
    assert [(g.text, g.sample_index) for g in generations] == [
        ("answer 0 0", 0),
        ("answer 0 1", 1),
        ("answer 1 0", 0),
        ("answer 1 1", 1),
    ]
    first = generations[0]
    assert first.token_ids == [9, 2] and first.top_k_ids == [[4, 7], [2, 3]]
    assert first.top_k_logprobs == [[-0.5, -1.5], [-0.1, -2.5]]
    assert first.tail_logprobs == [tail_logprob([-0.5, -1.5]), tail_logprob([-0.1, -2.5])]

    with pytest.raises(ValueError, match=r"shard 0, prompt 'c': the vllm engine takes rendered token ids"):
        engine.generate([Prompt("c", [{"role": "user", "content": "hi"}])], settings, seed=7, where="shard 0")
