"""Cross-tokenizer KD: byte alignment, the byte-prefix vocabulary map and the ULD loss.

Tokenizers are built on the spot: the demo's character tokenizer (plus a few multi-byte characters) and
byte-level BPEs trained with `tokenizers` on demo prompts. Nothing is downloaded.
"""

import math
import random
import time
from itertools import accumulate

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import ByT5Tokenizer, PreTrainedTokenizerFast

from stillhouse.demo.tasks import make_examples
from stillhouse.demo.tokenizer import CHARACTERS, EOS, PAD, SPECIAL_TOKENS, UNK
from stillhouse.errors import InputError
from stillhouse.training.cross_tokenizer import (
    CrossTargets,
    _byte_level_alphabet,
    byte_starts,
    check_alignable,
    cross_tokenizer_loss,
    exact_ids,
    map_top_k,
    offline_targets,
    online_targets,
    pair_tokenizers,
    response_targets,
    shared_boundaries,
    teacher_sequences,
    uld_loss,
)
from stillhouse.training.losses import KINDS, TAILS, TopK, distillation_loss

MULTIBYTE = "éïü中文😀"  # 2-, 3- and 4-byte characters
MULTIBYTE_TEXT = "naïve café: 中文 😀!"


def demo_texts(count: int, seed: int) -> list[str]:
    return [f"{row['prompt']} -> {row['reference']}" for row in make_examples(count, seed)]


def byte_level_bpe(vocab_size: int, seed: int = 0) -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE trained on demo prompts (ASCII only: other characters stay single bytes)."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=True)  # as GPT-2's: offsets trimmed of spaces
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(demo_texts(400, seed), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS, pad_token=PAD)


def character_tokenizer(extra: str = MULTIBYTE) -> PreTrainedTokenizerFast:
    """The demo's character tokenizer (src/stillhouse/demo/tokenizer.py) with ``extra`` characters added."""
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + list(CHARACTERS) + list(extra))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    backend.add_special_tokens(SPECIAL_TOKENS)
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, eos_token=EOS, unk_token=UNK)


@pytest.fixture(scope="module")
def chars():
    return character_tokenizer()


@pytest.fixture(scope="module")
def bpe():
    return byte_level_bpe(320, seed=0)


@pytest.fixture(scope="module")
def other_bpe():
    return byte_level_bpe(290, seed=7)


def ids_of(tokenizer, text: str, *, eos: bool = True) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids + [tokenizer.eos_token_id] if eos else ids


def random_top_k(rows: int, vocab_size: int, k: int, seed: int, *, sharpness: float = 3.0):
    """A random teacher's top-k (distinct ids) and exact tail log-mass ``[rows, k]``, ``[rows]``."""
    generator = torch.Generator().manual_seed(seed)
    logprobs = (torch.randn(rows, vocab_size, generator=generator) * sharpness).log_softmax(-1)
    values, ids = logprobs.topk(k, dim=-1)
    return TopK(ids, values), logprobs.scatter(-1, ids, -math.inf).logsumexp(-1)


# --- byte: the vocabulary map --------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_byte_with_identical_tokenizers_equals_the_same_tokenizer_loss(bpe, temperature):
    pair = pair_tokenizers(bpe, bpe)
    assert torch.equal(pair.to_student, torch.arange(len(bpe))) and pair.exact.all()  # special tokens included
    vocab_size, (batch, time_steps, k) = len(bpe), (2, 6, 8)
    raw, tail = random_top_k(batch * time_steps, vocab_size, k, seed=0)
    raw.ids[:, -1] = torch.where((raw.ids[:, :-1] == 0).any(-1), raw.ids[:, -1], 0)  # <pad> among them too
    mapped, residual = map_top_k(pair, raw, tail)
    # Every id maps to itself: only the order of the outcomes may change (sorted by id), and the residual is the tail.
    assert torch.equal(mapped.ids.sort(-1).values, raw.ids.sort(-1).values)
    torch.testing.assert_close(residual, tail)
    student = torch.randn(batch, time_steps, vocab_size, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, vocab_size, (batch, time_steps))
    labels[0, :2] = -100

    def shaped(top):
        return TopK(top.ids.view(batch, time_steps, k), top.logprobs.view(batch, time_steps, k))

    for kind in KINDS:
        for tail_mode in TAILS:
            options = {"kind": kind, "tail": tail_mode, "temperature": temperature}
            expected = distillation_loss(student, shaped(raw), labels, **options)
            got = distillation_loss(student, shaped(mapped), labels, **options)
            assert abs(got.item() - expected.item()) < 1e-5, (kind, tail_mode, got.item(), expected.item())


