"""What every generation engine shares: the prompt it is given, the sampling settings of one call, the
`Generation` it returns, and the `Engine` protocol the three engines implement.

    settings = SamplingSettings.from_config(config.sample)
    generations = engine.generate([Prompt(prompt_id, messages, token_ids)], settings, seed=seed, where="shard 3 (...)")

The engines are `hf_engine.HFEngine` (transformers in this process), `vllm_engine.VLLMEngine` (vLLM on a
GPU) and `openai_engine.OpenAIEngine` (an OpenAI-compatible endpoint). One call answers every prompt
with ``settings.n`` generations, prompt-major: prompt 0's samples 0..n-1, then prompt 1's. The settings
come with each call, not with the engine, so one loaded teacher serves configs that sample differently.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from stillhouse.config import SampleConfig


@dataclass
class Generation:
    """One generated response.

    ``token_ids`` holds the response tokens up to and including the first EOS (or the token that
    completes a stop string). When top-k capture is on, ``top_k_ids[j]`` and ``top_k_logprobs[j]``
    are the teacher's k most likely tokens for position j of the response and their log-probs under
    its full distribution at temperature 1, whatever the sampling temperature was, and
    ``tail_logprobs[j]`` is the log of the probability mass outside those k tokens.

    An engine that keeps the server's token strings instead of ids (`OpenAIEngine` with
    ``token_ids=False``, for the feedback judge, which reads answer labels such as " A" or "10")
    leaves ``token_ids`` and ``top_k_ids`` empty and fills ``tokens`` (the response's tokens as the
    server spelled them) and ``top_k_tokens`` (the candidates it listed per position) instead.
    """

    token_ids: list[int]
    text: str
    top_k_ids: list[list[int]] | None = None
    top_k_logprobs: list[list[float]] | None = None
    tail_logprobs: list[float] | None = None
    sample_index: int = 0
    tokens: list[str] | None = None
    top_k_tokens: list[list[str]] | None = None


@dataclass(frozen=True)
class SamplingSettings:
    """How one `Engine.generate` call samples: greedy when ``temperature`` is 0.

    ``top_p`` 1 and ``top_k`` 0 turn those filters off; ``top_k_logprobs`` 0 captures no log-probs.
    A response ends at EOS, after ``max_new_tokens``, or with the token that completes a ``stop`` string.
    """

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    n: int = 1
    stop: tuple[str, ...] = ()
    top_k_logprobs: int = 0

    @classmethod
    def from_config(cls, config: SampleConfig) -> SamplingSettings:
        return cls(
            max_new_tokens=config.max_new_tokens,
            temperature=config.temperature,
            top_p=config.top_p,
            top_k=config.top_k,
            n=config.n,
            stop=tuple(config.stop),
            top_k_logprobs=config.top_k_logprobs,
        )


@dataclass(frozen=True)
class Prompt:
    """One prompt for an engine: its id (named in error messages), its chat messages, and its token ids.

    ``token_ids`` are the messages rendered with the teacher's chat template and, where the config
    says so, left-truncated to fit its context; None for an engine that takes the messages (`openai`).
    An `hf` engine renders the messages itself when they are None; a `vllm` engine needs them.
    """

    prompt_id: str
    messages: list[dict]
    token_ids: list[int] | None = None


@runtime_checkable
class Engine(Protocol):
    """A generation engine: `hf`, `vllm` or `openai` (tests/test_engine_protocol.py checks all three)."""

    def generate(
        self,
        prompts: Sequence[Prompt],
        settings: SamplingSettings,
        *,
        seed: int,
        where: str,
        on_progress: Callable[[int], None] | None = None,
    ) -> list[Generation]:
        """``settings.n`` generations per prompt, prompt by prompt, ``sample_index`` 0..n-1 within each.

        A fixed ``seed`` and the same prompts give the same outputs (each engine derives the seeds of its
        batches or requests from it). ``where`` names the call in error messages ("shard 3
        (shard-00003.parquet)"); ``on_progress(count)`` is called as prompts finish, with how many did.
        """
        ...

    def close(self) -> None:
        """Release what the engine holds open (an HTTP client); a loaded model is freed with the engine."""
        ...


def tail_logprob(top_logprobs: Iterable[float]) -> float:
    """log(1 - Σ exp(top)): the log of the mass a position's top-k log-probs leave to the other tokens; -inf if none.

    For engines that are given only the top k (vLLM, a server's ``top_logprobs``): the rest of the
    mass is what the k leave of 1, which loses precision when it is tiny. The `hf` engine sees the whole
    distribution and sums the other tokens exactly instead.
    """
    rest = 1.0 - sum(math.exp(logprob) for logprob in top_logprobs)
    return math.log(rest) if rest > 0 else float("-inf")
