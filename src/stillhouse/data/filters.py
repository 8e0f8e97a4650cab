"""Row filters: the measures they judge by and the optional PII masking.

Each is a plain function of one prompt, so each is tested on crafted rows; `curate` applies them
in order (empty, mask, characters, tokens, repetition, benchmark contamination) and counts what
each removes.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from stillhouse.data.schema import Messages

PII_PATTERNS = {
    "email": (re.compile(r"(?<![\w.+-])[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"), "<EMAIL>"),
    # An optional +country code, then groups like (555) 123-4567 / 555.123.4567 / +44 20 7946 0958: at least 9 digits.
    "phone": (re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{3,4}[ .-]?\d{3,4}(?![\w])"), "<PHONE>"),
    # Well-known key shapes (OpenAI, GitHub, Hugging Face, AWS, Slack, Google), and the value of `api_key = <long secret>`.
    "api_key": (re.compile(
        r"(?i:(\b(?:api[_-]?key|secret|access[_-]?token|auth[_-]?token|password)\s*[:=]\s*[\"']?))[\w./+=-]{16,}"
        r"|\b(?:sk-[A-Za-z0-9_-]{20,}|gh[pousr]_[A-Za-z0-9]{30,}|hf_[A-Za-z0-9]{30,}|AKIA[0-9A-Z]{16}|xox[abprs]-[A-Za-z0-9-]{10,}"
        r"|AIza[0-9A-Za-z_-]{35})\b"
    ), r"\1<API_KEY>"),
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
    grams = [" ".join(words[i:i + n]) for i in range(total)] if n > 1 else words
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
            texts = [self.tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in conversations]
        else:
            texts = ["\n".join(message["content"] for message in m) for m in conversations]
        return [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]
