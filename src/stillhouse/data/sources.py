"""Reading sources in batches: JSONL, Parquet, CSV, `datasets` folders, Hub ids and `builtin:` sources (the demo).

Every reader yields `RawBatch`es of at most ``batch_rows`` records (plain dicts) with the line or
row number of each, so that nothing holds a whole dataset as Python objects. Malformed lines
(invalid UTF-8, bad JSON, a CSV row with the wrong number of fields) go to `Problems`, which
either stops with the file and line (``on_error: fail``) or counts and skips them.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stillhouse.builtins import SOURCES, is_builtin, load_builtin
from stillhouse.config import CurateConfig, SourceConfig
from stillhouse.errors import InputError
from stillhouse.store import file_sha256

FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


@dataclass(frozen=True)
class Source:
    """A source ready to read: its config, where its settings live in the YAML, and its label."""

    index: int
    config: SourceConfig
    field: str  # "curate" for the single `source`, "curate.sources[2]" in a mixture
    name: str
    kind: str  # builtin | file | datasets-folder | hub

    @property
    def path(self) -> Path:
        return Path(self.config.source).expanduser()


@dataclass
class RawBatch:
    records: list[dict[str, Any]]
    positions: list[int]  # line numbers (jsonl, csv) or 1-based row numbers
    columns: list[str]


@dataclass
class Problems:
    """Malformed input: raise naming the place and the fix, or (``skip``) count it and keep a few examples."""

    on_error: str
    fix: str = "fix the data, or set curate.on_error: skip to drop such rows (they are counted)"
    max_examples: int = 5
    skipped: int = 0
    examples: list[dict[str, str]] = field(default_factory=list)

    def report(self, where: str, reason: str) -> None:
        if self.on_error == "fail":
            raise InputError(f"{where}: {reason}; {self.fix}")
        self.skipped += 1
        if len(self.examples) < self.max_examples:
            self.examples.append({"where": where, "reason": reason})


def source_kind(source: str | None) -> str:
    """`builtin`, `file`, `datasets-folder`, `hub` (or `mixture` for None);
    raises for a local path that is not there."""
    if source is None:
        return "mixture"
    if is_builtin(source):
        return "builtin"
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix.lower() not in FILE_SUFFIXES:
            raise InputError(f"curate.source: {source!r} has an unsupported extension; use .jsonl, .parquet or .csv")
        return "file"
    if path.is_dir():
        return "datasets-folder"
    if path.suffix.lower() in FILE_SUFFIXES or source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise InputError(
            f"curate.source: dataset file {source!r} does not exist; check the path "
            f"(relative paths start from {Path.cwd()})"
        )
    return "hub"


def default_name(source: SourceConfig, kind: str) -> str:
    if source.name:
        return source.name
    if kind == "builtin":
        return source.source.removeprefix("builtin:")
    if kind in ("file", "datasets-folder"):
        return Path(source.source).expanduser().stem if kind == "file" else Path(source.source).expanduser().name
    return source.source


def resolve_sources(config: CurateConfig) -> list[Source]:
    """The configured sources, each checked to exist; fails before any reading starts."""
    sources = []
    for index, source in enumerate(config.source_list()):
        field_path = "curate" if config.sources is None else f"curate.sources[{index}]"
        try:
            kind = source_kind(source.source)
        except InputError as error:
            raise InputError(str(error).replace("curate.source:", f"{field_path}.source:", 1)) from None
        if source.streaming and kind != "hub":
            raise InputError(
                f"{field_path}.streaming: only Hub datasets stream; {source.source!r} is read in batches anyway, "
                "set streaming: false"
            )
        name = re.sub(r"[^\w./-]", "_", default_name(source, kind))
        sources.append(Source(index, source, field_path, name, kind))
    for position, source in enumerate(sources):
        if source.name in [earlier.name for earlier in sources[:position]]:
            raise InputError(
                f"{source.field}.name: two sources are named {source.name!r}; give each mixture entry a distinct `name`"
            )
    return sources


def datasets_folder_identity(path: Path) -> str:
    """A `datasets` folder's content fingerprint(s) from its state.json files (written by save_to_disk)."""
    states = sorted(path.rglob("state.json"))
    if not states:
        return f"folder:{path.resolve()}"
    return "datasets:" + ",".join(
        f"{s.parent.relative_to(path)}={json.loads(s.read_text()).get('_fingerprint')}" for s in states
    )


