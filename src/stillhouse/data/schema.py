"""Rows of the common dataset shapes as chat messages, validated as a conversation.

Shapes (`format` in the config):

    columns    {"prompt": "Sort: cba", "system": "Be brief"}         prompt text (or a message list)
                                                                     + optional system column
    messages   {"messages": [{"role": "user", "content": "..."}]}    OpenAI chat messages
    sharegpt   {"conversations": [{"from": "human", "value": "..."}]}
    alpaca     {"instruction": "...", "input": "...", "output": "..."}

Every shape ends as a list of ``{role, content}``: an optional system message first, then user and
assistant turns alternating, ending on a user turn. Multi-turn conversations keep every turn; an
answer at the end is cut, because the teacher answers the last user turn.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

from stillhouse.config import SourceConfig
from stillhouse.errors import InputError

Messages = list[dict[str, str]]

SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
    "system": "system",
}
CHAT_ROLES = ("system", "user", "assistant")


class RowError(ValueError):
    """One row that cannot become a conversation; the caller adds where it is."""


@dataclass(frozen=True)
class ColumnMapping:
    """How one source's rows become messages: the resolved format and the columns it reads."""

    format: str
    prompt_column: str
    system_column: str | None
    reference_column: str | None
    category_column: str | None


def normalize_text(text: str) -> str:
    """Lowercase with whitespace collapsed: what exact duplicates and shingles are computed on."""
    return " ".join(text.split()).lower()


def normalized_messages(messages: Messages) -> str:
    return json.dumps([[m["role"], normalize_text(m["content"])] for m in messages])


def prompt_hash(messages: Messages, salt: str = "") -> str:
    """sha256 hex of the normalized messages: the prompt id (unsalted) and the split position (salted)."""
    return hashlib.sha256((salt + normalized_messages(messages)).encode()).hexdigest()


def user_text(messages: Messages) -> str:
    """The user turns, normalized: what near-duplicates and contamination are judged on
    (system prompts are often shared boilerplate)."""
    return normalize_text("\n".join(m["content"] for m in messages if m["role"] == "user"))


def conversation_text(messages: list[dict[str, str]]) -> str:
    return "\n".join(m["content"] for m in messages)


def resolve_mapping(source: SourceConfig, columns: list[str], field: str, label: str) -> ColumnMapping:
    """Pick the format (for `auto`) and check that the columns it needs exist; errors name the field and the fix."""
    fmt, prompt_column = source.format, source.prompt_column
    if fmt == "auto":
        if prompt_column in columns:
            fmt = "columns"
        else:
            detected = [
                (name, column)
                for name, column in (("messages", "messages"), ("sharegpt", "conversations"), ("alpaca", "instruction"))
                if column in columns
            ]
            if not detected:
                raise InputError(
                    f"{field}.prompt_column: column {prompt_column!r} is not in {label!r} (columns: {columns}); name "
                    f"one of those, or set {field}.format to messages, sharegpt or alpaca"
                )
            fmt, prompt_column = detected[0]
    elif fmt == "messages" and prompt_column not in columns and "messages" in columns:
        prompt_column = "messages"
    elif fmt == "sharegpt":
        prompt_column = prompt_column if prompt_column in columns else "conversations"
    elif fmt == "alpaca":
        prompt_column = "instruction"
    reference_column = source.reference_column
    if reference_column not in columns and "reference_column" not in source.model_fields_set:
        reference_column = None  # the default `reference`, and this data has no such column: no references
    needed = {
        "prompt_column": prompt_column,
        "system_column": source.system_column,
        "reference_column": reference_column,
        "category_column": source.category_column,
    }
    for name, column in needed.items():
        if column is not None and column not in columns:
            hint = (
                f"name one of those, or set {field}.format"
                if name == "prompt_column"
                else f"name one of those, or set {field}.{name}: null"
            )
            raise InputError(f"{field}.{name}: column {column!r} is not in {label!r} (columns: {columns}); {hint}")
    return ColumnMapping(fmt, prompt_column, source.system_column, reference_column, source.category_column)


