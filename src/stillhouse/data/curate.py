"""Curation: read sources in batches, map rows to chat messages, filter, deduplicate, mix, split, decontaminate.

    from stillhouse.data.curate import curate, read_split
    dataset = curate(config.curate, Store(".stillhouse/store"))
    train = read_split(dataset, "train")

Output in the store under the stage fingerprint: ``train.parquet`` and ``eval.parquet`` with columns
``prompt_id`` (hash of the normalized prompt), ``messages`` (JSON list of ``{role, content}`` ending on
a user turn), ``reference`` (or null), ``category`` (or null) and ``source`` (the mixture entry it came
from); and ``report/`` (counts per filter, length histograms, examples of removed rows).

The steps, in order, each counted:

1. read every source in batches; malformed rows fail or are skipped (``on_error``);
2. per batch, row filters: empty, PII masking (kept), characters, teacher tokens, repetition,
   benchmark contamination; survivors go to temporary Parquet shards, and their ids, split keys,
   lengths and MinHash signatures to numpy arrays (no per-row Python objects are kept);
3. over those arrays: exact duplicates, near duplicates, the mixture's weights and caps, ``max_rows``;
4. the split, by a salted hash of the normalized prompt (stable across reruns and row order);
5. training prompts that share an n-gram with the eval split are dropped; the splits are written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import xxhash
from tqdm.auto import tqdm

from stillhouse.config import CurateConfig
from stillhouse.data.decontaminate import ReferenceNgrams, check_benchmarks
from stillhouse.data.dedup import MinHasher, band_parameters, first_occurrences, near_duplicates
from stillhouse.data.filters import RowFilters
from stillhouse.data.report import CurationReport
from stillhouse.data.schema import (
    ColumnMapping,
    RowError,
    conversation_text,
    normalized_messages,
    optional_text,
    resolve_mapping,
    to_messages,
    user_text,
)
from stillhouse.data.sources import (
    Problems,
    RawBatch,
    Source,
    count_rows,
    read_batches,
    resolve_sources,
    source_identity,
    source_kind,
)
from stillhouse.errors import InputError
from stillhouse.refs import DatasetRef
from stillhouse.store import Store, file_sha256, fingerprint

CODE_VERSION = 2
SPLITS = ("train", "eval")
OUTPUT_SCHEMA = pa.schema(
    [(name, pa.string()) for name in ("prompt_id", "messages", "reference", "category", "source")]
)
WORK_SCHEMA = OUTPUT_SCHEMA.append(pa.field("text", pa.string())).append(pa.field("where", pa.string()))

__all__ = ["curate", "curate_frame", "read_split", "source_kind"]

log = logging.getLogger(__name__)


def read_split(dataset: DatasetRef, split: str) -> pd.DataFrame:
    return pd.read_parquet(Path(dataset.path) / f"{split}.parquet")


def curate(config: CurateConfig, store: Store, progress: Callable[[float], None] | None = None) -> DatasetRef:
    sources = resolve_sources(config)  # fail on a missing file before anything else
    benchmarks = [f"file-sha256:{file_sha256(path)}" for path in check_benchmarks(config.decontaminate.benchmarks)]
    inputs = {
        "sources": json.dumps([source_identity(source, config) for source in sources]),
        "benchmarks": json.dumps(benchmarks),
    }
    stage_fingerprint = fingerprint("curate", config, inputs, CODE_VERSION)
    output = store.build(
        "curate", stage_fingerprint, lambda folder: run_curation(config, sources, folder, read_batches, progress)
    )
    counts = output.manifest["counts"]
    return DatasetRef(
        stage="curate",
        fingerprint=stage_fingerprint,
        path=str(output.path),
        cached=output.cached,
        train_rows=counts["train_rows"],
        eval_rows=counts["eval_rows"],
        has_references=output.manifest["has_references"],
        counts=counts,
    )


def curate_frame(frame: pd.DataFrame, config: CurateConfig) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, int]]:
    """Curate an in-memory frame as if it were the (single) source: returns (train, eval, counts)."""
    source = Source(0, config.source_list()[0], "curate", "frame", "frame")

    def batches(_source: Source, config: CurateConfig, _problems: Problems) -> Iterator[RawBatch]:
        for start in range(0, len(frame), config.batch_rows):
            chunk = frame.iloc[start : start + config.batch_rows]
            yield RawBatch(
                chunk.to_dict("records"), list(range(start + 1, start + len(chunk) + 1)), list(frame.columns)
            )

    with tempfile.TemporaryDirectory() as folder:
        manifest = run_curation(config, [source], Path(folder), batches)
        train, evaluation = (pd.read_parquet(Path(folder) / f"{split}.parquet") for split in SPLITS)
    return train, evaluation, manifest["counts"]


@dataclass
class Survivors:
    """Per-row arrays of the rows that passed the row filters, in read order, and the shards holding their text."""

    keys: list[np.ndarray] = field(default_factory=list)
    split_keys: list[np.ndarray] = field(default_factory=list)
    sources: list[np.ndarray] = field(default_factory=list)
    chars: list[np.ndarray] = field(default_factory=list)
    tokens: list[np.ndarray] = field(default_factory=list)
    signatures: list[np.ndarray] = field(default_factory=list)
    shards: list[tuple[Path, int]] = field(default_factory=list)

    def concatenated(self, name: str, dtype) -> np.ndarray:
        return concatenated(getattr(self, name), dtype)

    def iter_shards(self, columns: list[str]) -> Iterator[tuple[int, pa.Table]]:
        offset = 0
        for path, rows in self.shards:
            yield offset, pq.read_table(path, columns=columns)
            offset += rows

    def fetch(self, indices: list[int], column: str) -> dict[int, str]:
        """The values of one column at a few global row indices (for report examples)."""
        wanted, found, offset = sorted(set(indices)), {}, 0
        for path, rows in self.shards:
            local = [i - offset for i in wanted if offset <= i < offset + rows]
            if local:
                values = pq.read_table(path, columns=[column]).column(column).take(local).to_pylist()
                found.update({i + offset: v for i, v in zip(local, values)})
            offset += rows
        return found


def run_curation(
    config: CurateConfig,
    sources: list[Source],
    folder: Path,
    batches: Callable[[Source, CurateConfig, Problems], Iterator[RawBatch]],
    progress: Callable[[float], None] | None = None,
) -> dict:
    """Curate into ``folder`` (train/eval Parquet and report/); returns the manifest's content."""
    work = folder / ".work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        return Curation(config, sources, work, progress or (lambda fraction: None)).run(folder, batches)
    finally:
        shutil.rmtree(work, ignore_errors=True)


