"""Curation at scale: throughput, peak memory and deduplication quality on synthetic prompts.

    .venv/bin/python benchmarks/curation.py [--rows 100000 1000000] [--workdir /tmp/curation-bench]

For each size, writes a JSONL file of synthetic prompts (template + 15-60 words from a Zipf
vocabulary) where 10% of rows are exact duplicates (case and spacing changed) and 10% near
duplicates (1-3 words replaced) of distinct originals, then curates it in a fresh subprocess with
exact and near-duplicate removal on. Each row's `reference` names its group (an original and its
copies) and `category` says what it is, so the output tells:

- near_duplicate_recall: share of injected near duplicates removed (target >= 0.95);
- wrong_removal_share: share of distinct prompts of which no copy survived (target <= 0.01);
- rows_per_s and peak_rss_mb (the subprocess's ru_maxrss: imports and all) per size;
- time_ratio: seconds of the largest size over the smallest (target <= 12 for 1M / 100k).

Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

TEMPLATES = [
    "Explain",
    "Write a short story about",
    "Summarize the following notes:",
    "Translate into French:",
    "What is the meaning of",
    "Give three examples of",
    "Write a poem about",
    "Describe the history of",
    "List the pros and cons of",
    "Answer briefly:",
    "Compare",
    "Rewrite this paragraph more formally:",
    "Why does",
    "How would you test",
    "Draft an email about",
]


def make_vocabulary(rng: np.random.Generator, size: int) -> list[str]:
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    lengths = rng.integers(3, 10, size)
    return ["".join(rng.choice(letters, length)) for length in lengths]


def write_synthetic(path: Path, rows: int, seed: int = 0) -> dict[str, int]:
    """JSONL with `rows` lines: 80% distinct originals, 10% exact and 10% near duplicates of other originals."""
    rng = np.random.default_rng(seed)
    vocabulary = make_vocabulary(rng, 50_000)
    ranks = np.arange(1, len(vocabulary) + 1)
    probabilities = (1 / ranks) / (1 / ranks).sum()  # Zipf: a few words are common, most are rare
    exact, near = rows // 10, rows // 10
    originals = rows - exact - near
    lengths = rng.integers(15, 61, originals)
    words = rng.choice(len(vocabulary), int(lengths.sum()), p=probabilities)
    templates = rng.integers(0, len(TEMPLATES), originals)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    copied = rng.permutation(originals)[: exact + near]  # distinct originals get one copy each
    kinds = ["exact"] * exact + ["near"] * near
    order = rng.permutation(originals + exact + near)  # copies can come before their original
    lines: list[str | None] = [None] * (originals + exact + near)

    def text_of(group: int) -> list[str]:
        return [TEMPLATES[templates[group]]] + [vocabulary[w] for w in words[starts[group] : starts[group + 1]]]

    for group in range(originals):
        lines[order[group]] = json.dumps(
            {"prompt": " ".join(text_of(group)), "reference": str(group), "category": "original"}
        )
    for index, (group, kind) in enumerate(zip(copied, kinds)):
        tokens = text_of(group)
        if kind == "exact":
            text = "  ".join(tokens).upper() if index % 2 else " ".join(tokens) + "  "
        else:
            for position in rng.choice(np.arange(1, len(tokens)), rng.integers(1, 4), replace=False):
                tokens[position] = vocabulary[rng.integers(len(vocabulary))]
            text = " ".join(tokens)
        lines[order[originals + index]] = json.dumps({"prompt": text, "reference": str(group), "category": kind})
    with open(path, "w") as handle:
        for start in range(0, len(lines), 100_000):
            handle.write("\n".join(lines[start : start + 100_000]) + "\n")
    return {"rows": rows, "originals": originals, "exact_duplicates": exact, "near_duplicates": near}


def run_child(data: Path, store: Path, near: dict) -> None:
    """Curate ``data`` and print seconds, peak RSS and the quality figures as one JSON line."""
    import pandas as pd

    from stillhouse.config import CurateConfig
    from stillhouse.data.curate import curate, read_split
    from stillhouse.store import Store

    config = CurateConfig(
        source=str(data),
        category_column="category",
        batch_rows=20_000,
        filters={"near_duplicates": {"enabled": True, **near}},
    )
    started = time.perf_counter()
    dataset = curate(config, Store(store))
    seconds = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kept = pd.concat([read_split(dataset, split)[["reference", "category"]] for split in ("train", "eval")])
    truth = pd.read_json(data, lines=True, dtype={"reference": str})[["reference", "category"]]
    survivors = kept.groupby("reference").size()
    groups = truth.groupby("reference")["category"].agg(
        lambda kinds: "near" if "near" in set(kinds) else "exact" if "exact" in set(kinds) else "single"
    )
    found = survivors.reindex(groups.index, fill_value=0)
    print(
        json.dumps(
            {
                "seconds": round(seconds, 2),
                "peak_rss_mb": round(peak_mb),
                "counts": dataset.counts,
                "near_duplicate_recall": round(float((found[groups == "near"] <= 1).mean()), 4),
                "exact_duplicate_recall": round(float((found[groups == "exact"] <= 1).mean()), 4),
                "wrong_removal_share": round(float((found == 0).mean()), 5),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/curation-bench"))
    parser.add_argument("--threshold", type=float, help="near-duplicate Jaccard threshold (default: the config's)")
    parser.add_argument("--shingle-size", type=int, help="characters per shingle (default: the config's)")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--store", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    near = {
        key: value
        for key, value in (("threshold", args.threshold), ("shingle_size", args.shingle_size))
        if value is not None
    }
    if args.child:
        run_child(args.child, args.store, near)
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    results = {}
    for rows in args.rows:
        data = args.workdir / f"prompts-{rows}.jsonl"
        if not data.exists():
            write_synthetic(data, rows)
        store = args.workdir / f"store-{rows}-{time.time_ns()}"
        options = [f"--{key.replace('_', '-')}={value}" for key, value in near.items()]
        finished = subprocess.run(
            [sys.executable, __file__, "--child", str(data), "--store", str(store), *options],
            capture_output=True,
            text=True,
            check=True,
        )
        figures = json.loads(finished.stdout.strip().splitlines()[-1])
        figures["rows_per_s"] = round(rows / figures["seconds"])
        results[rows] = figures
    sizes = sorted(results)
    print(
        json.dumps(
            {
                "benchmark": "curation",
                "near_duplicates": near or "defaults",
                "sizes": {str(k): results[k] for k in sizes},
                "time_ratio": round(results[sizes[-1]]["seconds"] / results[sizes[0]]["seconds"], 2)
                if len(sizes) > 1
                else None,
                "size_ratio": sizes[-1] / sizes[0] if len(sizes) > 1 else None,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