def is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def text_of(value: Any, what: str) -> str:
    """A message's content as text: strings as they are, OpenAI content parts joined, null as empty."""
    if is_missing(value):
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # OpenAI content parts: [{"type": "text", "text": "..."}, ...]
        return "\n".join(
            str(part.get("text", "")) for part in value if isinstance(part, dict) and part.get("type", "text") == "text"
        )
    if isinstance(value, (int, float)):
        return str(value)
    raise RowError(f"{what} is a {type(value).__name__}, not text")


def optional_text(record: dict[str, Any], column: str | None) -> str | None:
    if column is None:
        return None
    value = record.get(column)
    if is_missing(value) or value == "":
        return None
    return value if isinstance(value, str) else str(value)


def message_list(value: Any, column: str, role_key: str, content_key: str, roles: dict[str, str] | None) -> Messages:
    if not isinstance(value, list):
        raise RowError(f"column {column!r} holds a {type(value).__name__}, not a list of messages")
    messages = []
    for position, message in enumerate(value, 1):
        if not isinstance(message, dict) or role_key not in message:
            raise RowError(
                f"message {position} of column {column!r} has no {role_key!r} key "
                f"(expected {{{role_key!r}, {content_key!r}}})"
            )
        role = str(message[role_key])
        if roles is not None:
            if role.lower() not in roles:
                raise RowError(
                    f"message {position} of column {column!r} has speaker {role!r}; expected one of {sorted(roles)}"
                )
            role = roles[role.lower()]
        messages.append({"role": role, "content": text_of(message.get(content_key), f"message {position} content")})
    return messages


def to_messages(record: dict[str, Any], mapping: ColumnMapping) -> Messages:
    """A row as a validated conversation ending on a user turn; ``[]`` when nothing is left to ask.

    Raises `RowError` for a missing column value or a role sequence that is not a conversation.
    """
    column = mapping.prompt_column
    if column not in record or is_missing(record[column]):
        raise RowError(f"has no value in column {column!r}")
    value = record[column]
    if mapping.format == "alpaca":
        instruction = text_of(value, "instruction")
        extra = text_of(record.get("input"), "input")
        messages = [{"role": "user", "content": f"{instruction}\n\n{extra}" if extra.strip() else instruction}]
    elif mapping.format == "sharegpt":
        messages = message_list(value, column, "from", "value", SHAREGPT_ROLES)
    elif isinstance(value, str):
        messages = [{"role": "user", "content": value}]
    else:
        messages = message_list(value, column, "role", "content", None)
    system = optional_text(record, mapping.system_column)
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    return validate_conversation(messages)


def validate_conversation(messages: Messages) -> Messages:
    """Strip, drop empty turns, cut a trailing answer, and check the roles form a conversation."""
    messages = [{"role": m["role"], "content": m["content"].strip()} for m in messages if m["content"].strip()]
    while messages and messages[-1]["role"] == "assistant":
        messages.pop()  # a full conversation: the teacher answers its last user turn
    if not messages:
        return []
    for position, message in enumerate(messages, 1):
        if message["role"] not in CHAT_ROLES:
            raise RowError(
                f"message {position} has role {message['role']!r}; a prompt has only system, user and assistant turns"
            )
        if message["role"] == "system" and position > 1:
            raise RowError(f"message {position} is a second or late system message; keep one system message, first")
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    if not any(m["role"] == "user" for m in turns):
        raise RowError("has no user turn; a prompt needs at least one user message for the teacher to answer")
    for position, message in enumerate(turns):
        expected = "user" if position % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise RowError(
                f"turn {position + 1} is {message['role']!r} where {expected!r} was expected; "
                "turns must alternate user, assistant, user, ... starting with user"
            )
    return messages
