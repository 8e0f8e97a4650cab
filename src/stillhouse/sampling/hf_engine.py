"""Batched generation with transformers, capturing the teacher's top-k log-probs per position.

Prompts are sorted by length and batched with left padding, each batch as large as ``batch_size``
prompts and a token budget allow. Results come back in the caller's order.

Greedy decoding runs its own loop (`greedy_generate`) instead of `model.generate`: it retires each row
from the batch and the KV cache as soon as the row has finished, where `generate` keeps computing
finished rows until the batch's longest answer ends, and it skips `generate`'s per-step set-up,
which dominates for small models; prompts waiting in the queue join as rows retire (continuous batching). Its
outputs equal `generate`'s (tested). Against the peer a user would write, left-padded batched `model.generate`
with the same batch size (benchmarks/peer_sampling.py, one thread, medians of 3 alternating repeats, 2026-11-30
on a shared 2-core CPU): 1.94x its tokens/s on a decode-dominated shape (a random 50M Llama, 48 prompts of
48-80 tokens, answers of 1-128 tokens, 16 rows at once), 1.74x with top-16 capture, and 1.23x (1.26x) on the
demo teacher, whose answers are about 6 tokens. Keeping the last shared prefix (`_ContinuousBatch.prefill`) then
made the demo teacher 1.13x (1.15x) faster than without it: 1.58x (1.37x) batched `generate` in that run (medians
of 7 alternating repeats; the machine ran at about 0.7x its idle speed). Sampling (temperature > 0) and models
whose generation config changes greedy decoding (a repetition penalty, forced or suppressed tokens, ...) go through
`model.generate`.

    from stillhouse.sampling.hf_engine import generate, render_prompts   # a model at hand (the student, a judge)
    engine = HFEngine(model, tokenizer, batch_size=64)                    # the teacher, as an engine (engine.py)
"""

from __future__ import annotations

