"""Cross-tokenizer white-box KD: byte alignment, the teacher→student vocabulary map, and the ULD loss.

A Llama teacher and a Qwen student split the same response text into different tokens. Two things make
their next-token distributions comparable (``train.kd.align``):

    pair = pair_tokenizers(teacher_tokenizer, student_tokenizer)   # once per run: spellings + id map
    targets = offline_targets(pair, "byte", rows, student_response_ids, response_starts, width)  # [B, T, k]
    loss = cross_tokenizer_loss(student_logits, shifted(targets), labels[:, 1:], align="byte", kind="forward_kl")

**Alignment (both modes).** Every token of the response is placed by the UTF-8 byte offset at which it starts
in the response text. A student position j (the distribution predicting student token j) gets a KD target
when some teacher position predicts a token starting at the same byte: both distributions then condition on
the same text and predict what follows it (a shared token boundary). Other student positions get none
(cross-entropy still applies there). Byte starts come from the tokens' spellings (the bytes each id stands
for) when they concatenate to the text, which is exact even for tokens that split a character (byte-level
BPE cuts 😀 into pieces); otherwise from the fast tokenizer's character offsets (``return_offsets_mapping``)
converted to bytes, a token sharing a character with the one before it then having no boundary.

**byte.** Each teacher token t goes to the student token spelled with exactly t's bytes if there is one,
else to the first token of the student's tokenization of t's bytes when that token's bytes begin t's
(byte-prefix: "the" → "th" if the student has no "the"), else to the residual (bytes the student can't start
with, e.g. a partial UTF-8 sequence, or a special token the student has no token of that name for; the
teacher's EOS goes to the student's EOS).
Teacher tokens landing on the same student id are merged (logsumexp), and the result is a `TopK` in the
student's vocabulary: at most k distinct ids, padded to k with distinct unused ids at log-prob −inf. Its
bucket (1 − Σ mapped, which losses.py computes) is the explicit residual: the teacher's top-k tail plus the
unmapped mass, so mapped + residual = 1. The configured ``kind``/``tail`` of `losses.distillation_loss`
then apply unchanged. Padded ids are outcomes the teacher gives probability 0, which ``reverse_kl`` charges
q·(log q + 1e4) (losses.py floors log 0 at −1e4): so they are taken from the student's special tokens first
(pad, chat markers, reserved ids; never its EOS), which it should give no mass inside a response anyway, and
only then from the smallest ids. The other kinds' terms for them are bounded or 0.

**uld** (Universal Logit Distillation, Boizard et al. 2024): the Wasserstein-1 distance between the two
probability vectors sorted in decreasing order, Σ_r |p_(r) − q_(r)|, which needs no token correspondence,
plus ``uld_exact_weight`` × the KL on the tokens both vocabularies spell identically (as TRL's GOLD mixes in).
The teacher is known only through its top-k and the tail mass 1 − Σ top-k, so ranks past k enter as one
aggregate: W1 = Σ_{r≤k} |p_(r) − q_(r)| + |p_tail − Σ_{r>k} q_(r)|, with q_(r) the student's full softmax
sorted. That is a lower bound of the W1 a full teacher would give (|Σ a − Σ b| ≤ Σ |a − b|), exact when the
teacher's top-k holds all its mass, and 0 only when the student's k largest probabilities and its remaining
mass equal the teacher's: it treats the tail as losses.py's ``bucket`` does. The exact-match term is
KL(p_S ‖ q_S) over S, the teacher's top-k tokens with an identically spelled student token, both
distributions renormalized over S (a position with no such token adds 0). With temperature τ the k + 1
outcomes are tempered as losses.py tempers a bucket (divided by τ, renormalized), the exact-match term over S
exactly, and the result is × τ² like every loss in losses.py.

Tokenizers must be fast (`check_alignable`). `check_kd_tokenizers` is the vocabulary rule of ``method: kd``
(training and preflight): one vocabulary, or ``align`` set and both tokenizers alignable.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import NamedTuple

import numpy as np
import torch

from stillhouse.errors import InputError
from stillhouse.models import vocabulary_difference
from stillhouse.training.losses import TopK, distillation_loss

ALIGNS = ("uld", "byte")
# The same floor losses.py puts under log-probabilities: a student log-prob of −inf costs a large finite amount.
_LOG_FLOOR = -1e4
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")
# Probe text for `check_alignable`: ASCII, a two-byte and a four-byte character.
_PROBE = "Hello, wörld 😀!"


class CrossTargets(NamedTuple):
    """KD targets per student position, in the student's vocabulary.

    ``ids`` ``[..., k]`` (long), ``logprobs`` ``[..., k]`` (fp32) and ``mask`` ``[...]`` (bool: True where a
    shared token boundary gives the position a target). ``...`` is ``[n]`` for one response, ``[B, T]`` for a batch.

    - ``align="byte"``: a `TopK` over distinct student ids; the rest of the mass (tail + unmapped) is the bucket.
    - ``align="uld"``: ``logprobs`` are the teacher's own top-k (its vocabulary, not merged) and ``ids`` the student
      token spelled identically to each, or −1 where there is none.
    """

    ids: torch.Tensor
    logprobs: torch.Tensor
    mask: torch.Tensor


# --- tokenizers: offsets and spellings -----------------------------------------------------------


def check_alignable(tokenizer, name: str) -> None:
    """Refuse a tokenizer that can't place its tokens in the text (a slow tokenizer, or one without offsets).

    ``name`` says which one it is in the config (``sample.teacher``, ``train.student``).
    """
    where = f"{name} ({getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__})"
    fix = (
        "Give the model a fast tokenizer: a tokenizer.json in its folder, which AutoTokenizer loads (for a "
        "sentencepiece or vocab-file tokenizer, convert it once with "
        "AutoTokenizer.from_pretrained(path).save_pretrained(path)); or set train.kd.align: none with a student "
        "that shares the teacher's vocabulary."
    )
    if not getattr(tokenizer, "is_fast", False) or getattr(tokenizer, "backend_tokenizer", None) is None:
        raise InputError(
            f"{where}: {type(tokenizer).__name__} is a slow (Python) tokenizer, which gives no character offsets; "
            f"train.kd.align (uld, byte) places teacher and student tokens by their byte offsets in the text. {fix}"
        )
    try:
        offsets = tokenizer(_PROBE, return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"]
    except (NotImplementedError, KeyError, TypeError, ValueError) as error:
        raise InputError(f"{where}: the tokenizer gives no character offsets ({error}). {fix}") from error
    ends = [end for _, end in offsets]
    if not offsets or max(ends) != len(_PROBE) or any(start > end for start, end in offsets):
        raise InputError(
            f"{where}: the tokenizer's character offsets for {_PROBE!r} are {offsets}, which do not cover the text, "
            f"so its tokens can't be placed in it. {fix}"
        )


def check_kd_tokenizers(teacher_tokenizer, student_tokenizer, align: str) -> str | None:
    """White-box KD's vocabulary rule; returns what differs between the vocabularies (None: they are one).

    ``align: none`` compares token ids, so different vocabularies are refused with the fix (`InputError`).
    With ``uld`` or ``byte`` any two tokenizers are accepted that can place their tokens in the text
    (`check_alignable`), the same vocabulary included.
    """
    difference = vocabulary_difference(student_tokenizer, teacher_tokenizer)
    if align == "none":
        if difference is not None:
            raise InputError(
                "train.method: `kd` compares token distributions, but the student's vocabulary differs from the "
                f"teacher's ({difference}): teacher and student tokenize differently. Set train.kd.align: byte "
                "(or uld) to distill across tokenizers, or use method `sft` (black-box) or a student of the "
                "teacher's family"
            )
        return None
    if align not in ALIGNS:
        raise ValueError(f"align must be none or one of {', '.join(ALIGNS)}; got {align!r}")
    check_alignable(teacher_tokenizer, "sample.teacher")
    check_alignable(student_tokenizer, "train.student")
    return difference


def token_spellings(tokenizer) -> list[bytes | None]:
    """The bytes each id stands for in running text, by id; None for special tokens (EOS, chat markers).

    Read from the fast tokenizer's decoder: byte-level BPE (GPT-2, Llama 3, Qwen) maps each character of a token
    back to one byte; sentencepiece-style vocabularies (Llama 2, Mistral, Gemma) spell a space ``▁`` and bytes
    ``<0xNN>``; anything else is its token string in UTF-8. Non-special added tokens are their own text.
    """
    vocabulary = tokenizer.get_vocab()
    size = max(len(tokenizer), max(vocabulary.values()) + 1)
    added = tokenizer.added_tokens_decoder  # id → AddedToken
    special = set(tokenizer.all_special_ids) | {index for index, token in added.items() if token.special}
    spell = _speller(tokenizer)
    spellings: list[bytes | None] = [None] * size
    for token, index in vocabulary.items():
        if index in special:
            continue
        spellings[index] = token.encode("utf-8") if index in added else spell(token)
    return spellings


def _speller(tokenizer):
    """A function from a vocabulary token string to its bytes, chosen by the tokenizer's decoder."""
    decoder = tokenizer.backend_tokenizer.decoder
    steps = [] if decoder is None else [json.loads(decoder.__getstate__())]
    if steps and steps[0]["type"] == "Sequence":
        steps = steps[0]["decoders"]
    types = {step["type"] for step in steps}
    if "ByteLevel" in types:
        to_latin1 = {ord(character): chr(byte) for byte, character in _byte_level_alphabet().items()}

        def byte_level(token: str) -> bytes | None:
            try:
                return token.translate(to_latin1).encode("latin-1")
            except UnicodeEncodeError:  # a character outside the byte alphabet: not a byte-level token
                return token.encode("utf-8")

        return byte_level
    replacements = [(step["pattern"]["String"], step["content"]) for step in steps if step["type"] == "Replace"]
    replacements += [(step["replacement"], " ") for step in steps if step["type"] == "Metaspace"]
    byte_fallback = "ByteFallback" in types

    def plain(token: str) -> bytes:
        if byte_fallback and (match := _BYTE_FALLBACK.fullmatch(token)):
            return bytes([int(match.group(1), 16)])
        for pattern, content in replacements:
            token = token.replace(pattern, content)
        return token.encode("utf-8")

    return plain


