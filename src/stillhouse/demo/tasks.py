"""Deterministic, verifiable demo tasks for the bundled teacher.

Three task families that a tiny causal LM measurably learns on a CPU (multi-digit arithmetic and counting
a character were measured too: a 1 M-parameter teacher did not learn them in a 12-minute budget, so they are left out):

    sort letters: qdmx      ->  dmqx
    reverse: kfpa           ->  apfk
    sort numbers: 52 17 88  ->  17 52 88      (two or three numbers)

Every example is drawn from a seeded `random.Random`, so the same seed gives the same rows.
"""

from __future__ import annotations

import random
import string

TASK_NAMES = ("sort_letters", "reverse", "sort_numbers")


def _letters(rng: random.Random) -> str:
    return "".join(rng.sample(string.ascii_lowercase, rng.randint(3, 6)))


def make_example(rng: random.Random) -> dict[str, str]:
    """One demo row: ``{"prompt", "reference", "task"}``."""
    task = rng.choice(TASK_NAMES)
    if task == "sort_letters":
        word = _letters(rng)
        return {"prompt": f"sort letters: {word}", "reference": "".join(sorted(word)), "task": task}
    if task == "reverse":
        word = _letters(rng)
        return {"prompt": f"reverse: {word}", "reference": word[::-1], "task": task}
    numbers = rng.sample(range(10, 100), rng.randint(2, 3))
    return {
        "prompt": "sort numbers: " + " ".join(map(str, numbers)),
        "reference": " ".join(map(str, sorted(numbers))),
        "task": task,
    }


def make_examples(count: int, seed: int) -> list[dict[str, str]]:
    """``count`` demo rows drawn from ``seed`` (duplicates possible, as in real data)."""
    rng = random.Random(seed)
    return [make_example(rng) for _ in range(count)]


def is_correct(response: str, reference: str) -> bool:
    """Exact match after trimming surrounding whitespace."""
    return response.strip() == reference.strip()