def test_identical_tokenizers_align_every_position_and_give_the_raw_top_k(bpe):
    pair = pair_tokenizers(bpe, bpe)
    text = demo_texts(1, seed=3)[0]
    tokens = ids_of(bpe, text)
    raw, tail = random_top_k(len(tokens), len(bpe), 5, seed=2)
    targets = response_targets(pair, "byte", teacher_ids=tokens, teacher=raw, tail=tail, text=text, student_ids=tokens)
    assert targets.mask.all()
    order = raw.ids.argsort(-1)
    torch.testing.assert_close(targets.logprobs, raw.logprobs.gather(-1, order))
    assert torch.equal(targets.ids, raw.ids.gather(-1, order))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("teacher_name,student_name", [("chars", "bpe"), ("bpe", "chars"), ("bpe", "other_bpe")])
def test_byte_mapping_keeps_the_mass_and_gives_distinct_student_ids(request, teacher_name, student_name, seed):
    teacher, student = request.getfixturevalue(teacher_name), request.getfixturevalue(student_name)
    pair = pair_tokenizers(teacher, student)
    k = 12
    top, tail = random_top_k(64, len(teacher), k, seed=seed)
    for given_tail in (tail, None):  # the stored tail, or 1 − Σ top-k
        mapped, residual = map_top_k(pair, top, given_tail)
        total = mapped.logprobs.logsumexp(-1).exp().double() + residual.exp().double()
        assert (total - 1).abs().max() < 1e-6
    mapped, residual = map_top_k(pair, top, tail)
    assert mapped.ids.shape == (64, k)
    assert all(len(set(row.tolist())) == k for row in mapped.ids)  # the k + 1 outcomes partition the vocabulary
    assert mapped.ids.min() >= 0 and mapped.ids.max() < len(student)
    # Distinct teacher tokens landing on one student id were merged: fewer finite slots than k somewhere.
    finite = mapped.logprobs.isfinite().sum(-1)
    assert (finite <= k).all() and (finite < k).any()
    # Padding takes the student's special tokens first (never its EOS): a probability of 0 is right for them.
    specials = {index for index, spelling in enumerate(pair.student_spellings) if spelling is None}
    specials.discard(student.eos_token_id)
    for row_ids, row_logprobs in zip(mapped.ids, mapped.logprobs):
        padded, used = set(row_ids[row_logprobs.isinf()].tolist()), set(row_ids[row_logprobs.isfinite()].tolist())
        assert student.eos_token_id not in padded
        assert padded <= specials or specials - used <= padded
    # A wider output pads with more unused ids and keeps the same distribution.
    wider, wider_residual = map_top_k(pair, top, tail, k=k + 3)
    torch.testing.assert_close(wider.logprobs.logsumexp(-1), mapped.logprobs.logsumexp(-1))
    torch.testing.assert_close(wider_residual, residual)
    assert all(len(set(row.tolist())) == k + 3 for row in wider.ids)