def _byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte-level alphabet: byte → the printable character that stands for it in the vocabulary.

    Printable Latin-1 bytes stand for themselves; the other 68 (controls, space, ...) are shifted past 255, in order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    alphabet = {byte: chr(byte) for byte in printable}
    shifted = (byte for byte in range(256) if byte not in alphabet)
    alphabet.update({byte: chr(256 + offset) for offset, byte in enumerate(shifted)})
    return alphabet


def byte_starts(token_ids: Sequence[int], text: str, tokenizer, spellings: Sequence[bytes | None]) -> list[int]:
    """The UTF-8 byte offset in ``text`` at which each token starts; −1 where it can't be placed.

    ``token_ids`` are a tokenization of ``text`` (possibly with special tokens such as a final EOS, which take no
    bytes and start where the text ends). When the spellings concatenate to the text (or to the text after one
    space, which sentencepiece decoders strip) the starts are exact. Otherwise the character offsets of the
    fast tokenizer's own tokenization are used, as far as it agrees with ``token_ids``: a token starts where the
    one before it ended (offsets trimmed of whitespace or of dropped characters still tile the text that way);
    a token that starts inside the previous one's character (a split UTF-8 sequence) has no start.
    """
    text_bytes = text.encode("utf-8")
    pieces = [spellings[i] if 0 <= i < len(spellings) and spellings[i] is not None else b"" for i in token_ids]
    joined = b"".join(pieces)
    if joined in (text_bytes, b" " + text_bytes):
        shift = len(joined) - len(text_bytes)
        return [max(position - shift, 0) for position in accumulate((len(p) for p in pieces), initial=0)][:-1]
    encoding = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    own_ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
    char_to_byte = list(accumulate((len(character.encode("utf-8")) for character in text), initial=0))
    starts = [-1] * len(token_ids)
    previous_end = 0
    agreed = 0
    for j, (expected, own, (start, end)) in enumerate(zip(token_ids, own_ids, offsets)):
        if expected != own:
            break
        if j == 0 or start >= previous_end:
            starts[j] = 0 if j == 0 else char_to_byte[previous_end]
        previous_end = max(previous_end, end)
        agreed = j + 1
    if agreed == len(own_ids):  # the whole text agreed: special tokens after it start at its end
        for j in range(agreed, len(token_ids)):
            if pieces[j]:
                break
            starts[j] = len(text_bytes)
    return starts