class Curation:
    """One curation run: `run` is the recipe, top to bottom; the other methods are its steps."""

    def __init__(self, config: CurateConfig, sources: list[Source], work: Path, progress: Callable[[float], None]):
        self.config, self.sources, self.work, self.progress = config, sources, work, progress
        self.report = CurationReport(max_examples=config.report_examples)
        self.report.count("rows_in", 0)
        self.problems = Problems(config.on_error, max_examples=config.report_examples)
        self.row_filters = RowFilters(config, self.report)
        near = config.filters.near_duplicates
        self.hasher = MinHasher(near.num_perm, near.shingle_size) if near.enabled else None
        self.survivors = Survivors()
        self.chars_read: list[np.ndarray] = []
        self.tokens_read: list[np.ndarray] = []

    def run(self, folder: Path, batches: Callable[[Source, CurateConfig, Problems], Iterator[RawBatch]]) -> dict:
        self.read_sources(batches)
        survivors, report, config = self.survivors, self.report, self.config
        keys, split_keys = survivors.concatenated("keys", np.uint64), survivors.concatenated("split_keys", np.float64)
        source_of = survivors.concatenated("sources", np.int16)
        alive = np.ones(len(keys), dtype=bool)
        manifest = {}
        if config.filters.exact_duplicates:
            _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
            self.drop("dropped_duplicate", ~first_occurrences(keys), alive, duplicate_of=first[inverse])
        near = config.filters.near_duplicates
        if near.enabled:
            signatures = np.concatenate(survivors.signatures)
            survivors.signatures.clear()
            found = near_duplicates(signatures, near.threshold, candidates=alive)
            del signatures
            self.drop("dropped_near_duplicate", found.removed, alive, duplicate_of=found.representative)
            manifest["near_duplicate_lsh"] = dict(
                zip(("bands", "rows_per_band"), band_parameters(near.threshold, near.num_perm))
            )
        before = {s.name: int((alive & (source_of == s.index)).sum()) for s in self.sources}
        for source in self.sources:  # a mixture entry that filtering emptied is a mapping or filter mistake
            if len(self.sources) > 1 and before[source.name] == 0:
                raise InputError(
                    f"{source.field}: no rows of {source.config.source!r} are left after filtering; fix its column "
                    "mapping or filters, or remove it from the mixture"
                )
        if any(s.config.weight is not None or s.config.max_rows is not None for s in self.sources):
            self.drop("dropped_mixture", ~draw_mixture(config, self.sources, keys, source_of, alive), alive)
            after = {s.name: int((alive & (source_of == s.index)).sum()) for s in self.sources}
            if after != before:  # never silently: the weights or caps dropped rows the data had
                log.warning(
                    "curate: the mixture's weights and caps kept %d of %d rows (%s); leave `weight` unset on every "
                    "source to keep them all",
                    sum(after.values()),
                    sum(before.values()),
                    ", ".join(f"{name}: {after[name]} of {before[name]}" for name in before),
                )
        if config.max_rows is not None and alive.sum() > config.max_rows:
            rows = np.flatnonzero(alive)
            beyond = np.zeros(len(alive), dtype=bool)
            beyond[rows[np.argsort(split_keys[rows], kind="stable")[config.max_rows :]]] = True
            self.drop("dropped_max_rows", beyond, alive)
        is_eval = split_keys < config.eval_fraction
        if config.decontaminate.eval_split:
            alive &= ~self.eval_contamination(alive & is_eval, alive & ~is_eval)
        self.progress(0.95)

        counts = {"train_rows": int((alive & ~is_eval).sum()), "eval_rows": int((alive & is_eval).sum())}
        if counts["train_rows"] == 0 or counts["eval_rows"] == 0:
            empty = "train" if counts["train_rows"] == 0 else "eval"
            raise InputError(
                f"curate: {int(alive.sum())} prompts give an empty {empty} split; "
                "add data or change curate.eval_fraction"
            )
        has_references = write_splits(folder, survivors, alive, is_eval)
        for source in self.sources:
            report.sources.setdefault(source.name, {"rows_in": 0})["rows_out"] = int(
                (alive & (source_of == source.index)).sum()
            )
        report.counts.update(counts)
        lengths = {"chars": (concatenated(self.chars_read, np.int32), survivors.concatenated("chars", np.int32)[alive])}
        if self.row_filters.token_counter is not None:
            tokens_read = concatenated(self.tokens_read, np.int32)
            lengths["tokens"] = (tokens_read[tokens_read >= 0], survivors.concatenated("tokens", np.int32)[alive])
        report_files = report.write(folder / "report", lengths)
        self.progress(1.0)
        counts = dict(report.counts)
        for name, info in report.sources.items():
            counts[f"rows_in.{name}"], counts[f"rows_out.{name}"] = info["rows_in"], info["rows_out"]
        return {
            "counts": counts,
            "has_references": has_references,
            "sources": report.sources,
            "report": [f"report/{name}" for name in report_files],
            "columns": OUTPUT_SCHEMA.names,
            **manifest,
        }

    def read_sources(self, batches: Callable[[Source, CurateConfig, Problems], Iterator[RawBatch]]) -> None:
        """Step 1-2: every batch of every source through the row filters, survivors into shards and arrays."""
        totals = [count_rows(source, self.config) if source.kind != "frame" else None for source in self.sources]
        total = sum(totals) if all(t is not None for t in totals) else None
        report = self.report
        with tqdm(total=total, unit="rows", desc="curate", mininterval=1.0) as bar:
            for source in self.sources:
                mapping, label = None, source.config.source if source.kind != "frame" else "the frame"
                unit = (
                    "line"
                    if source.kind == "file" and source.path.suffix.lower() in (".jsonl", ".json", ".csv")
                    else "row"
                )
                read = 0
                for batch in batches(source, self.config, self.problems):
                    if mapping is None:
                        mapping = resolve_mapping(source.config, batch.columns, source.field, label)
                        report.sources[source.name] = {
                            "source": label,
                            "format": mapping.format,
                            "rows_in": 0,
                            "rows_out": 0,
                        }
                    read += len(batch.records)
                    report.count("rows_in", len(batch.records))
                    report.sources[source.name]["rows_in"] += len(batch.records)
                    self.process_batch(batch, source, mapping, f"{label}: {unit}")
                    bar.update(len(batch.records))
                    if total:
                        self.progress(0.85 * report.counts["rows_in"] / total)
                if read == 0 and not self.problems.skipped:
                    raise InputError(
                        f"{source.field}.source: {label!r} has no rows; point it at a dataset with prompts"
                    )
        report.counts["skipped_malformed"] = self.problems.skipped
        if self.problems.examples:
            report.examples["skipped_malformed"] = [
                {"source": "", "text": "", **example} for example in self.problems.examples
            ]
        if not self.survivors.shards:
            labels = ", ".join(repr(s.config.source) for s in self.sources)
            raise InputError(
                f"curate: every row of {labels} was empty, malformed or filtered out; "
                "check the prompt column and the filters"
            )

    def process_batch(self, batch: RawBatch, source: Source, mapping: ColumnMapping, place: str) -> None:
        """Map one batch to messages, apply the row filters, keep the survivors' text in a shard
        and their keys in arrays."""
        messages, references, categories, wheres = [], [], [], []
        for record, position in zip(batch.records, batch.positions):
            where = f"{place} {position}"
            try:
                conversation = to_messages(record, mapping)
            except RowError as error:
                self.problems.report(where, f"{error} (format {mapping.format})")
                continue
            if not conversation:
                self.report.count("dropped_empty")
                self.report.add_example("dropped_empty", source.name, where, repr(record.get(mapping.prompt_column)))
                continue
            messages.append(conversation)
            references.append(optional_text(record, mapping.reference_column))
            categories.append(optional_text(record, mapping.category_column))
            wheres.append(where)
        if not messages:
            return
        texts = [user_text(m) for m in messages]
        keep, chars, tokens = self.row_filters.apply(messages, texts, wheres, source.name)
        self.chars_read.append(chars)
        self.tokens_read.append(tokens)
        rows = np.flatnonzero(keep)
        if not len(rows):
            return
        survivors = self.survivors
        normalized = [normalized_messages(messages[row]) for row in rows]
        prompt_ids = [short_sha256(text) for text in normalized]
        survivors.keys.append(np.array([int(p, 16) for p in prompt_ids], dtype=np.uint64))
        # Position in [0, 1) from a salted hash of the prompt: stable across reruns and row order.
        survivors.split_keys.append(
            np.array([int(short_sha256(self.config.split_salt + text)[:15], 16) / 16**15 for text in normalized])
        )
        survivors.sources.append(np.full(len(rows), source.index, dtype=np.int16))
        survivors.chars.append(chars[rows])
        survivors.tokens.append(tokens[rows])
        if self.hasher is not None:
            survivors.signatures.append(self.hasher.signatures([texts[row] for row in rows]))
        shard = self.work / f"{len(survivors.shards):06d}.parquet"
        pq.write_table(
            pa.table(
                {
                    "prompt_id": prompt_ids,
                    "messages": [json.dumps(messages[row], ensure_ascii=False) for row in rows],
                    "reference": [references[row] for row in rows],
                    "category": [categories[row] for row in rows],
                    "source": [source.name] * len(rows),
                    "text": [texts[row] for row in rows],
                    "where": [wheres[row] for row in rows],
                },
                schema=WORK_SCHEMA,
            ),
            shard,
        )
        survivors.shards.append((shard, len(rows)))

    def drop(self, name: str, rejected: np.ndarray, alive: np.ndarray, duplicate_of: np.ndarray | None = None) -> None:
        """Remove ``rejected`` rows that are still alive, count them, and keep examples
        (with the row each duplicates)."""
        newly = np.flatnonzero(rejected & alive)
        self.report.count(name, len(newly))
        alive[newly] = False
        examples = newly[: self.report.max_examples].tolist()
        if not examples:
            return
        kept_rows = [int(duplicate_of[row]) for row in examples] if duplicate_of is not None else []
        texts = self.survivors.fetch(examples + kept_rows, "messages")
        wheres = self.survivors.fetch(examples + kept_rows, "where")
        names = self.survivors.fetch(examples, "source")
        for position, row in enumerate(examples):
            detail = {}
            if duplicate_of is not None:
                kept = kept_rows[position]
                detail = {
                    "duplicate_of": conversation_text(json.loads(texts[kept])),
                    "duplicate_of_where": wheres[kept],
                }
            self.report.add_example(name, names[row], wheres[row], conversation_text(json.loads(texts[row])), **detail)

    def eval_contamination(self, eval_rows: np.ndarray, train_rows: np.ndarray) -> np.ndarray:
        """Step 5: training rows sharing an n-gram with the eval split (a boolean mask over all rows)."""
        decontaminate, report, survivors = self.config.decontaminate, self.report, self.survivors
        report.count("dropped_contaminated_eval", 0)

        def eval_texts() -> Iterator[tuple[int, list[str]]]:
            for offset, table in survivors.iter_shards(["text"]):
                for text in (
                    table.filter(pa.array(eval_rows[offset : offset + table.num_rows])).column("text").to_pylist()
                ):
                    yield 0, [text]

        reference = ReferenceNgrams.build(
            eval_texts(), ["eval split"], decontaminate.ngram, decontaminate.ignore_common
        )
        contaminated = np.zeros(len(eval_rows), dtype=bool)
        for offset, table in survivors.iter_shards(["text", "messages", "where", "source"]):
            local = np.flatnonzero(train_rows[offset : offset + table.num_rows])
            if not len(local):
                continue
            texts = table.column("text").take(local).to_pylist()
            hits = reference.match(texts)
            contaminated[offset + local[hits >= 0]] = True
            for position in np.flatnonzero(hits >= 0)[: report.max_examples]:
                if report.wants_example("dropped_contaminated_eval"):
                    row = int(local[position])
                    report.add_example(
                        "dropped_contaminated_eval",
                        table.column("source")[row].as_py(),
                        table.column("where")[row].as_py(),
                        conversation_text(json.loads(table.column("messages")[row].as_py())),
                        **reference.evidence(texts[position], hits[position]),
                    )
        report.count("dropped_contaminated_eval", int(contaminated.sum()))
        return contaminated


