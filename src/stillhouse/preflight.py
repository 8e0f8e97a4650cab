"""Checks that run before any stage: cheap, and before any model weights are loaded.

preflight(config)                   # what `run` checks before Prefect starts: raises InputError naming the fix
summary = validation_summary(config)   # what `validate` adds: every row read, the splits, both models' shapes
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from stillhouse import capabilities
from stillhouse.config import CurateConfig, PipelineConfig, excerpt
from stillhouse.data.curate import short_sha256
from stillhouse.data.decontaminate import check_benchmarks
from stillhouse.data.schema import RowError, normalized_messages, resolve_mapping, to_messages
from stillhouse.data.sources import Problems, Source, read_batches, resolve_sources
from stillhouse.errors import InputError
from stillhouse.health import check_tracking_server
from stillhouse.licenses import preflight_licenses
from stillhouse.models import load_tokenizer, plain_config, resolve_model, vocabulary_difference
from stillhouse.planning import ModelShape
from stillhouse.public_names import check_public_names
from stillhouse.sampling.sample import TeacherFacts, check_teacher
from stillhouse.training.checks import check_training_hardware, check_vocabularies


def preflight(config: PipelineConfig) -> None:
    """Raise `InputError` naming the field and the fix for a missing dataset, benchmark or model, a bad k,
    too few GPUs for engine `vllm`, `kd` across vocabularies, or a served KD teacher whose server can't score."""
    tracking_uri = config.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
    if tracking_uri:
        check_tracking_server(tracking_uri)
    check_sources(config)  # an empty file, a wrong format, a missing column: before Prefect or any model starts
    check_benchmarks(config.curate.decontaminate.benchmarks)
    teacher = check_teacher(config.sample)
    check_training_hardware(config.train)  # more processes per node than GPUs (or CPU cores): before anything runs
    if config.train.student is not None:
        resolve_model(config.train.student, "train.student")
        if config.train.method == "kd" and teacher.tokenizer_path is not None:
            # Tokenizers only: a student that doesn't share the teacher's vocabulary can't learn its top-k,
            # found before sampling.
            local = config.sample.engine != "openai"
            teacher_tokenizer = load_tokenizer(
                teacher.tokenizer_path,
                config.sample.revision if local else None,
                trust_remote_code=config.sample.trust_remote_code and local,
            )
            check_served_teacher_vocabulary(config, teacher_tokenizer)
            check_vocabularies(config.train, teacher_tokenizer)
    check_served_teacher(config, teacher)
    # A push the teacher's or base model's terms forbid fails before training, quoting the clause; so does one whose
    # card would name local folders instead of public names (publish.teacher_name, ...).
    preflight_licenses(config)
    check_public_names(config)


def check_served_teacher_vocabulary(config: PipelineConfig, teacher_tokenizer) -> None:
    """``train.kd.teacher: served`` scores the student's token ids: refuse a pretrained student with other ids
    (with train.kd.align set it scores the teacher's own tokenization of the text instead)."""
    student = config.train.student
    if config.train.kd.teacher != "served" or student is None or config.train.kd.align != "none":
        return  # with kd.align the server scores the teacher's own tokenization of the text: any student
    student_tokenizer = load_tokenizer(
        resolve_model(student, "train.student"), trust_remote_code=config.train.trust_remote_code
    )
    problem = capabilities.served_kd_student_vocabulary_problem(
        method=config.train.method,
        kd_teacher=config.train.kd.teacher,
        difference=vocabulary_difference(student_tokenizer, teacher_tokenizer),
    )
    if problem:
        raise InputError(problem)


def check_served_teacher(config: PipelineConfig, teacher: TeacherFacts) -> None:
    """``train.kd.teacher: served``: one tiny request, answered with ``prompt_logprobs`` for k, or an `InputError`.

    Config validation already refused a served teacher of unknown vocabulary. The probe sends two token ids
    (the first two of the teacher's vocabulary) and asks for ``train.kd.online_top_k`` log-probs, so a server
    that ignores the field (anything but vLLM), refuses k (above vLLM's --max-logprobs) or doesn't answer
    is named here, with its URL, before any stage runs.
    """
    kd = config.train.kd
    if config.train.method != "kd" or kd.teacher != "served":
        return
    capabilities.assert_no_problem(
        capabilities.served_kd_vocabulary_problem(
            teacher_tokenizer_known=teacher.tokenizer_path is not None,
            method=config.train.method,
            kd_teacher=kd.teacher,
        )
    )
    from stillhouse.training.served_teacher import ServedTeacher, served_endpoint  # torch: a served teacher only

    connection, model = served_endpoint(kd, config.sample)
    # One try, no backoff: a preflight reports a dead server at once instead of retrying it for a minute.
    field = "train.kd.served" if kd.served is not None else "sample.openai"
    probe = ServedTeacher(
        connection.model_copy(update={"max_retries": 0}), model, kd.online_top_k, settings_field=field
    )
    try:
        problem = capabilities.served_kd_prompt_logprobs_problem(
            url=connection.base_url.rstrip("/"), problem=probe.probe()
        )
    finally:
        probe.close()
    if problem:
        raise InputError(problem)