def shared_boundaries(teacher_starts: Sequence[int], student_starts: Sequence[int]) -> list[int]:
    """For each student position, the teacher position whose token starts at the same byte, else −1.

    Of several teacher positions at one byte (a zero-width special token before text), the last is taken:
    it predicts the text that follows, as the student's position does.
    """
    where = {start: i for i, start in enumerate(teacher_starts) if start >= 0}
    return [where.get(start, -1) if start >= 0 else -1 for start in student_starts]


# --- the vocabulary map --------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenizerPair:
    """A teacher and a student tokenizer with what aligning them needs, computed once (`pair_tokenizers`).

    ``to_student`` ``[V_teacher]`` (long): the student id each teacher id's mass goes to under ``byte``, −1 for
    the residual. ``exact`` ``[V_teacher]`` (bool): ``to_student`` is spelled identically (each student id
    claimed by at most one teacher id; special tokens of the same name, and the two EOS, count as identical).
    ``padding_order`` ``[V_student]``: the student ids in the order `map_top_k` pads with them (special tokens
    first, EOS last), ``padding_rank`` its inverse (an id's place in that order).
    """

    teacher: object
    student: object
    teacher_spellings: list[bytes | None]
    student_spellings: list[bytes | None]
    to_student: torch.Tensor
    exact: torch.Tensor
    padding_order: torch.Tensor
    padding_rank: torch.Tensor

    @property
    def student_size(self) -> int:
        return len(self.student_spellings)


