"""The curation report: rows in and out per filter and per source, length histograms, removed examples.

Written into the stage folder as ``report/report.json``, ``report/report.md`` and
``report/length_*.png``; the curate task logs the folder to MLflow and the markdown as a Prefect
artifact.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

EXAMPLE_CHARS = 300

FILTER_DESCRIPTIONS = {
    "rows_in": "rows read",
    "skipped_malformed": "malformed rows skipped (on_error: skip)",
    "dropped_empty": "empty or whitespace-only",
    "masked_pii": "rows with emails, phones or keys masked (kept)",
    "dropped_too_short_chars": "fewer characters than min_chars",
    "dropped_too_long_chars": "more characters than max_chars",
    "dropped_too_short_tokens": "fewer teacher tokens than min_tokens",
    "dropped_too_long_tokens": "more teacher tokens than max_tokens",
    "dropped_repetitive": "too many repeated n-grams",
    "dropped_contaminated_benchmark": "shares an n-gram with a benchmark",
    "dropped_duplicate": "exact duplicate (normalized text)",
    "dropped_near_duplicate": "near duplicate (MinHash LSH)",
    "dropped_mixture": "not drawn by the mixture weights or caps",
    "dropped_max_rows": "beyond max_rows",
    "dropped_contaminated_eval": "training prompt sharing an n-gram with the eval split",
    "train_rows": "train split",
    "eval_rows": "eval split",
}


def shorten(text: str) -> str:
    return text if len(text) <= EXAMPLE_CHARS else text[:EXAMPLE_CHARS] + " …"


@dataclass
class CurationReport:
    max_examples: int
    counts: dict[str, int] = field(default_factory=dict)
    sources: dict[str, dict] = field(default_factory=dict)
    examples: dict[str, list[dict]] = field(default_factory=dict)

    def count(self, name: str, amount: int = 1) -> None:
        self.counts[name] = self.counts.get(name, 0) + int(amount)

    def wants_example(self, name: str) -> bool:
        return len(self.examples.get(name, [])) < self.max_examples

    def add_example(self, name: str, source: str, where: str, text: str, **detail: str) -> None:
        if self.wants_example(name):
            self.examples.setdefault(name, []).append(
                {"source": source, "where": where, "text": shorten(text), **detail}
            )

    def to_dict(self) -> dict:
        return {"counts": self.counts, "sources": self.sources, "examples": self.examples}

    def markdown(self) -> str:
        lines = ["## Curation", "", "| step | rows |", "|---|---|"]
        for name, value in self.counts.items():
            lines.append(f"| {FILTER_DESCRIPTIONS.get(name, name)} (`{name}`) | {value} |")
        lines += ["", "| source | format | rows in | rows out |", "|---|---|---|---|"]
        for name, info in self.sources.items():
            lines.append(
                f"| {name} | {info.get('format', '')} | {info.get('rows_in', 0)} | {info.get('rows_out', 0)} |"
            )
        for name, examples in self.examples.items():
            lines += ["", f"### Removed: {FILTER_DESCRIPTIONS.get(name, name)}", ""]
            for example in examples:
                detail = "; ".join(
                    f"{k}: {shorten(str(v))!r}" for k, v in example.items() if k not in ("source", "where", "text")
                )
                text = example["text"].replace("\n", " ").replace("|", "\\|")
                lines.append(
                    f"- {example['where']} ({example['source']}): {text!r}" + (f" — {detail}" if detail else "")
                )
        return "\n".join(lines) + "\n"

    def write(self, folder: Path, lengths: dict[str, tuple[np.ndarray, np.ndarray]]) -> list[str]:
        """report.json, report.md and one histogram PNG per measure of length (rows in vs rows out)."""
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "report.json").write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")
        (folder / "report.md").write_text(self.markdown())
        written = ["report.json", "report.md"]
        for unit, (before, after) in lengths.items():
            if len(before):
                name = f"length_{unit}.png"
                length_histogram(before, after, unit, folder / name)
                written.append(name)
        return written


def length_histogram(before: np.ndarray, after: np.ndarray, unit: str, path: Path) -> None:
    """Prompt lengths before and after curation, log-spaced bins, as a PNG (matplotlib, no display needed)."""
    from matplotlib.figure import Figure

    low, high = max(int(before.min()), 1), max(int(before.max()), 2)
    bins = np.unique(np.geomspace(low, high + 1, 50).astype(int))
    figure = Figure(figsize=(7, 4), dpi=100)
    axes = figure.add_subplot()
    axes.hist(np.maximum(before, 1), bins=bins, alpha=0.5, label=f"read ({len(before)})")
    axes.hist(np.maximum(after, 1), bins=bins, alpha=0.7, label=f"kept ({len(after)})")
    axes.set_xscale("log")
    axes.set_xlabel(f"prompt length ({unit})")
    axes.set_ylabel("prompts")
    axes.set_title(f"Prompt lengths in {unit}")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
