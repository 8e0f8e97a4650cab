"""The `vllm` engine: vLLM on a GPU (``pip install stillhouse[vllm]``), with ``logprobs=k`` for top-k capture.

vLLM returns the log-probs of the model's raw distribution (its default ``logprobs_mode``), so
they are the teacher's temperature-1 log-probs whatever the sampling temperature; the tail mass is
what the k of them leave, 1 - Σ exp(top). Prompts go in as token ids (rendered and truncated by
the caller, like the `hf` engine) and vLLM batches them itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from stillhouse.config import SampleConfig
from stillhouse.errors import InputError
from stillhouse.sampling.hf_engine import Generation


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
        raise InputError("sample.engine: `vllm` needs vLLM and a CUDA GPU; install it with `pip install stillhouse[vllm]` "
                         "on a GPU machine, or use engine `hf`")


class VLLMEngine:
    def __init__(self, config: SampleConfig, teacher_path: str, tokenizer):
        from vllm import LLM

        check_vllm()
        self.config = config
        self.tokenizer = tokenizer
        self.llm = LLM(model=teacher_path, revision=config.revision, dtype=config.dtype if config.dtype != "auto" else "auto",
                       seed=config.seed, gpu_memory_utilization=config.gpu_memory_utilization,
                       max_logprobs=max(20, config.top_k_logprobs))

    def generate(self, prompts: Sequence[list[int]], *, seed: int, on_batch: Callable[[int], None] | None = None) -> list[Generation]:
        from vllm import SamplingParams, TokensPrompt

        config, k = self.config, self.config.top_k_logprobs
        params = SamplingParams(
            n=config.n, temperature=config.temperature, top_p=config.top_p, top_k=config.top_k or -1, max_tokens=config.max_new_tokens,
            stop=list(config.stop) or None, include_stop_str_in_output=True, seed=seed, logprobs=k or None,
        )
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(ids)) for ids in prompts], params, use_tqdm=False)
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
                        rest = 1.0 - sum(math.exp(entry.logprob) for _, entry in top)
                        generation.tail_logprobs.append(math.log(rest) if rest > 0 else float("-inf"))
                generations.append(generation)
        if on_batch is not None:
            on_batch(len(prompts))
        return generations
