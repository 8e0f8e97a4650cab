"""Preference pairs from scored candidates: (best, worst) per prompt, with a minimum margin."""

from __future__ import annotations

from collections.abc import Sequence


def build_pairs(
    prompt_ids: Sequence[str], candidates: Sequence[Sequence[str]], scores: Sequence[Sequence[float]], min_margin: float
) -> tuple[list[dict], dict[str, int]]:
    """One ``{prompt_id, chosen, rejected, margin}`` per prompt whose best and worst differ enough.

    Identical texts among a prompt's candidates count once (a pair of equal responses teaches
    nothing). Returns the pairs and the counts of prompts dropped for each reason.
    """
    pairs, dropped = [], {"dropped_single_distinct_response": 0, "dropped_small_margin": 0}
    for prompt_id, texts, values in zip(prompt_ids, candidates, scores, strict=True):
        best_of = {}
        for text, value in zip(texts, values, strict=True):
            best_of[text] = max(value, best_of.get(text, value))
        if len(best_of) < 2:
            dropped["dropped_single_distinct_response"] += 1
            continue
        ranked = sorted(best_of.items(), key=lambda item: item[1])
        (rejected, low), (chosen, high) = ranked[0], ranked[-1]
        if high - low < min_margin:
            dropped["dropped_small_margin"] += 1
            continue
        pairs.append({"prompt_id": prompt_id, "chosen": chosen, "rejected": rejected, "margin": high - low})
    return pairs, dropped
