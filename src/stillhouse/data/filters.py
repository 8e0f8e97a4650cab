"""Row filters: the measures they judge by and the optional PII masking.

Each measure is a plain function of one prompt, tested on crafted rows; `RowFilters` applies them
in order (empty, mask, characters, tokens, repetition, benchmark contamination) and counts what
each removes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import numpy as np

from stillhouse.config import CurateConfig
from stillhouse.data.decontaminate import ReferenceNgrams, benchmark_rows
from stillhouse.data.report import CurationReport
from stillhouse.data.schema import Messages, conversation_text, user_text

PII_PATTERNS = {
    "email": (re.compile(r"(?<![\w.+-])[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"), "<EMAIL>"),
    # An optional +country code, then groups like (555) 123-4567 / 555.123.4567 / +44 20 7946 0958: at least 9 digits.
    "phone": (
        re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{3,4}[ .-]?\d{3,4}(?![\w])"),
        "<PHONE>",
    ),
    # Well-known key shapes (OpenAI, GitHub, Hugging Face, AWS, Slack, Google),
    # and the value of `api_key = <long secret>`.
    "api_key": (
        re.compile(
            r"(?i:(\b(?:api[_-]?key|secret|access[_-]?token|auth[_-]?token|password)\s*[:=]\s*[\"']?))[\w./+=-]{16,}"
            r"|\b(?:sk-[A-Za-z0-9_-]{20,}|gh[pousr]_[A-Za-z0-9]{30,}|hf_[A-Za-z0-9]{30,}|AKIA[0-9A-Z]{16}|xox[abprs]-[A-Za-z0-9-]{10,}"
            r"|AIza[0-9A-Za-z_-]{35})\b"
        ),
        r"\1<API_KEY>",
    ),
}


def mask_pii(messages: Messages, kinds: Sequence[str]) -> tuple[Messages, bool]:
    """Messages with every match of the chosen patterns replaced; and whether anything changed."""
    changed = False
    masked = []
    for message in messages:
        content = message["content"]
        for kind in kinds:
            pattern, replacement = PII_PATTERNS[kind]
            content, count = pattern.subn(replacement, content)
            changed = changed or count > 0
        masked.append({"role": message["role"], "content": content})
    return masked, changed


def char_length(messages: Messages) -> int:
    return sum(len(m["content"]) for m in messages)


def repeated_ngram_share(text: str, n: int) -> float:
    """Share of a text's word n-grams that repeat an earlier one (0 for texts with fewer than n words)."""
    words = text.split()
    total = len(words) - n + 1
    if total <= 1:
        return 0.0
    grams = [" ".join(words[i : i + n]) for i in range(total)] if n > 1 else words
    return (total - len(set(grams))) / total


class TokenCounter:
    """Prompt lengths in the teacher's tokens, with its chat template applied (as the sampler renders them).

    Only the tokenizer is loaded, and only when a token bound is configured.
    """

    def __init__(self, model: str):
        from stillhouse.models import load_tokenizer, resolve_model

        self.tokenizer = load_tokenizer(resolve_model(model, "curate.filters.length.tokenizer"))

    def count(self, conversations: Sequence[Messages]) -> list[int]:
        if self.tokenizer.chat_template:
            texts = [
                self.tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in conversations
            ]
        else:
            texts = ["\n".join(message["content"] for message in m) for m in conversations]
        return [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]


class RowFilters:
    """The per-batch filters, configured once: masking, lengths, tokens, repetition, benchmark n-grams."""

    def __init__(self, config: CurateConfig, report: CurationReport):
        filters, length = config.filters, config.filters.length
        self.config, self.report = config, report
        self.token_counter = (
            TokenCounter(length.tokenizer) if (length.min_tokens is not None or length.max_tokens is not None) else None
        )
        self.benchmarks = None
        if config.decontaminate.benchmarks:
            labels = [f"benchmark {p}" for p in config.decontaminate.benchmarks]
            self.benchmarks = ReferenceNgrams.build(
                benchmark_rows(config.decontaminate.benchmarks, config.batch_rows),
                labels,
                config.decontaminate.ngram,
                config.decontaminate.ignore_common,
            )
        active = ["skipped_malformed", "dropped_empty"]
        active += ["masked_pii"] if filters.mask_pii else []
        active += ["dropped_too_short_chars"] if length.min_chars is not None else []
        active += ["dropped_too_long_chars"] if length.max_chars is not None else []
        active += ["dropped_too_short_tokens"] if length.min_tokens is not None else []
        active += ["dropped_too_long_tokens"] if length.max_tokens is not None else []
        active += ["dropped_repetitive"] if filters.repetition is not None else []
        active += ["dropped_contaminated_benchmark"] if self.benchmarks is not None else []
        for name in active:
            report.count(name, 0)

    def apply(
        self, messages: list, texts: list[str], wheres: list[str], source: str
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(keep mask, character lengths, token lengths or -1) for one batch of non-empty prompts;
        masks PII in place."""
        filters, length = self.config.filters, self.config.filters.length
        if filters.mask_pii:
            for row, conversation in enumerate(messages):
                messages[row], changed = mask_pii(conversation, filters.mask_pii)
                if changed:
                    self.report.count("masked_pii")
                    texts[row] = user_text(messages[row])
        chars = np.fromiter((char_length(m) for m in messages), dtype=np.int32, count=len(messages))
        tokens = np.full(len(messages), -1, dtype=np.int32)
        keep = np.ones(len(messages), dtype=bool)

        def drop(name: str, rejected: np.ndarray, detail: Callable[[int], dict] = lambda row: {}) -> None:
            newly = np.flatnonzero(rejected & keep)
            self.report.count(name, len(newly))
            for row in newly[: self.report.max_examples]:
                self.report.add_example(name, source, wheres[row], conversation_text(messages[row]), **detail(row))
            keep[newly] = False

        if length.min_chars is not None:
            drop("dropped_too_short_chars", chars < length.min_chars, lambda row: {"chars": str(chars[row])})
        if length.max_chars is not None:
            drop("dropped_too_long_chars", chars > length.max_chars, lambda row: {"chars": str(chars[row])})
        if self.token_counter is not None:
            rows = np.flatnonzero(keep)
            tokens[rows] = self.token_counter.count([messages[row] for row in rows])
            if length.min_tokens is not None:
                drop(
                    "dropped_too_short_tokens",
                    (tokens >= 0) & (tokens < length.min_tokens),
                    lambda row: {"tokens": str(tokens[row])},
                )
            if length.max_tokens is not None:
                drop("dropped_too_long_tokens", tokens > length.max_tokens, lambda row: {"tokens": str(tokens[row])})
        if filters.repetition is not None:
            rows = np.flatnonzero(keep)
            shares = np.zeros(len(messages))
            shares[rows] = [
                repeated_ngram_share(conversation_text(messages[row]).lower(), filters.repetition.ngram) for row in rows
            ]
            drop(
                "dropped_repetitive",
                shares > filters.repetition.max_repeated_share,
                lambda row: {"repeated_share": f"{shares[row]:.2f}"},
            )
        if self.benchmarks is not None:
            rows = np.flatnonzero(keep)
            hits = np.full(len(messages), -1, dtype=np.int64)
            hits[rows] = self.benchmarks.match([texts[row] for row in rows])
            drop(
                "dropped_contaminated_benchmark", hits >= 0, lambda row: self.benchmarks.evidence(texts[row], hits[row])
            )
        return keep, chars, tokens
