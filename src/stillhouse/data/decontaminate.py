"""N-gram decontamination: drop training prompts that share a word n-gram with reference texts.

Reference texts are the pipeline's own eval split and any benchmark files in the config (every
string field of every row: question, choices and answer alike). Words are lowercased runs of
letters and digits, so punctuation and spacing don't hide a match. A text shorter than n words is
one n-gram of its own length, matched only as a whole, so a short prompt is not flagged for
containing a common word. N-grams found in more than ``ignore_common`` reference rows are shared
boilerplate ("Answer the following question ..."), not leaks, and are ignored.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from stillhouse.errors import InputError

WORD = re.compile(r"\w+")


def ngrams(text: str, n: int) -> list[str]:
    words = WORD.findall(text.lower())
    if len(words) < n:
        return [" ".join(words)] if words else []
    return [" ".join(words[i : i + n]) for i in range(len(words) - n + 1)]


def ngram_hashes(text: str, n: int) -> list[int]:
    return [xxhash.xxh64_intdigest(gram.encode()) for gram in ngrams(text, n)]


def strings_in(value: Any) -> Iterator[str]:
    """Every string inside a JSON-like value (lists and dicts included)."""
    if isinstance(value, str):
        if value.strip():
            yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from strings_in(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from strings_in(item)


@dataclass
class ReferenceNgrams:
    """Sorted unique n-gram hashes of the reference texts, and which reference each came from."""

    hashes: np.ndarray
    origins: np.ndarray
    labels: list[str]
    n: int
    ignored_common: int = 0

    @classmethod
    def build(
        cls, rows: Iterable[tuple[int, Sequence[str]]], labels: list[str], n: int, ignore_common: int | None
    ) -> ReferenceNgrams:
        """``rows``: (label index, texts of one reference row)."""
        per_row, origin_per_row = [], []
        for label, texts in rows:
            hashes = np.unique(np.fromiter((h for text in texts for h in ngram_hashes(text, n)), dtype=np.uint64))
            per_row.append(hashes)
            origin_per_row.append(np.full(len(hashes), label, dtype=np.int32))
        if not per_row:
            return cls(np.empty(0, np.uint64), np.empty(0, np.int32), labels, n)
        every, origins = np.concatenate(per_row), np.concatenate(origin_per_row)
        hashes, first, counts = np.unique(every, return_index=True, return_counts=True)
        keep = np.ones(len(hashes), dtype=bool) if ignore_common is None else counts <= ignore_common
        return cls(hashes[keep], origins[first][keep], labels, n, ignored_common=int((~keep).sum()))

    def __len__(self) -> int:
        return len(self.hashes)

    def match(self, texts: Sequence[str]) -> np.ndarray:
        """Per text, the index into ``hashes`` of its first matching n-gram, or -1."""
        found = np.full(len(texts), -1, dtype=np.int64)
        if not len(self.hashes):
            return found
        per_text = [ngram_hashes(text, self.n) for text in texts]
        lengths = np.fromiter(map(len, per_text), dtype=np.int64, count=len(texts))
        grams = np.fromiter(itertools.chain.from_iterable(per_text), dtype=np.uint64, count=int(lengths.sum()))
        positions = np.minimum(np.searchsorted(self.hashes, grams), len(self.hashes) - 1)
        hit = self.hashes[positions] == grams
        rows = np.repeat(np.arange(len(texts)), lengths)[hit]
        first_rows, first = np.unique(rows, return_index=True)
        found[first_rows] = positions[hit][first]
        return found

    def evidence(self, text: str, hit: int) -> dict[str, str]:
        """For the report: the shared n-gram and where it came from."""
        target = self.hashes[hit]
        gram = next((g for g in ngrams(text, self.n) if xxhash.xxh64_intdigest(g.encode()) == target), "")
        return {"ngram": gram, "matches": self.labels[self.origins[hit]]}


BENCHMARK_READERS = (".jsonl", ".json", ".csv", ".parquet")


def check_benchmarks(paths: Sequence[str]) -> list[Path]:
    """The benchmark files as paths; a missing or unreadable kind of file fails naming its entry."""
    checked = []
    for index, name in enumerate(paths):
        path = Path(name).expanduser()
        if not path.is_file():
            raise InputError(
                f"curate.decontaminate.benchmarks[{index}]: benchmark file {name!r} does not exist; "
                f"check the path (relative paths start from {Path.cwd()}) or remove it from the list"
            )
        if path.suffix.lower() not in BENCHMARK_READERS:
            raise InputError(
                f"curate.decontaminate.benchmarks[{index}]: {name!r} has an unsupported extension; "
                "use .jsonl, .parquet or .csv"
            )
        checked.append(path)
    return checked


def benchmark_rows(paths: Sequence[str], batch_rows: int) -> Iterator[tuple[int, list[str]]]:
    """(benchmark index, string fields of one row) for every row of every benchmark file."""
    from stillhouse.data.sources import Problems, read_csv, read_jsonl, read_parquet

    readers = {".jsonl": read_jsonl, ".json": read_jsonl, ".csv": read_csv, ".parquet": read_parquet}
    problems = Problems("fail", fix="fix the benchmark file: one that can't be read fully can't vouch for anything")
    for index, path in enumerate(check_benchmarks(paths)):
        for batch in readers[path.suffix.lower()](path, batch_rows, problems):
            for record in batch.records:
                yield index, list(strings_in(record))
