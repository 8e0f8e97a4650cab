"""Batched generation with transformers, capturing the teacher's top-k log-probs per position.

Prompts are sorted by length and batched with left padding, each batch as large as ``batch_size``
prompts and a token budget allow: on a 2-core CPU batching gave about 8x the tokens/s of
one-prompt-at-a-time `generate` with identical greedy outputs (shared/ENVIRONMENT.md;
benchmarks/sampling.py measures it). Results come back in the caller's order.

    from stillhouse.sampling.hf_engine import generate, render_prompts
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class Generation:
    """One generated response.

    ``token_ids`` holds the response tokens up to and including the first EOS (or the token that
    completes a stop string). When top-k capture is on, ``top_k_ids[j]`` and ``top_k_logprobs[j]``
    are the teacher's k most likely tokens for position j of the response and their log-probs under
    its full distribution at temperature 1, whatever the sampling temperature was, and
    ``tail_logprobs[j]`` is the log of the probability mass outside those k tokens.
    """

    token_ids: list[int]
    text: str
    top_k_ids: list[list[int]] | None = None
    top_k_logprobs: list[list[float]] | None = None
    tail_logprobs: list[float] | None = None
    sample_index: int = 0


def render_prompts(tokenizer: PreTrainedTokenizerBase, conversations: Sequence[list[dict]]) -> list[str]:
    """Apply the model's chat template, ending each prompt where the assistant's answer starts."""
    return [
        tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        for messages in conversations
    ]


def plan_batches(lengths: Sequence[int], *, batch_size: int, batch_tokens: int | None, max_new_tokens: int, n: int = 1) -> list[list[int]]:
    """Group prompt indices into batches, shortest prompts first.

    A batch holds at most ``batch_size`` prompts and, with a ``batch_tokens`` budget, at most as many
    as keep ``rows x n x (longest prompt + max_new_tokens)`` within it (always at least one prompt).
    Sorting by length keeps padding, and so wasted compute, small.
    """
    order = sorted(range(len(lengths)), key=lambda index: lengths[index])
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        widest = lengths[index]  # sorted: the newest prompt is the batch's longest
        too_many = len(current) >= batch_size
        over_budget = batch_tokens is not None and (len(current) + 1) * n * (widest + max_new_tokens) > batch_tokens
        if current and (too_many or over_budget):
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


def stop_length(tokenizer: PreTrainedTokenizerBase, tokens: list[int], stop: Sequence[str]) -> int | None:
    """The number of tokens up to and including the one that completes the first stop string, or None."""
    if not stop or not any(s in tokenizer.decode(tokens, skip_special_tokens=True) for s in stop):
        return None
    low, high = 1, len(tokens)  # containment only grows with the prefix: binary search its shortest one
    while low < high:
        middle = (low + high) // 2
        if any(s in tokenizer.decode(tokens[:middle], skip_special_tokens=True) for s in stop):
            high = middle
        else:
            low = middle + 1
    return low


@torch.inference_mode()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str] | Sequence[list[int]],
    *,
    max_new_tokens: int,
    batch_size: int = 64,
    batch_tokens: int | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    n: int = 1,
    stop: Sequence[str] = (),
    top_k_logprobs: int = 0,
    seed: int = 0,
    on_batch: Callable[[int], None] | None = None,
) -> list[Generation]:
    """Generate ``n`` responses per prompt (rendered text or token ids); greedy when ``temperature`` is 0.

    Returns ``n * len(prompts)`` generations, prompt by prompt, ``sample_index`` 0..n-1 within each.
    Batch ``b`` samples under seed ``seed + b``, so a fixed seed and the same prompts give the same
    outputs. ``top_k`` 0 and ``top_p`` 1 turn those filters off, whatever the model's generation_config says. ``on_batch(count)`` is called after each batch with the number of prompts it finished.
    """
    tokenizer.padding_side = "left"
    eos_id = tokenizer.eos_token_id
    encoded = [list(p) if not isinstance(p, str) else tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    batches = plan_batches([len(ids) for ids in encoded], batch_size=batch_size, batch_tokens=batch_tokens, max_new_tokens=max_new_tokens, n=n)
    results: list[Generation | None] = [None] * (len(prompts) * n)
    if temperature > 0:
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": top_k, "num_return_sequences": n}
    else:
        sampling = {"do_sample": False}
    for batch_number, batch_indices in enumerate(batches):
        batch = tokenizer.pad({"input_ids": [encoded[index] for index in batch_indices]}, padding=True, return_tensors="pt").to(model.device)
        torch.manual_seed(seed + batch_number)
        output = model.generate(
            **batch, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos_id,
            return_dict_in_generate=True, output_logits=top_k_logprobs > 0, **sampling,
        )
        new_tokens = output.sequences[:, batch["input_ids"].shape[1] :].tolist()
        if top_k_logprobs > 0:
            # logits: one [rows, vocab] tensor per step, raw (before temperature/top-p processing). Reduce
            # each step to its top-k and tail at once, so [rows, steps, vocab] never exists in fp32.
            per_step = [_top_k_and_tail(step, top_k_logprobs) for step in output.logits]
            top_values = torch.stack([v for v, _, _ in per_step], dim=1).tolist()
            top_ids = torch.stack([i for _, i, _ in per_step], dim=1).tolist()
            tails = torch.stack([t for _, _, t in per_step], dim=1).tolist()
        for row, tokens in enumerate(new_tokens):  # rows are prompt-major: prompt r // n, sample r % n
            prompt_position, sample_index = divmod(row, n if temperature > 0 else 1)
            length = tokens.index(eos_id) + 1 if eos_id in tokens else len(tokens)
            length = min(length, stop_length(tokenizer, tokens[:length], stop) or length)
            kept = tokens[:length]
            generation = Generation(token_ids=kept, text=tokenizer.decode(kept, skip_special_tokens=True), sample_index=sample_index)
            if top_k_logprobs > 0:
                generation.top_k_ids = top_ids[row][:length]
                generation.top_k_logprobs = top_values[row][:length]
                generation.tail_logprobs = tails[row][:length]
            results[batch_indices[prompt_position] * n + sample_index] = generation
        if on_batch is not None:
            on_batch(len(batch_indices))
    return results  # type: ignore[return-value]


def _top_k_and_tail(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k log-probs ``[rows, k]``, their ids, and the log of the rest of the mass ``[rows]``.

    The tail is a log-sum-exp over the other tokens, not log(1 - Σ top): exact even when it is tiny.
    """
    logprobs = logits.float().log_softmax(dim=-1)
    values, ids = logprobs.topk(k, dim=-1)
    tail = torch.logsumexp(logprobs.scatter(-1, ids, float("-inf")), dim=-1)
    return values, ids, tail
