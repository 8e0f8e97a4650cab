"""`builtin:NAME` sources and models, found through entry points so that the core imports none of them.

A package adds a source (a callable ``(rows, seed) -> list[dict]`` of ``prompt``/``reference``/``task`` rows)
under the entry-point group ``stillhouse.sources``, or a model (a callable returning the folder of a
Hugging Face-format model) under ``stillhouse.models``. Stillhouse's own demo registers both in
pyproject.toml: ``builtin:demo`` and ``builtin:demo-teacher``.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from stillhouse.errors import InputError

PREFIX = "builtin:"
SOURCES = "stillhouse.sources"
MODELS = "stillhouse.models"


def is_builtin(reference: str | None) -> bool:
    return bool(reference) and reference.startswith(PREFIX)


def load_builtin(group: str, reference: str, field: str) -> Callable[..., Any]:
    """The callable registered as ``reference`` (``builtin:NAME``) in ``group``;
    an error naming ``field`` when none is."""
    name = reference.removeprefix(PREFIX)
    found = entry_points(group=group, name=name)
    if not found:
        installed = ", ".join(sorted(PREFIX + point.name for point in entry_points(group=group))) or "none"
        raise InputError(
            f"{field}: {reference!r} is not an installed built-in (installed: {installed}); "
            "use one of those, a local path or a Hub id"
        )
    return next(iter(found)).load()