def source_identity(source: Source, config: CurateConfig) -> str:
    """What the data is, for the stage fingerprint: a file's content hash, a folder's datasets fingerprint,
    else the id."""
    if source.kind == "file":
        return f"file-sha256:{file_sha256(source.path)}"
    if source.kind == "datasets-folder":
        return datasets_folder_identity(source.path)
    if source.kind == "builtin":
        return f"{source.config.source}:{config.demo_rows}:{config.demo_seed}"
    return source.config.source


def count_rows(source: Source, config: CurateConfig) -> int | None:
    """Rows in a source when that is cheap to know (for the progress bar); None otherwise."""
    if source.kind == "builtin":
        return config.demo_rows
    if source.kind == "file":
        suffix = source.path.suffix.lower()
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(source.path).metadata.num_rows
        if suffix in (".jsonl", ".json"):
            with open(source.path, "rb") as handle:
                return sum(block.count(b"\n") for block in iter(lambda: handle.read(1 << 22), b""))
    return None


def read_batches(source: Source, config: CurateConfig, problems: Problems) -> Iterator[RawBatch]:
    """The source's records in batches of at most ``config.batch_rows``."""
    if source.kind == "builtin":
        rows = load_builtin(SOURCES, source.config.source, f"{source.field}.source")(config.demo_rows, config.demo_seed)
        for start in range(0, len(rows), config.batch_rows):
            chunk = rows[start : start + config.batch_rows]
            yield RawBatch(chunk, list(range(start + 1, start + len(chunk) + 1)), ["prompt", "reference", "task"])
        return
    if source.kind == "file":
        suffix = source.path.suffix.lower()
        if suffix == ".parquet":
            yield from read_parquet(source.path, config.batch_rows, problems)
        else:
            reader = read_csv if suffix == ".csv" else read_jsonl
            yield from reader(source.path, config.batch_rows, problems, max_line_bytes=config.max_line_bytes)
        return
    yield from read_datasets(source, config.batch_rows)


DEFAULT_MAX_LINE_BYTES = 32 * 1024 * 1024


def bounded_lines(handle, max_bytes: int) -> Iterator[tuple[int, bytes | None, int]]:
    """(line number, its bytes or None when longer than ``max_bytes``, its length) for each line of a binary file.

    An over-long line is read through in 1 MiB pieces and dropped, never held whole: a 1 GB line costs 1 MiB.
    """
    line_number = 0
    while True:
        raw = handle.readline(max_bytes + 1)
        if not raw:
            return
        line_number += 1
        if len(raw) <= max_bytes or raw.endswith(b"\n"):
            yield line_number, raw, len(raw)
            continue
        length = len(raw)
        while not raw.endswith(b"\n"):
            raw = handle.readline(1 << 20)
            if not raw:
                break
            length += len(raw)
        yield line_number, None, length


def too_long(length: int, max_bytes: int) -> str:
    return (
        f"is {length:,} bytes long, over curate.max_line_bytes ({max_bytes:,}); raise that limit if such rows "
        "are real data"
    )


def read_jsonl(
    path: Path, batch_rows: int, problems: Problems, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
) -> Iterator[RawBatch]:
    """JSON Lines, one object per line; blank lines are ignored. Columns: the keys of the first batch."""
    records, positions, columns = [], [], None
    with open(path, "rb") as handle:
        for line_number, raw, length in bounded_lines(handle, max_line_bytes):
            where = f"{path}: line {line_number}"
            if raw is None:
                problems.report(where, too_long(length, max_line_bytes))
                continue
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                problems.report(where, f"invalid UTF-8 (byte {error.start} of the line); re-encode the file as UTF-8")
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as error:
                problems.report(where, f"not valid JSON: {error.msg.removesuffix(' at')} (column {error.colno})")
                continue
            if not isinstance(record, dict):
                problems.report(
                    where,
                    f"is a JSON {type(record).__name__}, not an object; JSON Lines files hold one object per line",
                )
                continue
            records.append(record)
            positions.append(line_number)
            if len(records) == batch_rows:
                columns = columns or list(dict.fromkeys(key for r in records for key in r))
                yield RawBatch(records, positions, columns)
                records, positions = [], []
    if records:
        yield RawBatch(records, positions, columns or list(dict.fromkeys(key for r in records for key in r)))


