"""Batched generation with transformers, capturing the teacher's top-k log-probs per position.

Prompts are sorted by length and batched with left padding, each batch as large as ``batch_size``
prompts and a token budget allow. Results come back in the caller's order.

Greedy decoding runs its own loop (`greedy_batch`) instead of `model.generate`: it retires each row
from the batch and the KV cache as soon as the row has finished, where `generate` keeps computing
finished rows until the batch's longest answer ends, and it skips `generate`'s per-step set-up,
which dominates for small models. Its outputs equal `generate`'s (tested). benchmarks/sampling.py
measures the whole engine at about 10x the tokens/s of one-prompt-at-a-time `generate` on the demo
teacher with both cores of a 2-core CPU (7-8x on one thread), where processing the prompts is more
than half of the time. Sampling (temperature > 0) and models whose generation config changes greedy
decoding (a repetition penalty, forced or suppressed tokens, ...) go through `model.generate`.

    from stillhouse.sampling.hf_engine import generate, render_prompts   # a model at hand (the student, a judge)
    engine = HFEngine(model, tokenizer, batch_size=64)                    # the teacher, as an engine (engine.py)
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from stillhouse.sampling.engine import Generation, Prompt, SamplingSettings


def render_prompts(tokenizer: PreTrainedTokenizerBase, conversations: Sequence[list[dict]]) -> list[str]:
    """Apply the model's chat template, ending each prompt where the assistant's answer starts."""
    return [
        tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        for messages in conversations
    ]


def plan_batches(
    lengths: Sequence[int], *, batch_size: int, batch_tokens: int | None, max_new_tokens: int, n: int = 1
) -> list[list[int]]:
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
    outputs. ``top_k`` 0 and ``top_p`` 1 turn those filters off, whatever the model's generation_config
    says. ``on_batch(count)`` is called after each batch with the number of prompts it finished.
    """
    tokenizer.padding_side = "left"
    eos_id = tokenizer.eos_token_id
    encoded = [
        list(p) if not isinstance(p, str) else tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts
    ]
    batches = plan_batches(
        [len(ids) for ids in encoded],
        batch_size=batch_size,
        batch_tokens=batch_tokens,
        max_new_tokens=max_new_tokens,
        n=n,
    )
    results: list[Generation | None] = [None] * (len(prompts) * n)
    stop_window = 4 * max(
        map(len, stop), default=0
    )  # tokens enough to spell any stop string, even a few characters a token

    def stop_check(tokens: list[int]) -> bool:  # retires a row early; the exact cut is `stop_length`'s, below
        return any(s in tokenizer.decode(tokens[-stop_window:], skip_special_tokens=True) for s in stop)

    if temperature > 0:
        sampling = {
            "do_sample": True,
            "temperature": temperature,
            "top_p": top_p,
            "top_k": top_k,
            "num_return_sequences": n,
        }
    else:
        sampling = {"do_sample": False}
    own_greedy_loop = temperature == 0 and greedy_loop_supported(model)
    for batch_number, batch_indices in enumerate(batches):
        batch = tokenizer.pad(
            {"input_ids": [encoded[index] for index in batch_indices]}, padding=True, return_tensors="pt"
        ).to(model.device)
        if own_greedy_loop:
            new_tokens, top_values, top_ids, tails = greedy_batch(
                model,
                batch["input_ids"],
                batch["attention_mask"],
                max_new_tokens=max_new_tokens,
                eos_token_id=eos_id,
                top_k_logprobs=top_k_logprobs,
                stop_check=stop_check if stop else None,
            )
        else:
            torch.manual_seed(seed + batch_number)
            output = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=eos_id,
                return_dict_in_generate=True,
                output_logits=top_k_logprobs > 0,
                **sampling,
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
            generation = Generation(
                token_ids=kept, text=tokenizer.decode(kept, skip_special_tokens=True), sample_index=sample_index
            )
            if top_k_logprobs > 0:
                generation.top_k_ids = top_ids[row][:length]
                generation.top_k_logprobs = top_values[row][:length]
                generation.tail_logprobs = tails[row][:length]
            results[batch_indices[prompt_position] * n + sample_index] = generation
        if on_batch is not None:
            on_batch(len(batch_indices))
    return results  # type: ignore[return-value]