# --- the data: what curation would refuse, found before any stage -------------------------------------------

# The column each explicit format reads when the data has nothing else to offer, and the format `auto` finds there.
FORMAT_COLUMNS = {"messages": "messages", "sharegpt": "conversations", "alpaca": "instruction"}
SPLIT_CAVEAT = "exact duplicates removed; before filters, near-duplicate removal and mixture draws"


@dataclass(frozen=True)
class SourceSummary:
    """One source as `validate` read it: rows, the format they were read as, and the split they would give."""

    name: str
    source: str
    kind: str  # builtin | file | datasets-folder | hub
    format: str | None = None
    rows: int | None = None  # rows that became prompts (None: not read, see `note`)
    empty: int = 0  # rows with nothing left to ask (curation drops and counts them)
    skipped: int = 0  # malformed rows skipped under curate.on_error: skip
    distinct: int | None = None  # prompts left after exact-duplicate removal
    train_rows: int | None = None
    eval_rows: int | None = None
    note: str = ""


@dataclass(frozen=True)
class ModelSummary:
    """A model as its config.json and tokenizer files describe it (no weights read)."""

    role: str  # teacher | student
    reference: str
    model_type: str
    layers: int
    hidden_size: int
    parameters: int
    vocab_size: int  # rows of the embedding (config.json)
    tokenizer: str  # its kind and size, e.g. "byte-level BPE, 600 tokens"


@dataclass(frozen=True)
class ValidationSummary:
    """What `stillhouse validate` found: per source its rows and split, both models, k and the store."""

    sources: list[SourceSummary]
    teacher: ModelSummary | str  # a string says why the shape is unknown (a served teacher, a Hub id offline)
    student: ModelSummary | str
    top_k: int
    store: str  # the store root, absolute (or its URL)
    split_caveat: str = SPLIT_CAVEAT
    eval_fraction: float = 0.1

    @property
    def train_rows(self) -> int | None:
        counts = [source.train_rows for source in self.sources]
        return None if None in counts else sum(counts)

    @property
    def eval_rows(self) -> int | None:
        counts = [source.eval_rows for source in self.sources]
        return None if None in counts else sum(counts)


def check_sources(config: PipelineConfig) -> None:
    """Read the first batch of every local source: the file's shape, the format's columns and the first rows map to
    conversations, or an `InputError` naming the file, row or field and the fix (what curation would raise later)."""
    for source in resolve_sources(config.curate):
        scan_source(source, config.curate, max_batches=1)


def validation_summary(config: PipelineConfig) -> ValidationSummary:
    """Every row of every local source read and mapped (what curation refuses is refused here, with its row), the
    split each would give, and both models' shapes from config.json; no weights load and nothing is written."""
    from stillhouse.planning import student_shape, teacher_shape

    sources = [scan_source(source, config.curate) for source in resolve_sources(config.curate)]
    counted = [source for source in sources if source.train_rows is not None]
    if counted and len(counted) == len(sources):
        train, evaluation = sum(s.train_rows for s in counted), sum(s.eval_rows for s in counted)
        if train == 0 or evaluation == 0:  # filters only remove rows: curation would certainly refuse this
            empty = "train" if train == 0 else "eval"
            raise InputError(
                f"curate: {train + evaluation} distinct prompts give an empty {empty} split "
                f"(curate.eval_fraction {config.curate.eval_fraction}); add data or change curate.eval_fraction"
            )
    teacher_shape_or_why = teacher_shape(config.sample)
    teacher: ModelSummary | str
    if isinstance(teacher_shape_or_why, str):
        teacher = teacher_shape_or_why
    else:
        teacher = model_summary(
            "teacher",
            config.sample.teacher,
            teacher_shape_or_why,
            config.sample.revision,
            config.sample.trust_remote_code and config.sample.engine != "openai",
        )
    try:
        shape = student_shape(config.train, None if isinstance(teacher_shape_or_why, str) else teacher_shape_or_why)
    except (OSError, ValueError, KeyError, ImportError) as error:
        student: ModelSummary | str = f"can't read the config.json of {config.train.student!r} ({first_line(error)})"
    else:
        if config.train.student is None:
            student = ModelSummary(
                role="student",
                reference="train.architecture (built from scratch)",
                model_type="llama",
                layers=shape.num_layers,
                hidden_size=shape.hidden_size,
                parameters=shape.parameters,
                vocab_size=shape.vocab_size,
                tokenizer="the teacher's",
            )
        else:
            student = model_summary("student", config.train.student, shape, None, config.train.trust_remote_code)
    return ValidationSummary(
        sources=sources,
        teacher=teacher,
        student=student,
        top_k=config.sample.top_k_logprobs,
        store=resolved_store_root(config.store.root),
        eval_fraction=config.curate.eval_fraction,
    )