def decoded_lines(
    handle, bad_lines: set[int], long_lines: dict[int, int] | None = None, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
) -> Iterator[str]:
    """Lines of a binary file as text; a line with invalid UTF-8 is remembered and decoded with replacement, an
    over-long one remembered (with its length) and read as an empty line."""
    for line_number, raw, length in bounded_lines(handle, max_line_bytes):
        if raw is None:
            if long_lines is not None:
                long_lines[line_number] = length
            yield "\n"
            continue
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError:
            bad_lines.add(line_number)
            yield raw.decode("utf-8", "replace")


def read_csv(
    path: Path, batch_rows: int, problems: Problems, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
) -> Iterator[RawBatch]:
    """CSV with a header row; every value is read as text (no type guessing: "007" stays "007")."""
    bad_lines: set[int] = set()
    long_lines: dict[int, int] = {}
    csv.field_size_limit(max(max_line_bytes, csv.field_size_limit()))  # a field may be as long as a line may
    with open(path, "rb") as handle:
        reader = csv.reader(decoded_lines(handle, bad_lines, long_lines, max_line_bytes))
        try:
            header = next(reader)
        except StopIteration:
            return
        if bad_lines:
            raise InputError(f"{path}: line 1 (the header) is not valid UTF-8; re-encode the file as UTF-8")
        records, positions, next_line = [], [], 2
        for values in reader:
            line, next_line = next_line, reader.line_num + 1  # a quoted field may span lines
            where = f"{path}: line {line}"
            overlong = [number for number in long_lines if line <= number < next_line]
            if overlong:
                problems.report(where, too_long(long_lines[overlong[0]], max_line_bytes))
                continue
            if not values:
                continue
            if bad_lines and any(line <= bad < next_line for bad in bad_lines):
                problems.report(where, "invalid UTF-8; re-encode the file as UTF-8")
                continue
            if len(values) != len(header):
                problems.report(
                    where,
                    f"has {len(values)} fields where the header has {len(header)}; quote fields that contain commas",
                )
                continue
            records.append(dict(zip(header, values)))
            positions.append(line)
            if len(records) == batch_rows:
                yield RawBatch(records, positions, header)
                records, positions = [], []
        if records:
            yield RawBatch(records, positions, header)


def read_parquet(path: Path, batch_rows: int, problems: Problems) -> Iterator[RawBatch]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as error:  # pyarrow raises several types for a file that is not Parquet
        raise InputError(f"{path}: not a readable Parquet file ({error}); check the file or its extension") from None
    columns, row = parquet.schema_arrow.names, 0
    for batch in parquet.iter_batches(batch_size=batch_rows):
        records = batch.to_pylist()
        yield RawBatch(records, list(range(row + 1, row + len(records) + 1)), columns)
        row += len(records)


def read_datasets(source: Source, batch_rows: int) -> Iterator[RawBatch]:
    """A `datasets` folder (memory-mapped Arrow) or Hub id (downloaded, or streamed with ``streaming: true``)."""
    import datasets

    config = source.config
    if source.kind == "datasets-folder":
        loaded = datasets.load_from_disk(config.source)
        if isinstance(loaded, datasets.DatasetDict):
            if config.split not in loaded:
                raise InputError(
                    f"{source.field}.split: {config.source} has splits {list(loaded)}, not {config.split!r}; "
                    "name one of those"
                )
            loaded = loaded[config.split]
    else:
        loaded = datasets.load_dataset(config.source, split=config.split, streaming=config.streaming)
    columns, row = list(loaded.column_names or []), 0
    for batch in loaded.iter(batch_size=batch_rows):
        names = list(batch)
        records = [dict(zip(names, values)) for values in zip(*(batch[name] for name in names))]
        yield RawBatch(records, list(range(row + 1, row + len(records) + 1)), columns or names)
        row += len(records)