@dataclass
class HFEngine:
    """The `hf` engine: a model loaded in this process, behind the protocol `stillhouse.sampling.engine.Engine`.

    Each call goes through `generate` above, one batch of up to ``batch_size`` prompts (and within
    ``batch_tokens``) at a time; batch b samples under seed ``seed + b``. Prompts without token ids are
    rendered with the tokenizer's chat template. One call at a time per loaded model: concurrent shards
    would only contend for it, so ``lock`` serialises them; `dataclasses.replace` (another batch size
    over the same model) keeps the lock, shared with the copy.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    batch_size: int = 64
    batch_tokens: int | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def generate(
        self,
        prompts: Sequence[Prompt],
        settings: SamplingSettings,
        *,
        seed: int,
        where: str,
        on_progress: Callable[[int], None] | None = None,
    ) -> list[Generation]:
        """``settings.n`` generations per prompt, prompt-major (``where`` is unused: errors here are this process's)."""
        inputs = [
            render_prompts(self.tokenizer, [prompt.messages])[0] if prompt.token_ids is None else prompt.token_ids
            for prompt in prompts
        ]
        with self.lock:
            return generate(
                self.model,
                self.tokenizer,
                inputs,
                max_new_tokens=settings.max_new_tokens,
                batch_size=self.batch_size,
                batch_tokens=self.batch_tokens,
                temperature=settings.temperature,
                top_p=settings.top_p,
                top_k=settings.top_k,
                n=settings.n,
                stop=settings.stop,
                top_k_logprobs=settings.top_k_logprobs,
                seed=seed,
                on_batch=on_progress,
            )

    def close(self) -> None:
        """Nothing to release: the model is freed with the engine."""


# Generation-config settings under which greedy decoding is not a plain argmax: with any of them set,
# `generate` must do the decoding (it applies the model's generation config on top of ours).
GREEDY_CHANGING_SETTINGS = {
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "min_length": 0,
    "min_new_tokens": None,
    "sequence_bias": None,
    "exponential_decay_length_penalty": None,
}


def greedy_loop_supported(model: PreTrainedModel) -> bool:
    """Whether `greedy_batch` decodes this model exactly as `model.generate(do_sample=False)` would."""
    if model.config.is_encoder_decoder:
        return False
    settings = model.generation_config
    return all(
        getattr(settings, name, neutral) in (neutral, None) for name, neutral in GREEDY_CHANGING_SETTINGS.items()
    )


def cache_argument(model: PreTrainedModel) -> str:
    """The forward's name for the KV cache: `cache` from transformers 5.2x (`past_key_values` is deprecated there,
    with a FutureWarning on every call), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.inference_mode()
def greedy_batch(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_token_id: int | None,
    top_k_logprobs: int = 0,
    stop_check: Callable[[list[int]], bool] | None = None,
) -> tuple[list[list[int]], list | None, list | None, list | None]:
    """Greedy decoding of a left-padded batch ``[rows, prompt]``, retiring rows as they finish.

    A row finishes at EOS, at ``max_new_tokens`` or when ``stop_check(tokens)`` says so; its KV-cache
    entries are dropped at once, so later steps compute only the rows still running. Positions follow
    the attention mask, as `generate` computes them for left padding. Returns per row its new tokens
    and, with ``top_k_logprobs``, per position the top-k log-probs, their ids and the tail's log-mass
    (temperature 1, like the `generate` path).
    """
    rows = input_ids.shape[0]
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    with_cache = {cache_argument(model): cache, "use_cache": True}
    logits = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, logits_to_keep=1, **with_cache
    ).logits[:, -1]
    tokens: list[list[int]] = [[] for _ in range(rows)]
    captured = [([], [], []) for _ in range(rows)] if top_k_logprobs > 0 else None
    running = list(range(rows))  # batch row -> original row
    next_positions = positions[:, -1:] + 1
    for step in range(max_new_tokens):
        chosen = logits.argmax(-1)
        if captured is not None:
            values, ids, tail = (t.tolist() for t in _top_k_and_tail(logits, top_k_logprobs))
            for batch_row, row in enumerate(running):
                captured[row][0].append(values[batch_row])
                captured[row][1].append(ids[batch_row])
                captured[row][2].append(tail[batch_row])
        still_running = []
        for batch_row, (row, token) in enumerate(zip(running, chosen.tolist())):
            tokens[row].append(token)
            if token != eos_token_id and not (stop_check is not None and stop_check(tokens[row])):
                still_running.append(batch_row)
        if not still_running or step == max_new_tokens - 1:
            break
        if len(still_running) < len(running):
            keep = torch.tensor(still_running, device=input_ids.device)
            cache.batch_select_indices(keep)
            attention_mask, chosen, next_positions = attention_mask[keep], chosen[keep], next_positions[keep]
            running = [running[batch_row] for batch_row in still_running]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(running), 1)], dim=1)
        logits = model(
            input_ids=chosen[:, None], attention_mask=attention_mask, position_ids=next_positions, **with_cache
        ).logits[:, -1]
        next_positions = next_positions + 1
    if captured is None:
        return tokens, None, None, None
    return tokens, [c[0] for c in captured], [c[1] for c in captured], [c[2] for c in captured]


def _top_k_and_tail(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k log-probs ``[rows, k]``, their ids, and the log of the rest of the mass ``[rows]``.

    The tail is a log-sum-exp over the other tokens, not log(1 - Σ top): exact even when it is tiny.
    """
    logprobs = logits.float().log_softmax(dim=-1)
    values, ids = logprobs.topk(k, dim=-1)
    tail = torch.logsumexp(logprobs.scatter(-1, ids, float("-inf")), dim=-1)
    return values, ids, tail