def pair_tokenizers(teacher, student, *, teacher_name: str = "teacher", student_name: str = "student") -> TokenizerPair:
    """Check both tokenizers (`check_alignable`) and map the teacher's vocabulary onto the student's.

    Exact spellings are one dictionary lookup per teacher token; the rest are tokenized by the student in one
    batch (its Rust tokenizer, all cores), so a 150k vocabulary maps in seconds.
    """
    check_alignable(teacher, teacher_name)
    check_alignable(student, student_name)
    teacher_spellings, student_spellings = token_spellings(teacher), token_spellings(student)
    student_ids: dict[bytes, int] = {}
    for index, spelling in enumerate(student_spellings):
        if spelling:
            student_ids.setdefault(spelling, index)  # the lowest id of several spelled alike
    to_student = [-1] * len(teacher_spellings)
    exact = [False] * len(teacher_spellings)
    claimed: set[int] = set()
    pending: list[tuple[int, bytes, str]] = []  # (teacher id, bytes, text) for the student to tokenize
    for index, spelling in enumerate(teacher_spellings):
        if not spelling:
            continue
        match = student_ids.get(spelling)
        if match is not None:
            to_student[index], exact[index] = match, match not in claimed
            claimed.add(match)
            continue
        try:
            pending.append((index, spelling, spelling.decode("utf-8")))
        except UnicodeDecodeError:  # part of a character: no student token can begin with it for sure
            continue
    encodings = student.backend_tokenizer.encode_batch([text for _, _, text in pending], add_special_tokens=False)
    for (index, spelling, _), encoding in zip(pending, encodings):
        # A normalizer or an added prefix space can make the first token spell something else: then residual.
        first = encoding.ids[0] if encoding.ids else None
        if first is not None and first < len(student_spellings):
            prefix = student_spellings[first]
            if prefix and spelling.startswith(prefix):
                to_student[index] = first
    # Tokens that spell no text (special tokens) are the same token when both vocabularies name them alike
    # ("<|im_end|>" in both), and the two EOS always are.
    student_specials = _special_names(student, student_spellings)
    for name, index in _special_names(teacher, teacher_spellings).items():
        if name in student_specials:
            to_student[index], exact[index] = student_specials[name], True
    if teacher.eos_token_id is not None and student.eos_token_id is not None:
        to_student[teacher.eos_token_id], exact[teacher.eos_token_id] = student.eos_token_id, True
    # Padding order: tokens that never spell text (but EOS), then the others by id, EOS last (a real outcome).
    group = torch.tensor([0 if spelling is None else 1 for spelling in student_spellings])
    if student.eos_token_id is not None:
        group[student.eos_token_id] = 2
    padding_order = (group * len(group) + torch.arange(len(group))).argsort()
    return TokenizerPair(
        teacher,
        student,
        teacher_spellings,
        student_spellings,
        torch.tensor(to_student, dtype=torch.long),
        torch.tensor(exact, dtype=torch.bool),
        padding_order,
        padding_order.argsort(),
    )


def _special_names(tokenizer, spellings: list[bytes | None]) -> dict[str, int]:
    """Token string → id of the tokens that spell no text."""
    ids = [index for index, spelling in enumerate(spellings) if spelling is None]
    names = tokenizer.convert_ids_to_tokens(ids)
    return {name: index for name, index in zip(names, ids) if name is not None}