def test_byte_mapping_routes_teacher_tokens_exactly_by_prefix_or_to_the_residual(chars, bpe):
    spellings = pair_tokenizers(bpe, bpe).student_spellings
    byte_id = {spelling: index for index, spelling in enumerate(spellings) if spelling is not None}
    to_bpe = pair_tokenizers(chars, bpe)
    assert to_bpe.to_student[chars.convert_tokens_to_ids("a")] == byte_id[b"a"]  # the same spelling
    assert to_bpe.exact[chars.convert_tokens_to_ids("a")]
    # "é" is two bytes the BPE (trained on ASCII) keeps apart: its first byte token is the byte-prefix.
    assert to_bpe.to_student[chars.convert_tokens_to_ids("é")] == byte_id["é".encode()[:1]]
    assert not to_bpe.exact[chars.convert_tokens_to_ids("é")]
    assert to_bpe.to_student[chars.eos_token_id] == bpe.eos_token_id
    assert to_bpe.to_student[chars.convert_tokens_to_ids("<|user|>")] == -1  # a chat marker spells no text

    to_chars = pair_tokenizers(bpe, chars)
    merged_word = next(
        index for spelling, index in byte_id.items() if spelling.startswith(b" ") and len(spelling) > 3
    )  # e.g. " letters": the character student starts it with " "
    assert to_chars.to_student[merged_word] == chars.convert_tokens_to_ids(" ")
    assert to_chars.to_student[byte_id["é".encode()[:1]]] == -1  # half a character: nothing starts with it
    # Two teacher tokens on one student id are merged; the partial byte goes to the residual.
    teacher = TopK(
        torch.tensor([[merged_word, byte_id[b" "], byte_id["é".encode()[:1]]]]),
        torch.tensor([[math.log(0.5), math.log(0.2), math.log(0.1)]]),
    )
    mapped, residual = map_top_k(to_chars, teacher, torch.tensor([math.log(0.2)]))
    space = mapped.ids[0] == chars.convert_tokens_to_ids(" ")
    assert mapped.logprobs[0, space].exp().item() == pytest.approx(0.7)
    assert residual.exp().item() == pytest.approx(0.3)
    assert torch.isinf(mapped.logprobs[0, ~space]).all()


# --- alignment -----------------------------------------------------------------------------------


def bpe_token_starts(bpe, ids: list[int]) -> list[int]:
    """Byte starts of ASCII text's BPE tokens (the last, EOS, where the text ends), from each token decoded alone."""
    return list(accumulate((len(bpe.decode([i])) for i in ids[:-1]), initial=0))


def test_alignment_of_character_and_byte_level_bpe_on_demo_prompts(chars, bpe):
    inside_a_bpe_token = 0
    for text in demo_texts(20, seed=11):
        char_ids, bpe_ids = ids_of(chars, text), ids_of(bpe, text)
        bpe_starts = bpe_token_starts(bpe, bpe_ids)
        # Character teacher, BPE student: every BPE token starts on a character, the one at its byte (ASCII).
        teacher_to_bpe = pair_tokenizers(chars, bpe)
        match = shared_boundaries(
            byte_starts(char_ids, text, chars, teacher_to_bpe.teacher_spellings),
            byte_starts(bpe_ids, text, bpe, teacher_to_bpe.student_spellings),
        )
        assert match == bpe_starts  # and the last, EOS, with EOS
        # BPE teacher, character student: a character position has a target only where a BPE token starts.
        bpe_to_chars = pair_tokenizers(bpe, chars)
        match = shared_boundaries(
            byte_starts(bpe_ids, text, bpe, bpe_to_chars.teacher_spellings),
            byte_starts(char_ids, text, chars, bpe_to_chars.student_spellings),
        )
        expected = [bpe_starts.index(j) if j in bpe_starts else -1 for j in range(len(text) + 1)]
        assert match == expected and match[-1] == len(bpe_ids) - 1
        inside_a_bpe_token += expected.count(-1)
    assert inside_a_bpe_token > 20  # the BPE did merge characters: the test saw positions to refuse


