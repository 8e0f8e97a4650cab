"""The `vllm` engine: vLLM on a GPU (``pip install stillhouse[vllm]``), with ``logprobs=k`` for top-k capture.

vLLM returns the log-probs of the model's raw distribution (its default ``logprobs_mode``), so
they are the teacher's temperature-1 log-probs whatever the sampling temperature; the tail mass is
what the k of them leave, 1 - Σ exp(top) (`engine.tail_logprob`). Prompts go in as token ids
(rendered and truncated by the caller, like the `hf` engine) and vLLM batches them itself.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

from stillhouse.errors import InputError
from stillhouse.sampling.engine import Generation, Prompt, SamplingSettings, tail_logprob


def vllm_available() -> bool:
    """True when vLLM is installed and a CUDA GPU is present: the only case engine `vllm` runs."""
    try:
        import torch
        import vllm  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def check_vllm() -> None:
    if not vllm_available():
        raise InputError(
            "sample.engine: `vllm` needs vLLM and a CUDA GPU; install it with `pip install stillhouse[vllm]` "
            "on a GPU machine, or use engine `hf`"
        )


class VLLMEngine:
    """A teacher loaded into vLLM, behind the engine protocol (`stillhouse.sampling.engine.Engine`).

    ``seed`` seeds the engine; each call's requests sample under the call's own seed. ``max_logprobs``
    is the largest ``top_k_logprobs`` a call may ask for (vLLM fixes it when it loads the model).
    """

    def __init__(
        self,
        teacher_path: str,
        *,
        revision: str | None,
        dtype: str,
        seed: int,
        gpu_memory_utilization: float,
        max_logprobs: int,
    ):
        from vllm import LLM

        check_vllm()
        self.llm = LLM(
            model=teacher_path,
            revision=revision,
            dtype=dtype,
            seed=seed,
            gpu_memory_utilization=gpu_memory_utilization,
            max_logprobs=max_logprobs,
        )
        self.lock = threading.Lock()  # one call at a time: concurrent shards would only contend for the GPU

    def generate(
        self,
        prompts: Sequence[Prompt],
        settings: SamplingSettings,
        *,
        seed: int,
        where: str,
        on_progress: Callable[[int], None] | None = None,
    ) -> list[Generation]:
        """``settings.n`` generations per prompt, prompt-major; every request samples under ``seed``."""
        from vllm import SamplingParams, TokensPrompt

        for prompt in prompts:
            if prompt.token_ids is None:
                raise ValueError(
                    f"{where}, prompt {prompt.prompt_id!r}: the vllm engine takes rendered token ids; it got none"
                )
        k = settings.top_k_logprobs
        params = SamplingParams(
            n=settings.n,
            temperature=settings.temperature,
            top_p=settings.top_p,
            top_k=settings.top_k or -1,
            max_tokens=settings.max_new_tokens,
            stop=list(settings.stop) or None,
            include_stop_str_in_output=True,
            seed=seed,
            logprobs=k or None,
        )
        with self.lock:
            token_prompts = [TokensPrompt(prompt_token_ids=list(prompt.token_ids)) for prompt in prompts]
            outputs = self.llm.generate(token_prompts, params, use_tqdm=False)
        generations = []
        for output in outputs:
            for sample_index, completion in enumerate(output.outputs):
                generation = Generation(list(completion.token_ids), completion.text, sample_index=sample_index)
                if k:
                    generation.top_k_ids, generation.top_k_logprobs, generation.tail_logprobs = [], [], []
                    for position in completion.logprobs:
                        # k entries by rank, plus the sampled token when it ranked lower: keep the k best.
                        top = sorted(position.items(), key=lambda item: item[1].rank)[:k]
                        generation.top_k_ids.append([token_id for token_id, _ in top])
                        generation.top_k_logprobs.append([entry.logprob for _, entry in top])
                        generation.tail_logprobs.append(tail_logprob(entry.logprob for _, entry in top))
                generations.append(generation)
        if on_progress is not None:
            on_progress(len(prompts))
        return generations

    def close(self) -> None:
        """Nothing to release: vLLM frees the GPU when the engine is garbage-collected."""