def _student_ids_of(pair: TokenizerPair, teacher_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(student ids ``[N, k]`` with −1 for the residual, exact ``[N, k]``) of teacher ids ``[N, k]``.

    Ids past the tokenizer (a model's padded vocabulary rows) go to the residual."""
    size = len(pair.to_student)
    known = (teacher_ids >= 0) & (teacher_ids < size)
    safe = teacher_ids.clamp(0, size - 1)
    to_student, exact = pair.to_student.to(teacher_ids.device), pair.exact.to(teacher_ids.device)
    return torch.where(known, to_student[safe], -1), known & exact[safe]


def map_top_k(
    pair: TokenizerPair,
    teacher: TopK,
    tail: torch.Tensor | None = None,
    *,
    k: int | None = None,
) -> tuple[TopK, torch.Tensor]:
    """``byte``: the teacher's top-k mapped onto the student's vocabulary; ``(TopK [N, k], residual [N])``.

    Args:
        teacher: teacher-vocabulary ids and log-probs ``[N, k_t]`` (−inf entries are absent outcomes).
        tail: the log-mass outside the top-k ``[N]``; None takes log(1 − Σ top-k).
        k: the output width, ≥ k_t (default k_t): the number of distinct student ids never exceeds k_t.

    The output ids are distinct per row; teacher tokens mapped to one student id are merged (logsumexp), and
    unused slots hold distinct ids the row doesn't use (special tokens first), at −inf. ``residual`` is the log
    of the tail plus the unmapped mass, so Σ exp(logprobs) + exp(residual) equals the input's total mass.
    """
    ids, logprobs = teacher.ids.long(), teacher.logprobs.float()
    rows, width = ids.shape
    k = width if k is None else k
    if k < width:
        raise ValueError(f"k={k} is below the teacher's top-k ({width}): merged ids could need all {width} slots")
    if k > pair.student_size:
        raise ValueError(
            f"k={k} exceeds the student's vocabulary ({pair.student_size} ids): no room for k distinct ids"
        )
    if k > width:  # absent outcomes fill the extra slots
        ids = torch.cat([ids, ids.new_full((rows, k - width), -1)], -1)
        logprobs = torch.cat([logprobs, logprobs.new_full((rows, k - width), -math.inf)], -1)
    student, _ = _student_ids_of(pair, ids)
    mapped = (student >= 0) & (logprobs > -math.inf)
    if tail is None:
        tail = torch.log((-torch.expm1(logprobs.logsumexp(-1))).clamp(min=0))
    residual = torch.cat([tail.float().unsqueeze(-1), logprobs.masked_fill(mapped, -math.inf)], -1).logsumexp(-1)
    # Merge: sort each row by student id (unmapped last), then logsumexp within runs of equal ids.
    absent = pair.student_size  # sorts after every real id
    keys, order = torch.where(mapped, student, absent).sort(-1)
    sorted_logprobs = logprobs.gather(-1, order).masked_fill(keys == absent, -math.inf)
    run_starts = torch.ones_like(keys, dtype=torch.bool)
    run_starts[:, 1:] = keys[:, 1:] != keys[:, :-1]
    run = run_starts.long().cumsum(-1) - 1  # [N, k] each entry's output slot
    run_max = sorted_logprobs.new_full((rows, k), -math.inf).scatter_reduce(-1, run, sorted_logprobs, "amax")
    terms = torch.where(sorted_logprobs > -math.inf, (sorted_logprobs - run_max.gather(-1, run)).exp(), 0.0)
    merged = run_max + sorted_logprobs.new_zeros((rows, k)).scatter_add(-1, run, terms).log()
    slot_ids = keys.new_full((rows, k), absent).scatter(-1, run, keys)
    # Pad: the free slots take the first ids of `padding_order` the row doesn't use (at most k of the first 2k).
    empty = slot_ids == absent
    candidates = min(2 * k, pair.student_size)
    order = pair.padding_order[:candidates].to(ids.device)
    place = torch.where(empty, candidates, pair.padding_rank.to(ids.device)[slot_ids.clamp(max=absent - 1)])
    used = torch.zeros((rows, candidates), dtype=torch.long, device=ids.device)
    used.scatter_add_(-1, place.clamp(max=candidates - 1), (place < candidates).long())
    free = ((used > 0).long() * candidates + torch.arange(candidates, device=ids.device)).argsort(-1)  # free first
    pad_rank = (empty.long().cumsum(-1) - 1).clamp(min=0)
    out_ids = torch.where(empty, order[free.gather(-1, pad_rank)], slot_ids)
    return TopK(out_ids, merged.masked_fill(empty, -math.inf)), residual


def exact_ids(pair: TokenizerPair, teacher_ids: torch.Tensor) -> torch.Tensor:
    """``uld``: the student id spelled identically to each teacher id ``[N, k]``, else −1."""
    student, exact = _student_ids_of(pair, teacher_ids.long())
    return torch.where(exact, student, -1)


# --- targets for the trainer ---------------------------------------------------------------------


def response_targets(
    pair: TokenizerPair,
    align: str,
    *,
    teacher_ids: Sequence[int],
    teacher: TopK,
    tail: torch.Tensor | None,
    text: str,
    student_ids: Sequence[int],
    k: int | None = None,
) -> CrossTargets:
    """Targets ``[n_s, k]`` / mask ``[n_s]`` for one response, row j for the distribution predicting ``student_ids[j]``.

    Args:
        teacher_ids: the teacher's tokens of the response (as generated or as it tokenized it), EOS included if any.
        teacher: its top-k ids/log-probs ``[n_t, k_t]``, row i the distribution that predicted ``teacher_ids[i]``.
        tail: log-mass outside the top-k ``[n_t]``, or None (1 − Σ top-k).
        text: the response text both tokenizations spell.
        student_ids: the student's tokens of the response (what its labels hold), EOS included if any.
        k: output width (default k_t).
    """
    if align not in ALIGNS:
        raise ValueError(f"align must be one of {', '.join(ALIGNS)} for cross-tokenizer targets; got {align!r}")
    teacher_starts = byte_starts(teacher_ids, text, pair.teacher, pair.teacher_spellings)
    student_starts = byte_starts(student_ids, text, pair.student, pair.student_spellings)
    rows = len(teacher.ids)
    match = torch.tensor([i if i < rows else -1 for i in shared_boundaries(teacher_starts, student_starts)])
    mask = match >= 0
    width = teacher.ids.shape[-1]
    k = width if k is None else k
    ids = torch.arange(k).repeat(len(student_ids), 1)  # unmatched rows: masked, any distinct ids
    logprobs = torch.zeros((len(student_ids), k))
    if mask.any():
        chosen = match[mask]
        top = TopK(teacher.ids[chosen].long(), teacher.logprobs[chosen].float())
        if align == "byte":
            mapped, _ = map_top_k(pair, top, None if tail is None else tail[chosen], k=k)
            ids[mask], logprobs[mask] = mapped.ids, mapped.logprobs
        else:
            if k != width:
                raise ValueError(f"align='uld' keeps the teacher's own top-k: k must be {width}, got {k}")
            ids[mask], logprobs[mask] = exact_ids(pair, top.ids), top.logprobs
    return CrossTargets(ids, logprobs, mask)


def offline_targets(
    pair: TokenizerPair,
    align: str,
    rows: Sequence[Mapping],
    student_response_ids: Sequence[Sequence[int]],
    response_starts: Sequence[int],
    width: int,
    *,
    k: int | None = None,
) -> CrossTargets:
    """Targets ``[B, width, k]`` / mask ``[B, width]`` from stored teacher rows, in label coordinates.

    Args:
        rows: teacher-output rows (mappings with the store's columns ``response_text``, ``response_token_ids``,
            ``top_k_ids``, ``top_k_logprobs`` and optionally ``tail_logprobs``).
        student_response_ids: per row, the student's response tokens as its labels hold them (EOS included).
        response_starts: per row, the label position of the first response token (the prompt's length).
        width: the batch's sequence length; positions past it are dropped (truncated responses).

    Position ``response_starts[b] + j`` holds the target of response token j, as `build_examples` places stored
    top-k: the trainer shifts both by one (``[:, 1:]``) with the labels.
    """
    k = k or len(rows[0]["top_k_ids"][0])
    ids = torch.arange(k).repeat(len(rows), width, 1)
    logprobs = torch.zeros((len(rows), width, k))
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for b, (row, student_ids, start) in enumerate(zip(rows, student_response_ids, response_starts)):
        tail = row.get("tail_logprobs")
        stored_k = len(row["top_k_ids"][0]) if len(row["top_k_ids"]) else k
        targets = response_targets(
            pair,
            align,
            teacher_ids=list(row["response_token_ids"]),
            teacher=TopK(
                _rows(row["top_k_ids"], stored_k, torch.long), _rows(row["top_k_logprobs"], stored_k, torch.float32)
            ),
            tail=None if tail is None else torch.tensor(np.asarray(tail, dtype=np.float32)),
            text=row["response_text"],
            student_ids=list(student_ids),
            k=k,
        )
        _place(ids, logprobs, mask, b, start, targets)
    return CrossTargets(ids, logprobs, mask)


class TeacherSequences(NamedTuple):
    """A batch in the teacher's tokenization: ``input_ids``/``attention_mask`` ``[B, L]`` (right-padded),
    ``response_starts`` (index of each row's first response token) and ``response_ids`` (its response tokens)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_starts: list[int]
    response_ids: list[list[int]]


def teacher_sequences(
    pair: TokenizerPair, prompt_ids: Sequence[Sequence[int]], response_texts: Sequence[str], ended: Sequence[bool]
) -> TeacherSequences:
    """The teacher's tokenization of prompts (already its own ids, e.g. its chat template) + response texts.

    ``ended[b]``: the response ended with EOS (the student stopped), so the teacher's EOS is appended too and
    the two EOS positions align.
    """
    tokenizer = pair.teacher
    responses = tokenizer(list(response_texts), add_special_tokens=False)["input_ids"]
    responses = [ids + [tokenizer.eos_token_id] if stop else ids for ids, stop in zip(responses, ended)]
    sequences = [list(prompt) + response for prompt, response in zip(prompt_ids, responses)]
    length = max(len(sequence) for sequence in sequences)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((len(sequences), length), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for b, sequence in enumerate(sequences):
        input_ids[b, : len(sequence)] = torch.tensor(sequence)
        attention_mask[b, : len(sequence)] = 1
    return TeacherSequences(input_ids, attention_mask, [len(prompt) for prompt in prompt_ids], responses)


def online_targets(
    pair: TokenizerPair,
    align: str,
    teacher_output: torch.Tensor | TopK,
    sequences: TeacherSequences,
    response_texts: Sequence[str],
    student_response_ids: Sequence[Sequence[int]],
    student_response_starts: Sequence[int],
    width: int,
    *,
    k: int,
) -> CrossTargets:
    """Targets ``[B, width, k]`` / mask ``[B, width]`` from a teacher scored online, in the student's label coordinates.

    Args:
        teacher_output: over ``sequences`` (position t predicts token t + 1): dense logits ``[B, L, V_t]`` (or
            ``L − 1`` positions), reduced to their top-k and exact tail mass, or a `TopK` ``[B, L(−1), k_t]``
            of log-probs at τ = 1 (a served teacher's).
        response_texts, student_response_ids, student_response_starts, width: as in `offline_targets`
            (for on-policy rollouts: the decoded student samples, its generated tokens up to the first EOS,
            and the padded prompt width).
        k: top-k kept of dense logits (ignored for a `TopK`, whose k_t is kept).
    """
    k = teacher_output.ids.shape[-1] if isinstance(teacher_output, TopK) else k
    ids = torch.arange(k).repeat(len(response_texts), width, 1)
    logprobs = torch.zeros((len(response_texts), width, k))
    mask = torch.zeros((len(response_texts), width), dtype=torch.bool)
    for b, text in enumerate(response_texts):
        start, teacher_ids = sequences.response_starts[b], sequences.response_ids[b]
        if start < 1:
            raise ValueError(f"row {b}: the teacher's sequence needs a prompt token before the response")
        rows = slice(start - 1, start - 1 + len(teacher_ids))  # the positions predicting the response tokens
        if isinstance(teacher_output, TopK):
            top, tail = TopK(teacher_output.ids[b, rows], teacher_output.logprobs[b, rows].float()), None
        else:
            log_p = teacher_output[b, rows].detach().float().log_softmax(-1)
            values, top_ids = log_p.topk(k, dim=-1)
            top, tail = TopK(top_ids, values), log_p.scatter(-1, top_ids, -math.inf).logsumexp(-1)
        targets = response_targets(
            pair,
            align,
            teacher_ids=teacher_ids,
            teacher=TopK(top.ids.cpu(), top.logprobs.cpu()),
            tail=None if tail is None else tail.cpu(),
            text=text,
            student_ids=list(student_response_ids[b]),
            k=k,
        )
        _place(ids, logprobs, mask, b, student_response_starts[b], targets)
    return CrossTargets(ids, logprobs, mask)


def _rows(values, width: int, dtype: torch.dtype) -> torch.Tensor:
    """``[n, width]`` from a stored list of per-position lists (pandas gives an object array of arrays)."""
    if len(values) == 0:
        return torch.empty((0, width), dtype=dtype)
    return torch.tensor(np.stack([np.asarray(row) for row in values]), dtype=dtype)


def _place(ids, logprobs, mask, row: int, start: int, targets: CrossTargets) -> None:
    """Write one response's targets into batch row ``row`` from label position ``start``; what's past the end drops."""
    length = max(min(len(targets.mask), ids.shape[1] - start), 0)
    ids[row, start : start + length] = targets.ids[:length]
    logprobs[row, start : start + length] = targets.logprobs[:length]
    mask[row, start : start + length] = targets.mask[:length]


# --- losses --------------------------------------------------------------------------------------


def uld_loss(
    student_logits: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    exact_student_ids: torch.Tensor,
    labels: torch.Tensor,
    *,
    exact_weight: float = 1.0,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> torch.Tensor:
    """ULD: W1 between sorted probability vectors + ``exact_weight`` × KL on identically spelled tokens; × τ².

    Args:
        student_logits: ``[B, T, V]``, any float dtype (the student's vocabulary).
        teacher_logprobs: the teacher's top-k log-probs ``[B, T, k]`` at τ = 1, any order (its vocabulary);
            −inf entries are absent. Its tail is 1 − Σ exp(top-k) (0 if that is negative).
        exact_student_ids: ``[B, T, k]``: the student id spelled like each teacher token, −1 for none.
        labels: ``[B, T]``; positions equal to ``ignore_index`` don't count.
        exact_weight: weight of the exact-match KL (``train.kd.uld_exact_weight``); 0 is plain ULD.
        temperature: τ > 0 (see the module docstring).

    Returns the fp32 mean over counted positions (0 when none count). The formula is in the module docstring.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if not (teacher_logprobs.shape == exact_student_ids.shape and teacher_logprobs.shape[:-1] == labels.shape):
        raise ValueError(
            f"teacher_logprobs {tuple(teacher_logprobs.shape)} and exact_student_ids {tuple(exact_student_ids.shape)} "
            f"must both be labels' shape {tuple(labels.shape)} + (k,)"
        )
    if student_logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and labels {tuple(labels.shape)} must share [B, T]"
        )
    counted = labels.ne(ignore_index)
    log_q = student_logits[counted].float().log_softmax(-1)  # [N, V]
    teacher = teacher_logprobs[counted].detach().float()  # [N, k]
    exact = exact_student_ids[counted].long()  # [N, k]
    k, vocab_size = teacher.shape[-1], log_q.shape[-1]

    # W1 over ranks: the student's k largest probabilities, sorted, and the mass of all its others.
    student_top, top_ids = log_q.topk(min(k, vocab_size), dim=-1)  # sorted, descending
    if k < vocab_size:
        student_rest = log_q.scatter(-1, top_ids, -math.inf).logsumexp(-1)
    else:  # nothing past rank k; constant −inf (a logsumexp of only −inf would give NaN gradients)
        student_rest = log_q.new_full(log_q.shape[:-1], -math.inf)
        student_top = torch.cat([student_top, log_q.new_full((len(log_q), k - vocab_size), -math.inf)], -1)
    teacher_top = teacher.sort(-1, descending=True).values
    teacher_rest = torch.log((-torch.expm1(teacher_top.logsumexp(-1))).clamp(min=0))
    p = _tempered(torch.cat([teacher_top, teacher_rest.unsqueeze(-1)], -1), temperature).exp()
    q = _tempered(torch.cat([student_top, student_rest.unsqueeze(-1)], -1), temperature).exp()
    per_position = (p - q).abs().sum(-1)

    if exact_weight > 0:
        shared = (exact >= 0) & (teacher > -math.inf)  # S: top-k tokens the student spells identically
        has_shared = shared.any(-1, keepdim=True)
        # Rows without S get zeros instead of all −inf, so log_softmax (and its gradient) stays finite.
        student_at = log_q.gather(-1, exact.clamp(min=0)).clamp(min=_LOG_FLOOR)
        log_p_s = torch.where(shared, teacher / temperature, -math.inf).where(has_shared, 0.0).log_softmax(-1)
        log_q_s = torch.where(shared, student_at / temperature, -math.inf).where(has_shared, 0.0).log_softmax(-1)
        kl = torch.where(shared, log_p_s.exp() * (log_p_s - log_q_s.clamp(min=_LOG_FLOOR)), 0.0).sum(-1)
        per_position = per_position + exact_weight * kl
    return temperature**2 * per_position.sum() / counted.sum().clamp(min=1)


def _tempered(logprobs: torch.Tensor, temperature: float) -> torch.Tensor:
    """Outcome log-probs ``[N, outcomes]`` divided by τ and renormalized (unchanged at τ = 1)."""
    return logprobs if temperature == 1 else (logprobs / temperature).log_softmax(-1)


def cross_tokenizer_loss(
    student_logits: torch.Tensor,
    targets: CrossTargets,
    labels: torch.Tensor,
    *,
    align: str,
    kind: str = "forward_kl",
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    tail: str = "bucket",
    uld_exact_weight: float = 1.0,
    ignore_index: int = -100,
) -> torch.Tensor:
    """The ``align`` loss of student logits ``[B, T, V]`` against `CrossTargets` ``[B, T, k]`` aligned with
    ``labels`` ``[B, T]`` (already shifted); positions without a target (``mask`` False) don't count.

    ``byte``: `losses.distillation_loss` with the configured ``kind``/``tail`` on the mapped `TopK`.
    ``uld``: `uld_loss`. Scalar, fp32.
    """
    kd_labels = labels.masked_fill(~targets.mask.to(labels.device), ignore_index)
    if align == "byte":
        return distillation_loss(
            student_logits,
            TopK(targets.ids, targets.logprobs),
            kd_labels,
            kind=kind,
            beta=beta,
            alpha=alpha,
            temperature=temperature,
            tail=tail,
            ignore_index=ignore_index,
        )
    if align == "uld":
        return uld_loss(
            student_logits,
            targets.logprobs,
            targets.ids,
            kd_labels,
            exact_weight=uld_exact_weight,
            temperature=temperature,
            ignore_index=ignore_index,
        )
    raise ValueError(f"align must be one of {', '.join(ALIGNS)}; got {align!r}")