import inspect
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer, DynamicSlidingWindowLayer

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
    says. ``on_batch(count)`` is called as prompts finish, with how many did (after each batch when sampling).
    At most ``batch_size`` prompts (and, with ``batch_tokens``, as many as keep ``rows x n x (longest prompt +
    max_new_tokens)`` within it) are decoded at once.
    """
    tokenizer.padding_side = "left"
    eos_id = tokenizer.eos_token_id
    encoded = [
        list(p) if not isinstance(p, str) else tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts
    ]
    stop_window = 4 * max(
        map(len, stop), default=0
    )  # tokens enough to spell any stop string, even a few characters a token

    def stop_check(tokens: list[int]) -> bool:  # retires a row early; the exact cut is `stop_length`'s, below
        return any(s in tokenizer.decode(tokens[-stop_window:], skip_special_tokens=True) for s in stop)

    def finished(tokens: list[int], captured: tuple | None, sample_index: int) -> Generation:
        length = tokens.index(eos_id) + 1 if eos_id in tokens else len(tokens)
        length = min(length, stop_length(tokenizer, tokens[:length], stop) or length)
        kept = tokens[:length]
        generation = Generation(
            token_ids=kept, text=tokenizer.decode(kept, skip_special_tokens=True), sample_index=sample_index
        )
        if captured is not None:
            generation.top_k_logprobs, generation.top_k_ids, generation.tail_logprobs = (c[:length] for c in captured)
        return generation

    longest = max(map(len, encoded), default=0) + max_new_tokens
    if temperature == 0 and greedy_loop_supported(model, longest):
        decoded = greedy_generate(
            model,
            encoded,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos_id,
            batch_size=batch_size,
            batch_tokens=batch_tokens,
            top_k_logprobs=top_k_logprobs,
            stop_check=stop_check if stop else None,
            on_finished=on_batch,
        )
        return [finished(d.tokens, d.captured, 0) for d in decoded]

    if temperature > 0:
        sampling = {
            "do_sample": True,
            "temperature": temperature,
            "top_p": top_p,
            "top_k": top_k,
            "num_return_sequences": n,
        }
    else:
        n, sampling = 1, {"do_sample": False}
    batches = plan_batches(
        [len(ids) for ids in encoded],
        batch_size=batch_size,
        batch_tokens=batch_tokens,
        max_new_tokens=max_new_tokens,
        n=n,
    )
    results: list[Generation | None] = [None] * (len(prompts) * n)
    for batch_number, batch_indices in enumerate(batches):
        batch = tokenizer.pad(
            {"input_ids": [encoded[index] for index in batch_indices]}, padding=True, return_tensors="pt"
        ).to(model.device)
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
        captured = None
        if top_k_logprobs > 0:
            # logits: one [rows, vocab] tensor per step, raw (before temperature/top-p processing). Reduce
            # each step to its top-k and tail at once, so [rows, steps, vocab] never exists in fp32.
            per_step = [_top_k_and_tail(step, top_k_logprobs) for step in output.logits]
            captured = [torch.stack([step[part] for step in per_step], dim=1).tolist() for part in range(3)]
        for row, tokens in enumerate(new_tokens):  # rows are prompt-major: prompt r // n, sample r % n
            prompt_position, sample_index = divmod(row, n)
            row_captured = None if captured is None else tuple(part[row] for part in captured)
            results[batch_indices[prompt_position] * n + sample_index] = finished(tokens, row_captured, sample_index)
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


def greedy_loop_supported(model: PreTrainedModel, longest: int = 0) -> bool:
    """Whether `greedy_generate` decodes this model exactly as `model.generate(do_sample=False)` would.

    It needs a decoder-only model whose generation config leaves greedy decoding a plain argmax, attention
    through `sdpa` or `eager` (it hands the model its own masks), and KV caches that are plain
    tensors per layer: full attention, or a sliding window no shorter than ``longest`` (prompt +
    answer), where the two coincide.
    """
    if model.config.is_encoder_decoder or model.config._attn_implementation not in ("sdpa", "eager"):
        return False
    settings = model.generation_config
    if not all(
        getattr(settings, name, neutral) in (neutral, None) for name, neutral in GREEDY_CHANGING_SETTINGS.items()
    ):
        return False
    try:
        layers = DynamicCache(config=model.config).layers
    except Exception:  # a config DynamicCache cannot lay out (linear attention, ...): leave it to `generate`
        return False
    return bool(layers) and all(
        type(layer) is DynamicLayer or (type(layer) is DynamicSlidingWindowLayer and layer.sliding_window >= longest)
        for layer in layers
    )


def cache_argument(model: PreTrainedModel) -> str:
    """The forward's name for the KV cache: `cache` from transformers 5.2x (`past_key_values` is deprecated there,
    with a FutureWarning on every call), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class SlotLayer(CacheLayerMixin):
    """One layer's keys and values in preallocated buffers ``[slots, kv_heads, width, head_dim]``.

    The rows being decoded are slots ``[0, rows)``; their tokens lie in columns ``[start, end)`` of the
    owning `SlotCache`, each row's right-aligned (the columns before a row's first token are masked).
    A forward writes its new keys in place at ``end`` and attends over ``[start, end + new)``: no
    per-step concatenation, and rows join or leave without copying the others.
    """

    is_sliding = False

    def __init__(self, owner: SlotCache):
        super().__init__()
        self.owner = owner

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise RuntimeError("SlotLayer buffers are allocated by greedy_generate, not by the model")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        rows, new, start, end = key_states.shape[0], key_states.shape[-2], self.owner.start, self.owner.end
        self.keys[:rows, :, end : end + new] = key_states
        self.values[:rows, :, end : end + new] = value_states
        return self.keys[:rows, :, start : end + new], self.values[:rows, :, start : end + new]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return self.owner.end - self.owner.start

    def get_max_length(self) -> int:
        return -1


class SlotCache(Cache):
    """The KV cache of `greedy_generate`: one `SlotLayer` per model layer, sharing the columns ``[start, end)``."""

    def __init__(self, num_layers: int):
        super().__init__(layers=[SlotLayer(self) for _ in range(num_layers)])
        self.start = self.end = 0


@dataclass
class Decoded:
    """One prompt's greedy answer: its new tokens (up to the first EOS, the length limit or a stop string) and,
    with top-k capture, per position its top-k log-probs, their ids and the tail's log-mass (lists)."""

    tokens: list[int]
    captured: tuple[list, list, list] | None = None