def test_multibyte_text_is_aligned_by_bytes_not_characters(chars, bpe):
    text = MULTIBYTE_TEXT
    pair = pair_tokenizers(chars, bpe)
    char_ids, bpe_ids = ids_of(chars, text), ids_of(bpe, text)
    char_starts = byte_starts(char_ids, text, chars, pair.teacher_spellings)
    bpe_starts = byte_starts(bpe_ids, text, bpe, pair.student_spellings)
    character_bytes = list(accumulate((len(c.encode()) for c in text), initial=0))
    assert char_starts == character_bytes  # the last one: EOS, where the text ends
    # The ASCII-trained BPE spells é, ï, 中, 文 and 😀 byte by byte: 2 + 2 + 3 + 3 + 4 byte tokens for them.
    assert len(bpe_starts) == len(set(bpe_starts))
    inside = [start for start in bpe_starts if start not in character_bytes]
    assert len(inside) == 1 + 1 + 2 + 2 + 3
    emoji = text.encode().index("😀".encode())
    assert {emoji + 1, emoji + 2, emoji + 3} <= set(inside)
    match = shared_boundaries(char_starts, bpe_starts)
    for start, teacher_position in zip(bpe_starts, match):
        assert teacher_position == (character_bytes.index(start) if start in character_bytes else -1)
    assert match[bpe_starts.index(emoji)] == text.index("😀")  # the character index, not the byte index
    # Character offsets alone would put all four emoji byte tokens at the emoji's start; bytes keep them apart.
    offsets = bpe(text, return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"]
    assert offsets.count((text.index("😀"), text.index("😀") + 1)) == 4


def sentencepiece_style_tokenizer() -> PreTrainedTokenizerFast:
    """Llama 2 / Mistral style: ``▁`` for a space (prepended to the text), byte fallback ``<0xNN>``, a decoder that
    strips the prepended space."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{byte:02X}>": 3 + byte for byte in range(256)}}
    for token in ["▁", *"navecf:!", "▁n", "▁c"]:
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("▁", "n"), ("▁", "c")], byte_fallback=True, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.add_special_tokens(["<unk>", "<s>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>", bos_token="<s>")


def test_a_sentencepiece_style_teacher_is_placed_and_mapped_by_bytes(bpe):
    teacher = sentencepiece_style_tokenizer()
    pair = pair_tokenizers(teacher, bpe)
    text = MULTIBYTE_TEXT
    teacher_ids, student_ids = ids_of(teacher, text), ids_of(bpe, text)
    assert teacher.convert_ids_to_tokens(teacher_ids[:3]) == ["▁n", "a", "<0xC3>"]  # "▁n" is "n" at the start
    # Both spell the text byte for byte (the ASCII-trained BPE too): every position has its counterpart.
    assert shared_boundaries(
        byte_starts(teacher_ids, text, teacher, pair.teacher_spellings),
        byte_starts(student_ids, text, bpe, pair.student_spellings),
    ) == list(range(len(teacher_ids)))
    byte_token = dict(zip(pair.student_spellings, range(len(bpe))))
    assert pair.to_student[teacher.convert_tokens_to_ids("<0xC3>")] == byte_token[b"\xc3"]  # a byte-fallback token
    assert pair.to_student[teacher.convert_tokens_to_ids("▁c")] == byte_token[b" c"]  # ▁ spells a space
    assert pair.exact[teacher.convert_tokens_to_ids("▁c")]


def test_offsets_place_tokens_when_spellings_do_not_spell_the_text(chars, bpe):
    # "ß" is not in the character vocabulary: <unk> spells nothing, so the offsets path places the tokens.
    text = "aßb ok"
    pair = pair_tokenizers(chars, bpe)
    char_ids = ids_of(chars, text)
    assert chars.unk_token_id in char_ids
    assert byte_starts(char_ids, text, chars, pair.teacher_spellings) == [0, 1, 3, 4, 5, 6, 7]
    # A generated sequence the tokenizer would not produce (non-canonical) is still placed by its bytes.
    pieces = [bpe.convert_tokens_to_ids(token) for token in ["s", "o", "r", "t", "Ġ", "l"]]
    assert byte_starts(pieces, "sort l", bpe, pair.student_spellings) == [0, 1, 2, 3, 4, 5]


def test_check_alignable_refuses_a_slow_tokenizer_naming_it(chars, bpe):
    slow = ByT5Tokenizer()
    with pytest.raises(InputError, match=r"train\.student.*ByT5Tokenizer.*slow.*tokenizer\.json"):
        check_alignable(slow, "train.student")
    with pytest.raises(InputError, match=r"sample\.teacher"):
        pair_tokenizers(slow, bpe, teacher_name="sample.teacher")
    check_alignable(chars, "train.student")
    check_alignable(bpe, "sample.teacher")


# --- ULD -----------------------------------------------------------------------------------------


def uld_reference(student_logits, teacher_logprobs, exact, exact_weight, temperature):
    """ULD of one position from the module docstring's formula, with Python floats."""
    tau = temperature
    q = [math.exp(x) for x in torch.tensor(student_logits).log_softmax(-1).tolist()]
    p_top = sorted((math.exp(x) for x in teacher_logprobs), reverse=True)
    k = len(p_top)
    q_sorted = sorted(q, reverse=True)

    def tempered(masses):
        powered = [m ** (1 / tau) for m in masses]
        return [m / sum(powered) for m in powered]

    p_outcomes = tempered(p_top + [max(1 - sum(p_top), 0.0)])
    q_outcomes = tempered(q_sorted[:k] + [sum(q_sorted[k:])])
    w1 = sum(abs(a - b) for a, b in zip(p_outcomes, q_outcomes))
    shared = [(math.exp(lp), q[s]) for lp, s in zip(teacher_logprobs, exact) if s >= 0 and lp > -math.inf]
    kl = 0.0
    if shared:
        p_s = tempered([a for a, _ in shared])
        q_s = tempered([b for _, b in shared])
        kl = sum(a * math.log(a / b) for a, b in zip(p_s, q_s))
    return tau**2 * (w1 + exact_weight * kl)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_uld_matches_its_formula(temperature):
    student = torch.tensor(
        [
            [[2.0, 1.0, 0.5, -1.0, 0.0, 0.3], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [3.0, -2.0, 0.0, 1.0, 1.0, -1.0]],
        ]
    )
    # Teacher top-3 of its own vocabulary (any order; −inf: absent), the student ids spelled alike (−1: none).
    teacher = torch.tensor([[[-0.5, -1.5, -2.5], [-1.2, -0.9, -3.0], [-0.2, -2.0, -math.inf]]])
    exact = torch.tensor([[[3, -1, 0], [-1, -1, -1], [5, 1, 2]]])
    labels = torch.tensor([[1, 2, 3]])
    for exact_weight in (0.0, 0.7):
        got = uld_loss(student, teacher, exact, labels, exact_weight=exact_weight, temperature=temperature)
        expected = sum(
            uld_reference(
                student[0, t].tolist(), teacher[0, t].tolist(), exact[0, t].tolist(), exact_weight, temperature
            )
            for t in range(3)
        )
        assert got.item() == pytest.approx(expected / 3, abs=1e-6)
    # A masked position doesn't count: the mean is over the other two.
    masked = labels.clone()
    masked[0, 1] = -100
    expected = sum(
        uld_reference(student[0, t].tolist(), teacher[0, t].tolist(), exact[0, t].tolist(), 0.7, temperature)
        for t in (0, 2)
    )
    got = uld_loss(student, teacher, exact, masked, exact_weight=0.7, temperature=temperature)
    assert got.item() == pytest.approx(expected / 2, abs=1e-6)


def test_uld_is_zero_for_a_student_equal_to_the_teacher_and_zero_when_all_masked():
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(2, 4, 30, generator=generator)
    values, ids = student.log_softmax(-1).topk(6, dim=-1)
    labels = torch.zeros(2, 4, dtype=torch.long)
    assert uld_loss(student, values, ids, labels, exact_weight=1.0).item() < 1e-6
    # Another student (a permuted vocabulary keeps the sorted vector: only the exact-match term sees it).
    permuted = student[..., torch.randperm(30, generator=generator)]
    assert uld_loss(permuted, values, ids, labels, exact_weight=0.0).item() < 1e-6
    assert uld_loss(permuted, values, ids, labels, exact_weight=1.0).item() > 1e-2
    assert uld_loss(student * 0.3, values, ids, labels, exact_weight=0.0).item() > 1e-2
    masked = torch.full_like(labels, -100)
    logits = student.clone().requires_grad_()
    loss = uld_loss(logits, values, ids, masked)
    loss.backward()
    assert loss.item() == 0 and not math.isnan(loss.item()) and logits.grad.abs().sum() == 0


# --- targets for the trainer and gradients --------------------------------------------------------


def stored_rows(teacher, texts: list[str], k: int, seed: int) -> list[dict]:
    """Teacher-output rows as the store holds them (response ids with EOS, top-k, tail), from a random teacher."""
    rows = []
    for index, text in enumerate(texts):
        tokens = ids_of(teacher, text)
        top, tail = random_top_k(len(tokens), len(teacher), k, seed=seed + index, sharpness=2.0)
        rows.append(
            {
                "response_text": text,
                "response_token_ids": tokens,
                "top_k_ids": top.ids.tolist(),
                "top_k_logprobs": top.logprobs.tolist(),
                "tail_logprobs": tail.tolist(),
            }
        )
    return rows


@pytest.mark.parametrize("align", ["byte", "uld"])
def test_offline_targets_place_each_response_at_its_label_positions(bpe, chars, align):
    pair = pair_tokenizers(bpe, chars)
    texts = [*demo_texts(2, seed=5), MULTIBYTE_TEXT]
    rows = stored_rows(bpe, texts, k=6, seed=0)
    student_ids = [ids_of(chars, text) for text in texts]
    starts = [3, 5, 2]
    width = max(start + len(ids) for start, ids in zip(starts, student_ids)) - 4  # the longest row is truncated
    targets = offline_targets(pair, align, rows, student_ids, starts, width)
    assert targets.ids.shape == targets.logprobs.shape == (3, width, 6) and targets.mask.shape == (3, width)
    for b, (row, ids, start) in enumerate(zip(rows, student_ids, starts)):
        one = response_targets(
            pair,
            align,
            teacher_ids=row["response_token_ids"],
            teacher=TopK(torch.tensor(row["top_k_ids"]), torch.tensor(row["top_k_logprobs"])),
            tail=torch.tensor(row["tail_logprobs"]),
            text=row["response_text"],
            student_ids=ids,
        )
        length = min(len(ids), width - start)
        assert not targets.mask[b, :start].any()  # the prompt has no KD target
        assert torch.equal(targets.mask[b, start : start + length], one.mask[:length])
        assert torch.equal(targets.ids[b, start : start + length], one.ids[:length])
        torch.testing.assert_close(targets.logprobs[b, start : start + length], one.logprobs[:length])
        assert 0 < one.mask.sum() < len(ids)  # some character positions sit inside BPE tokens
    if align == "uld":  # teacher log-probs kept as they are, ids the identically spelled student tokens or −1
        aligned = targets.mask
        assert set(targets.ids[aligned].unique().tolist()) - {-1} <= set(range(len(chars)))
        assert (targets.ids[aligned] == -1).any() and (targets.ids[aligned] >= 0).any()


@pytest.mark.parametrize("align", ["byte", "uld"])
def test_online_targets_equal_offline_targets_of_the_same_teacher(chars, bpe, align):
    pair = pair_tokenizers(chars, bpe)
    texts = [demo_texts(1, seed=9)[0], MULTIBYTE_TEXT]
    prompts = [ids_of(chars, "<|user|>sort letters: abc<|assistant|>", eos=False), ids_of(chars, "hi:", eos=False)]
    sequences = teacher_sequences(pair, prompts, texts, ended=[True, False])
    assert sequences.response_ids[1][-1] != chars.eos_token_id  # a student sample cut short: no EOS
    logits = torch.randn(*sequences.input_ids.shape, len(chars), generator=torch.Generator().manual_seed(4)) * 2
    student_ids = [ids_of(bpe, texts[0]), ids_of(bpe, texts[1], eos=False)]
    width, k = 6 + max(len(ids) for ids in student_ids), 5
    online = online_targets(pair, align, logits, sequences, texts, student_ids, [6, 6], width, k=k)
    rows = []
    for b, text in enumerate(texts):
        start, tokens = sequences.response_starts[b], sequences.response_ids[b]
        log_p = logits[b, start - 1 : start - 1 + len(tokens)].log_softmax(-1)
        values, top_ids = log_p.topk(k, dim=-1)
        tail = log_p.scatter(-1, top_ids, -math.inf).logsumexp(-1)
        rows.append(
            {
                "response_text": text,
                "response_token_ids": tokens,
                "top_k_ids": top_ids.tolist(),
                "top_k_logprobs": values.tolist(),
                "tail_logprobs": tail.tolist(),
            }
        )
    offline = offline_targets(pair, align, rows, student_ids, [6, 6], width)
    assert torch.equal(online.mask, offline.mask) and online.mask.any()
    assert torch.equal(online.ids[online.mask], offline.ids[offline.mask])
    torch.testing.assert_close(online.logprobs[online.mask], offline.logprobs[offline.mask])
    # The same through a TopK teacher (a served one's log-probs): only the tail is taken as 1 − Σ top-k.
    top = logits.log_softmax(-1).topk(k, dim=-1)
    served = online_targets(
        pair, align, TopK(top.indices, top.values), sequences, texts, student_ids, [6, 6], width, k=k
    )
    assert torch.equal(served.mask, online.mask)
    torch.testing.assert_close(served.logprobs[served.mask], online.logprobs[online.mask])


@pytest.mark.parametrize("align,kind", [("byte", kind) for kind in KINDS] + [("uld", None)])
def test_losses_backpropagate_to_the_student_logits(chars, bpe, align, kind):
    pair = pair_tokenizers(bpe, chars)
    texts = demo_texts(2, seed=21)
    student_ids = [ids_of(chars, text) for text in texts]
    width = 2 + max(len(ids) for ids in student_ids)
    targets = offline_targets(pair, align, stored_rows(bpe, texts, k=4, seed=3), student_ids, [2, 2], width)
    labels = torch.full((2, width), -100)
    for b, ids in enumerate(student_ids):
        labels[b, 2 : 2 + len(ids)] = torch.tensor(ids)
    shifted = CrossTargets(targets.ids[:, 1:], targets.logprobs[:, 1:], targets.mask[:, 1:])  # as the trainer shifts
    logits = torch.randn(2, width - 1, len(chars), generator=torch.Generator().manual_seed(0)).requires_grad_()
    loss = cross_tokenizer_loss(
        logits, shifted, labels[:, 1:], align=align, kind=kind or "forward_kl", uld_exact_weight=0.5
    )
    loss.backward()
    counted = shifted.mask & labels[:, 1:].ne(-100)
    assert torch.isfinite(loss) and loss > 0
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad[counted].abs().sum(-1) > 0).all()  # every position with a target moves the student
    assert (logits.grad[~counted] == 0).all()  # no target, no KD gradient (cross-entropy is the trainer's)