def scan_source(source: Source, config: CurateConfig, max_batches: int | None = None) -> SourceSummary:
    """Read ``source`` as curation does (the same reader, column mapping and row checks, so the same errors) and
    count its rows and the split they fall in; a Hub dataset is not downloaded here (curation reads it)."""
    summary = SourceSummary(name=source.name, source=source.config.source, kind=source.kind)
    if source.kind == "hub":
        return replace(summary, note="a Hub dataset: downloaded and read when curation runs")
    if source.kind == "file":
        check_file_shape(source)
    label = source.config.source
    problems = Problems(config.on_error)
    unit = "line" if source.kind == "file" and source.path.suffix.lower() in (".jsonl", ".json", ".csv") else "row"
    mapping, rows, empty, keys, eval_keys = None, 0, 0, [], []
    for batch in itertools.islice(read_batches(source, config, problems), max_batches):
        if mapping is None:
            check_format_columns(source, batch.columns, label)
            mapping = resolve_mapping(source.config, batch.columns, source.field, label)
        batch_keys, batch_eval = [], []
        for record, position in zip(batch.records, batch.positions):
            try:
                conversation = to_messages(record, mapping)
            except RowError as error:
                problems.report(f"{label}: {unit} {position}", f"{error} (format {mapping.format})")
                continue
            if not conversation:
                empty += 1
                continue
            rows += 1
            normalized = normalized_messages(conversation)
            batch_keys.append(int(short_sha256(normalized), 16))
            # The split position curation gives this prompt: a salted hash, so the count here is the count there.
            position_in_split = int(short_sha256(config.split_salt + normalized)[:15], 16) / 16**15
            batch_eval.append(position_in_split < config.eval_fraction)
        keys.append(np.array(batch_keys, dtype=np.uint64))
        eval_keys.append(np.array(batch_eval, dtype=bool))
    if rows + empty == 0 and not problems.skipped:
        raise InputError(f"{source.field}.source: {label!r} has no rows; point it at a dataset with prompts")
    if rows == 0 and max_batches is None:
        raise InputError(
            f"{source.field}.source: every row of {label!r} was empty or malformed ({empty} empty, "
            f"{problems.skipped} skipped as malformed); check {source.field}.prompt_column and {source.field}.format"
        )
    all_keys = np.concatenate(keys) if keys else np.empty(0, dtype=np.uint64)
    is_eval = np.concatenate(eval_keys) if eval_keys else np.empty(0, dtype=bool)
    if config.filters.exact_duplicates:
        _, first = np.unique(all_keys, return_index=True)
        all_keys, is_eval = all_keys[first], is_eval[first]
    return replace(
        summary,
        format=mapping.format,
        rows=rows,
        empty=empty,
        skipped=problems.skipped,
        distinct=len(all_keys),
        train_rows=int((~is_eval).sum()),
        eval_rows=int(is_eval.sum()),
        note="first batch only" if max_batches is not None else "",
    )


def check_file_shape(source: Source) -> None:
    """A CSV named .jsonl (or JSON Lines named .csv): say so from the first line, not as a JSON error on line 1."""
    suffix = source.path.suffix.lower()
    if suffix not in (".jsonl", ".json", ".csv"):
        return
    with open(source.path, "rb") as handle:
        first = next((line for line in iter(lambda: handle.readline(1 << 16), b"") if line.strip()), b"").strip()
    if not first:
        return
    text = first.decode("utf-8", "replace")
    field = f"{source.field}.source"
    if suffix == ".csv" and text.startswith("{"):
        try:
            json.loads(text)
        except ValueError:
            return
        raise InputError(
            f"{field}: {source.config.source!r} is named .csv but its first line is a JSON object; "
            f"rename it to {source.path.with_suffix('.jsonl').name} (JSON Lines)"
        )
    if suffix in (".jsonl", ".json") and not text.startswith(("{", "[")):
        separator = next((s for s in (",", "\t", ";") if s in text), None)
        if separator is None:
            return  # not JSON and not a table: the reader names the line and the JSON error
        kind = "TSV" if separator == "\t" else "CSV"
        raise InputError(
            f"{field}: {source.config.source!r} is named {suffix} but line 1 is not JSON; it looks like a {kind} "
            f"header ({excerpt(text[:120])}); rename it to {source.path.with_suffix('.csv').name} (comma-separated, "
            "with a header row) or write one JSON object per line"
        )