def concatenated(parts: list[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate(parts) if parts else np.empty(0, dtype=dtype)


def short_sha256(text: str) -> str:
    """The first 16 hex digits of sha256: the prompt id format the rest of the pipeline knows."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def draw_mixture(
    config: CurateConfig, sources: list[Source], keys: np.ndarray, source_of: np.ndarray, alive: np.ndarray
) -> np.ndarray:
    """Rows drawn for the mixture: each source's share of the output follows its weight, within its cap.

    With weights, the total is the largest the sources can fill in those shares; without, every source gives all
    its rows up to its cap. Within a source, rows are drawn in the order of a hash of (seed, source name, prompt id),
    so the draw is deterministic and independent of row order.
    """
    available = np.array(
        [min(int((alive & (source_of == s.index)).sum()), s.config.max_rows or np.iinfo(np.int64).max) for s in sources]
    )
    if any(s.config.weight is None for s in sources):  # caps only: each source up to its cap, no shares
        return _draw_within_caps(config, sources, keys, source_of, alive, available)
    weights = np.array([s.config.weight for s in sources], dtype=np.float64)
    shares = weights / weights.sum()
    for source, count in zip(sources, available):
        if count == 0:
            raise InputError(
                f"{source.field}: no rows of {source.config.source!r} are left after filtering, so its weight can't be "
                "met; fix its column mapping or filters, or remove it from the mixture"
            )
    total = float(np.min(available / shares))
    takes = np.array([min(int(count), int(round(total * share))) for share, count in zip(shares, available)])
    return _draw_within_caps(config, sources, keys, source_of, alive, takes)


def _draw_within_caps(
    config: CurateConfig,
    sources: list[Source],
    keys: np.ndarray,
    source_of: np.ndarray,
    alive: np.ndarray,
    takes: np.ndarray,
) -> np.ndarray:
    """Each source's first ``takes[i]`` rows in the hash order of (seed, source name, prompt id)."""
    drawn = np.zeros(len(keys), dtype=bool)
    for source, take in zip(sources, takes):
        rows = np.flatnonzero(alive & (source_of == source.index))
        salt = np.uint64(xxhash.xxh64_intdigest(f"{config.mixture_seed}:{source.name}".encode()))
        drawn[rows[np.argsort(mix64(keys[rows] ^ salt), kind="stable")[: int(take)]]] = True
    return drawn


def mix64(values: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a bijective scramble of uint64 values."""
    values = values.astype(np.uint64)
    values ^= values >> np.uint64(30)
    values *= np.uint64(0xBF58476D1CE4E5B9)
    values ^= values >> np.uint64(27)
    values *= np.uint64(0x94D049BB133111EB)
    values ^= values >> np.uint64(31)
    return values


def write_splits(folder: Path, survivors: Survivors, alive: np.ndarray, is_eval: np.ndarray) -> bool:
    """Stream the surviving rows from the shards into train.parquet and eval.parquet;
    True when any row has a reference."""
    writers = {split: pq.ParquetWriter(folder / f"{split}.parquet", OUTPUT_SCHEMA) for split in SPLITS}
    has_references = False
    try:
        for offset, table in survivors.iter_shards(OUTPUT_SCHEMA.names):
            rows = slice(offset, offset + table.num_rows)
            for split, selected in (("train", alive[rows] & ~is_eval[rows]), ("eval", alive[rows] & is_eval[rows])):
                chosen = table.filter(pa.array(selected))
                if chosen.num_rows:
                    writers[split].write_table(chosen)
                    has_references = has_references or (
                        split == "train" and chosen.column("reference").null_count < chosen.num_rows
                    )
    finally:
        for writer in writers.values():
            writer.close()
    return has_references