# Rows join when at least this share of the slots is free: one prefill forward for several prompts, not one each.
JOIN_FRACTION = 8
# Columns a width reallocation leaves free on the right: rows decode this many steps before the next one.
WIDTH_MARGIN = 64
# Prompts joining together prefill a prefix they share once when that saves at least this many token positions.
SHARED_PREFIX_TOKENS = 32


class _ContinuousBatch:
    """State of `greedy_generate`: the slots, their KV buffers and masks, and what each row has produced.

    Slot tensors (all on the model's device): ``steps`` (tokens generated), ``last`` (the token to feed next),
    ``positions`` (its position id), ``tokens [slots, max_new_tokens]`` and, with top-k capture,
    ``top_values``/``top_ids [slots, max_new_tokens, k]`` and ``tails``. ``mask [slots, width]`` says which
    columns hold a row's tokens. Python lists ``row_of`` and ``prompt_length`` follow the slots.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        slots: int,
        max_new_tokens: int,
        top_k_logprobs: int,
        rows_allowed: Callable[[int], int],
    ):
        self.model, self.slots, self.max_new_tokens, self.k = model, slots, max_new_tokens, top_k_logprobs
        self.rows_allowed = rows_allowed  # most rows at once when the longest prompt has this many tokens
        device = model.device
        self.device = device
        self.rows = 0
        self.longest_prompt = 0
        self.cache: SlotCache | None = None
        self.mask = torch.zeros((slots, 0), dtype=torch.bool, device=device)
        self.steps = torch.zeros(slots, dtype=torch.long, device=device)
        self.last = torch.zeros(slots, dtype=torch.long, device=device)
        self.positions = torch.zeros(slots, dtype=torch.long, device=device)
        self.tokens = torch.zeros((slots, max_new_tokens), dtype=torch.long, device=device)
        if top_k_logprobs:
            self.top_values = torch.zeros((slots, max_new_tokens, top_k_logprobs), device=device)
            self.top_ids = torch.zeros((slots, max_new_tokens, top_k_logprobs), dtype=torch.int32, device=device)
            self.tails = torch.zeros((slots, max_new_tokens), device=device)
        self.row_of: list[int] = [0] * slots
        self.prompt_length: list[int] = [0] * slots
        self.prefix_tokens: list[int] = []  # the last shared prefix prefilled, and its keys and values per layer
        self.prefix: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.cache_name = cache_argument(model)
        self.float_mask = model.config._attn_implementation == "eager"  # eager adds the mask; sdpa takes booleans

    def attention_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """The 4D mask ``[rows, 1, queries, keys]`` the attention takes, from a boolean one."""
        if not self.float_mask:
            return mask
        return torch.zeros(mask.shape, dtype=self.model.dtype, device=mask.device).masked_fill(
            ~mask, torch.finfo(self.model.dtype).min
        )

    def prefill(self, prompts: list[list[int]]) -> tuple[torch.Tensor, DynamicCache, torch.Tensor]:
        """Run ``prompts`` through the model with a cache of their own; returns their next-token logits
        ``[len(prompts), vocab]``, that cache ``[len(prompts), heads, width, dim]`` and its mask ``[len(prompts),
        width]``.

        A prefix all of them share (a system prompt, a task's instruction) runs once and is copied to every row,
        then each row's rest runs after it, left-padded: a row's columns are [prefix, padding, rest], its position
        ids count its own tokens, so each row's keys are what its prompt alone would give. The last prefix's keys
        and values are kept (one row): a later group that starts with it skips its forward. Prompts join in token
        order, so consecutive groups share their instruction: on 256 demo prompts, 14 of the 29 prefill forwards
        recomputed the prefix just computed; with it kept, 19 prefill forwards and 43 forwards in all (were 53).
        """
        count, shortest = len(prompts), min(map(len, prompts))
        shared = 0
        while shared < shortest - 1 and all(prompt[shared] == prompts[0][shared] for prompt in prompts):
            shared += 1  # at most shortest - 1: every row keeps a token of its own to predict from
        kept = len(self.prefix_tokens)
        starts_with_kept = 0 < kept <= shared and prompts[0][:kept] == self.prefix_tokens
        # The kept prefix, unless a longer one saves enough positions to be worth its own forward.
        if starts_with_kept and (count - 1) * (shared - kept) < SHARED_PREFIX_TOKENS:
            shared = kept
            cache = DynamicCache(
                ddp_cache_data=[(k.expand(count, -1, -1, -1), v.expand(count, -1, -1, -1)) for k, v in self.prefix],
                config=self.model.config,
            )
        else:
            if (count - 1) * shared < SHARED_PREFIX_TOKENS:
                shared = 0
            cache = DynamicCache(config=self.model.config)
            if shared:
                self.model(
                    input_ids=torch.tensor([prompts[0][:shared]], device=self.device),
                    attention_mask=torch.ones((1, shared), dtype=torch.long, device=self.device),
                    use_cache=True,
                    logits_to_keep=1,
                    **{self.cache_name: cache},
                )
                # Kept as computed: the copies below and every later update make new tensors, never write these.
                self.prefix_tokens, self.prefix = (
                    prompts[0][:shared],
                    [(layer.keys, layer.values) for layer in cache.layers],
                )
                cache.batch_repeat_interleave(count)
        rests = [prompt[shared:] for prompt in prompts]
        width = max(map(len, rests))
        input_ids = torch.zeros((count, width), dtype=torch.long, device=self.device)
        mask = torch.zeros((count, shared + width), dtype=torch.bool, device=self.device)
        mask[:, :shared] = True
        for row, rest in enumerate(rests):
            input_ids[row, width - len(rest) :] = torch.tensor(rest, device=self.device)
            mask[row, shared + width - len(rest) :] = True
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, shared:]
        logits = self.model(
            input_ids=input_ids,
            attention_mask=mask.long(),
            position_ids=positions,
            logits_to_keep=1,
            use_cache=True,
            **{self.cache_name: cache},
        ).logits[:, -1]
        return logits, cache, mask

    def join(self, prompts: list[list[int]], rows: list[int]) -> torch.Tensor:
        """Prefill ``prompts`` into the next free slots; returns their next-token logits ``[len(prompts), vocab]``."""
        logits, prefill, mask = self.prefill(prompts)
        count, width = mask.shape
        if self.cache is None:
            self.cache = SlotCache(len(prefill.layers))
            for layer, filled in zip(self.cache.layers, prefill.layers):  # shapes and devices from the prefill
                layer.keys = filled.keys.new_zeros((self.slots, *filled.keys.shape[1:2], 0, filled.keys.shape[-1]))
                layer.values = filled.values.new_zeros(
                    (self.slots, *filled.values.shape[1:2], 0, filled.values.shape[-1])
                )
                layer.is_initialized = True
        cache = self.cache
        if self.rows == 0:
            cache.start = cache.end = 0
        self.longest_prompt = max(self.longest_prompt, width)
        if cache.end < width:
            self.repack(left=width)
        first, end = self.rows, cache.end
        for layer, filled in zip(cache.layers, prefill.layers):
            layer.keys[first : first + count, :, end - width : end] = filled.keys
            layer.values[first : first + count, :, end - width : end] = filled.values
        slots = slice(first, first + count)
        self.mask[slots] = False
        self.mask[slots, end - width : end] = mask
        cache.start = min(cache.start, end - width)
        self.positions[slots] = mask.sum(-1)
        self.steps[slots] = 0
        self.row_of[slots] = rows
        self.prompt_length[slots] = [len(prompt) for prompt in prompts]
        self.rows += count
        return logits

    def decode(self) -> torch.Tensor:
        """One forward of every row on its last token; returns the next-token logits ``[rows, vocab]``."""
        cache, rows = self.cache, self.rows
        if cache.end >= self.mask.shape[1]:
            self.repack(left=0)
        self.mask[:rows, cache.end] = True
        mask = self.mask[:rows, cache.start : cache.end + 1][:, None, None, :]
        logits = self.model(
            input_ids=self.last[:rows, None],
            attention_mask=self.attention_mask(mask),
            position_ids=self.positions[:rows, None],
            use_cache=True,
            **{self.cache_name: cache},
        ).logits[:, -1]
        cache.end += 1
        self.positions[:rows] += 1
        return logits

    def repack(self, left: int) -> None:
        """Move the rows' columns into fresh buffers: drop leading columns no row uses, leave at least ``left``
        columns before ``end`` (room for a prompt joining) and `WIDTH_MARGIN` after it.

        Under a token budget, longer prompts allow fewer rows (prompts join shortest first): the slots shrink
        to what the longest prompt so far allows, so the buffers stay within the budget as they widen.
        """
        cache, rows = self.cache, self.rows
        slots = max(rows, 1, min(self.slots, self.rows_allowed(self.longest_prompt)))
        if slots < self.slots:
            self.slots = slots
            for name in ("steps", "last", "positions", "tokens", "top_values", "top_ids", "tails"):
                if hasattr(self, name):
                    setattr(self, name, getattr(self, name)[:slots].clone())
            del self.row_of[slots:], self.prompt_length[slots:]
        used = self.mask[:rows, cache.start : cache.end].any(0)
        first = cache.start + (int(used.float().argmax()) if rows and bool(used.any()) else cache.end - cache.start)
        live = cache.end - first
        end = max(live, left)
        width = end + WIDTH_MARGIN
        mask = torch.zeros((slots, width), dtype=torch.bool, device=self.device)
        mask[:rows, end - live : end] = self.mask[:rows, first : cache.end]
        self.mask = mask
        for layer in cache.layers:
            for name in ("keys", "values"):
                old = getattr(layer, name)
                new = old.new_zeros((slots, old.shape[1], width, old.shape[3]))
                new[:rows, :, end - live : end] = old[:rows, :, first : cache.end]
                setattr(layer, name, new)
        cache.start, cache.end = end - live, end

    def record(self, first: int, logits: torch.Tensor, eos_token_id: int | None, stop_check) -> list[int]:
        """Take the argmax of rows ``[first, rows)`` (and their top-k); returns the slots that have finished."""
        slots = slice(first, self.rows)
        index = torch.arange(first, self.rows, device=self.device)
        steps = self.steps[slots]
        chosen = logits.argmax(-1)
        self.tokens[index, steps] = chosen
        if self.k:
            values, ids, tails = _top_k_and_tail(logits, self.k)
            self.top_values[index, steps] = values
            self.top_ids[index, steps] = ids.to(torch.int32)
            self.tails[index, steps] = tails
        self.last[slots] = chosen
        self.steps[slots] += 1
        done = self.steps[slots] >= self.max_new_tokens
        if eos_token_id is not None:
            done |= chosen == eos_token_id
        finished = (done.nonzero().flatten() + first).tolist()
        if stop_check is not None:  # decodes each running row's tail: only when stop strings are set
            counts = self.steps[slots].tolist()
            finished = sorted(
                set(finished)
                | {
                    first + offset
                    for offset, count in enumerate(counts)
                    if stop_check(self.tokens[first + offset, :count].tolist())
                }
            )
        return finished

    def retire(self, finished: list[int], results: list[Decoded | None]) -> None:
        """Hand finished slots' answers to ``results`` and move the last running rows into their slots."""
        lengths = self.steps[finished].tolist()
        for slot, length in zip(finished, lengths):
            captured = None
            if self.k:
                captured = (
                    self.top_values[slot, :length].tolist(),
                    self.top_ids[slot, :length].tolist(),
                    self.tails[slot, :length].tolist(),
                )
            results[self.row_of[slot]] = Decoded(self.tokens[slot, :length].tolist(), captured)
        remaining = self.rows - len(finished)
        gone = set(finished)
        holes = [slot for slot in finished if slot < remaining]
        movers = [slot for slot in range(remaining, self.rows) if slot not in gone]
        if holes:
            destination = torch.tensor(holes, device=self.device)
            source = torch.tensor(movers, device=self.device)
            cache = self.cache
            columns = slice(cache.start, cache.end)
            for layer in cache.layers:
                layer.keys[destination, :, columns] = layer.keys[source, :, columns]
                layer.values[destination, :, columns] = layer.values[source, :, columns]
            tensors = [self.mask, self.steps, self.last, self.positions, self.tokens]
            if self.k:
                tensors += [self.top_values, self.top_ids, self.tails]
            for tensor in tensors:
                tensor[destination] = tensor[source]
            for hole, mover in zip(holes, movers):
                self.row_of[hole], self.prompt_length[hole] = self.row_of[mover], self.prompt_length[mover]
        self.rows = remaining


@torch.inference_mode()
def greedy_generate(
    model: PreTrainedModel,
    prompts: Sequence[list[int]],
    *,
    max_new_tokens: int,
    eos_token_id: int | None,
    batch_size: int,
    batch_tokens: int | None = None,
    top_k_logprobs: int = 0,
    stop_check: Callable[[list[int]], bool] | None = None,
    on_finished: Callable[[int], None] | None = None,
) -> list[Decoded]:
    """Greedy answers to ``prompts`` (token ids), decoded with continuous batching; in the prompts' order.

    Up to ``batch_size`` rows decode together (fewer where ``batch_tokens`` caps ``rows x (longest prompt +
    max_new_tokens)``). A row finishes at EOS, at ``max_new_tokens`` or when ``stop_check(tokens)`` says so,
    and leaves at once; waiting prompts (shortest first) join in groups as slots free up, so the batch stays
    full until the prompts run out, where `generate` computes finished rows until its batch's longest answer
    ends. Keys and values live in preallocated slots (`SlotCache`); positions follow each row's own tokens,
    as `generate` computes them under left padding, so the tokens are `generate`'s. With ``top_k_logprobs``,
    each position also gets the top-k log-probs, their ids and the tail's log-mass (temperature 1).
    ``on_finished(count)`` is called as rows finish.
    """
    count = len(prompts)
    results: list[Decoded | None] = [None] * count
    if count == 0:
        return []

    def rows_allowed(longest: int) -> int:
        if batch_tokens is None:
            return batch_size
        return max(1, min(batch_size, batch_tokens // (longest + max_new_tokens)))

    # Short prompts first, so a batch's prompts are of about one length (little padding); within a length band
    # (lengths within ~19% of each other) in token order, so prompts that join together share their prefixes.
    waiting = sorted(range(count), key=lambda index: (int(4 * math.log2(max(len(prompts[index]), 1))), prompts[index]))
    slots = min(count, rows_allowed(len(prompts[waiting[0]])))
    batch = _ContinuousBatch(model, slots, max_new_tokens, top_k_logprobs, rows_allowed)
    join_at = max(1, slots // JOIN_FRACTION)
    cursor = 0
    while cursor < count or batch.rows:
        if cursor < count and (batch.rows == 0 or batch.slots - batch.rows >= join_at):
            longest = max(batch.prompt_length[: batch.rows], default=0)
            joining: list[int] = []
            while cursor < count:
                longest = max(longest, len(prompts[waiting[cursor]]))
                if batch.rows + len(joining) >= min(batch.slots, rows_allowed(longest)) and (batch.rows or joining):
                    break
                joining.append(waiting[cursor])
                cursor += 1
            if joining:
                first = batch.rows
                logits = batch.join([list(prompts[index]) for index in joining], joining)
                finished = batch.record(first, logits, eos_token_id, stop_check)
                if finished:
                    batch.retire(finished, results)
                    if on_finished is not None:
                        on_finished(len(finished))
        if batch.rows:
            logits = batch.decode()
            finished = batch.record(0, logits, eos_token_id, stop_check)
            if finished:
                batch.retire(finished, results)
                if on_finished is not None:
                    on_finished(len(finished))
    return results  # type: ignore[return-value]


def _top_k_and_tail(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k log-probs ``[rows, k]``, their ids, and the log of the rest of the mass ``[rows]``.

    The tail is a log-sum-exp over the other tokens, not log(1 - Σ top): exact even when it is tiny.
    """
    logprobs = logits.float().log_softmax(dim=-1)
    values, ids = logprobs.topk(k, dim=-1)
    tail = torch.logsumexp(logprobs.scatter(-1, ids, float("-inf")), dim=-1)
    return values, ids, tail