def check_format_columns(source: Source, columns: list[str], label: str) -> None:
    """An explicit `format` whose column the data lacks, when another format's column is there: name the format."""
    chosen = source.config.format
    if chosen not in FORMAT_COLUMNS or source.config.prompt_column in columns or FORMAT_COLUMNS[chosen] in columns:
        return
    detected = next((name for name, column in FORMAT_COLUMNS.items() if column in columns and name != chosen), None)
    if detected is None:
        return  # nothing better to suggest: the column mapping's own error names the columns
    described = {
        "messages": "OpenAI `messages`",
        "sharegpt": "ShareGPT `conversations`",
        "alpaca": "Alpaca `instruction`",
    }
    raise InputError(
        f"{source.field}.format: `{chosen}` reads column {FORMAT_COLUMNS[chosen]!r}, which {label!r} doesn't have "
        f"(columns: {columns}); the rows look like {described[detected]}: set {source.field}.format: {detected} "
        "(or auto)"
    )


def model_summary(
    role: str, reference: str, shape: ModelShape, revision: str | None, trust_remote_code: bool
) -> ModelSummary:
    location = resolve_model(reference, "sample.teacher" if role == "teacher" else "train.student")
    plain = plain_config(location, revision)
    if plain is not None:
        model_type = plain["model_type"]
    else:  # remote code, or a file AutoConfig explains better
        from transformers import AutoConfig

        try:
            model_type = AutoConfig.from_pretrained(
                location, revision=revision, trust_remote_code=trust_remote_code
            ).model_type
        except (OSError, ValueError) as error:
            model_type = f"unknown ({first_line(error)})"
    return ModelSummary(
        role=role,
        reference=reference,
        model_type=model_type,
        layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        parameters=shape.parameters,
        vocab_size=shape.vocab_size,
        tokenizer=tokenizer_kind(location, revision),
    )


def tokenizer_kind(location: str, revision: str | None = None) -> str:
    """The tokenizer's algorithm and size from its files (no tokenizer is built): "byte-level BPE, 600 tokens"."""
    folder = Path(location)

    def file(name: str) -> Path | None:
        if folder.is_dir():
            return folder / name if (folder / name).is_file() else None
        from huggingface_hub import try_to_load_from_cache  # a Hub id: what the checks already downloaded

        cached = try_to_load_from_cache(location, name, revision=revision)
        return Path(cached) if isinstance(cached, str) else None

    tokenizer_json = file("tokenizer.json")
    if tokenizer_json is not None:
        try:
            spec = json.loads(tokenizer_json.read_text())
            model = spec.get("model") or {}
        except (OSError, ValueError):
            return "unreadable tokenizer.json"
        vocab = model.get("vocab") or {}
        names = set(vocab) if isinstance(vocab, dict) else {entry[0] for entry in vocab}
        size = len(names | {token.get("content") for token in spec.get("added_tokens") or []})
        kind = model.get("type") or "unknown"
        if kind == "BPE" and not model.get("merges"):
            kind = "character-level (BPE without merges)"
        elif kind == "BPE" and "ByteLevel" in json.dumps([spec.get("pre_tokenizer"), spec.get("decoder")]):
            kind = "byte-level BPE"
        elif kind == "Unigram":
            kind = "Unigram (SentencePiece)"
        return f"{kind}, {size:,} tokens"
    if file("tokenizer.model") is not None:
        return "SentencePiece (tokenizer.model)"
    config = file("tokenizer_config.json")
    if config is not None:
        try:
            return json.loads(config.read_text()).get("tokenizer_class") or "unknown"
        except (OSError, ValueError):
            pass
    return "unknown"


def resolved_store_root(root: str) -> str:
    """The store's root as a run would use it: a URL as given, a folder made absolute (nothing is created)."""
    if "://" in root:
        return root
    return str(Path(root).expanduser().resolve())


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__