def test_exact_ids_are_minus_one_without_an_identical_spelling(chars, bpe):
    pair = pair_tokenizers(bpe, chars)
    byte_id = {spelling: index for index, spelling in enumerate(pair.teacher_spellings) if spelling}
    teacher_ids = torch.tensor([[byte_id[b"a"], byte_id["é".encode()[:1]], bpe.eos_token_id, len(bpe) + 50]])
    assert exact_ids(pair, teacher_ids).tolist() == [[chars.convert_tokens_to_ids("a"), -1, chars.eos_token_id, -1]]


# --- a Qwen-sized vocabulary ---------------------------------------------------------------------


def synthetic_byte_level_bpe(size: int, seed: int, shared: float = 0.0) -> PreTrainedTokenizerFast:
    """A byte-level BPE with ``size`` tokens of random lowercase words (with and without a leading space).

    The first ``shared`` fraction of the words is the same for every seed (real vocabularies of one script
    share most short words), the rest is the seed's own."""
    rng = random.Random(-1)
    alphabet = list(_byte_level_alphabet().values())
    vocab = {character: index for index, character in enumerate(alphabet)}
    merges = []
    words = [*"abcdefghijklmnopqrstuvwxyz", *("Ġ" + c for c in "abcdefghijklmnopqrstuvwxyz")]
    for word in words[26:]:
        vocab.setdefault(word, len(vocab))
        merges.append(("Ġ", word[1:]))
    own = False
    while len(vocab) < size:
        if not own and len(vocab) >= shared * size:
            rng, own = random.Random(seed), True
        stem = rng.choice(words)
        word = stem + rng.choice("abcdefghijklmnopqrstuvwxyz")
        if len(word) < 12 and word not in vocab:
            vocab[word] = len(vocab)
            merges.append((stem, word[-1]))
            words.append(word)
    vocab[EOS] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([EOS])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS)


@pytest.mark.slow
def test_the_vocabulary_map_of_150k_vocabularies_builds_in_seconds():
    # Half the words shared: the other half goes through the student's tokenizer (the slow path).
    teacher, student = synthetic_byte_level_bpe(150_000, 1, 0.5), synthetic_byte_level_bpe(150_000, 2, 0.5)
    started = time.perf_counter()
    pair = pair_tokenizers(teacher, student)
    elapsed = time.perf_counter() - started
    assert elapsed < 30, f"mapping took {elapsed:.1f}s"  # a few seconds on a busy 2-core machine
    assert 0.45 < pair.exact.float().mean() < 0.55
    assert (pair.to_student >= 0).float().mean() > 0.99  # ASCII words: every token has a byte-prefix
    top, _ = random_top_k(256, len(teacher), 20, seed=0)
    mapped, residual = map_top_k(pair, top)
    assert ((mapped.logprobs.logsumexp(-1).exp() + residual.exp() - 1).abs() < 1e-5).all()
