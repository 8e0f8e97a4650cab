"""The `stillhouse` command line.

stillhouse demo [--set ...]          # the bundled demo, from any folder (outputs under ./.stillhouse)
stillhouse run configs/demo.yaml [--set train.max_steps=100 ...] [--until STAGE]
stillhouse validate configs/demo.yaml [--set ...] [--gpus N --gpu-memory 80GB --nodes M]
stillhouse plan configs/demo.yaml [--set ...] [--gpus N] [--gpu-memory 80GB] [--nodes M]
stillhouse schema
stillhouse pull REPO_ID [--revision R] [--endpoint URL] [--prompt TEXT] [--verify-key KEY.pub]
stillhouse store verify configs/demo.yaml [--stage sample]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from stillhouse.config import ConfigError, PipelineConfig, load_config
from stillhouse.errors import Interrupted, StillhouseError
from stillhouse.flows.bundled import DEMO_CONFIG, resolve_config
from stillhouse.flows.environment import apply_embedded_defaults
from stillhouse.refs import Stage

STAGE_NAMES = [stage.value for stage in Stage]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stillhouse",
        description="Distill open-weights language models: curate prompts, sample a teacher, train and evaluate a "
        "student, register it in MLflow and publish it to the Hugging Face Hub.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(command: argparse.ArgumentParser) -> None:
        command.add_argument("config", type=Path, help="experiment YAML, e.g. configs/demo.yaml")
        command.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="SECTION.KEY=VALUE",
            help="override one config value (YAML-parsed), e.g. --set train.max_steps=100; repeatable",
        )

    demo = commands.add_parser(
        "demo",
        help="run the bundled demo (configs/demo.yaml): distill the tiny demo teacher on this CPU",
        description="Run the bundled demo pipeline from any folder: its store and MLflow database go to ./.stillhouse.",
    )
    demo.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one value of the demo config, e.g. --set train.max_steps=2400; repeatable",
    )
    demo.add_argument(
        "--until", choices=STAGE_NAMES, default="publish", help="stop after this stage (default: publish)"
    )
    run = commands.add_parser(
        "run",
        help="run the distillation pipeline of a config (reusing every stage already in the store)",
        description="Run curate → sample → train → evaluate → register → publish as a Prefect flow.",
    )
    with_config(run)
    run.add_argument("--until", choices=STAGE_NAMES, default="publish", help="stop after this stage (default: publish)")

    def with_hardware(command: argparse.ArgumentParser) -> None:
        command.add_argument(
            "--gpus", type=int, default=None, help="GPUs per node (default: this machine's; on a CPU machine, its CPU)"
        )
        command.add_argument(
            "--gpu-memory",
            default=None,
            metavar="SIZE",
            help="memory of one GPU: 80GB (10^9 bytes), 80GiB (2^30) or 141G (default: this machine's GPU)",
        )
        command.add_argument("--nodes", type=int, default=None, help="machines of --gpus GPUs each (default: 1)")

    validate = commands.add_parser(
        "validate",
        help="check a config and its inputs (files, models, k) and that every stage fits the hardware, "
        "without running anything",
        description="Check a config and its inputs, then refuse it when a stage can't fit the GPUs (this machine's, "
        "or --gpus/--gpu-memory/--nodes) by `stillhouse plan`'s estimate, before any weights load.",
    )
    with_config(validate)
    with_hardware(validate)
    plan = commands.add_parser(
        "plan",
        help="estimate every stage's peak memory per GPU and time, choose a layout that fits, and name the fixes",
        description="Read each model's config.json (never weights) and print, per stage that holds a model, the "
        "estimated peak memory per device, whether it fits, the layout, a rough time and the fix when it doesn't.",
    )
    with_config(plan)
    with_hardware(plan)
    schema = commands.add_parser(
        "schema",
        help="the config's sections, or one section's fields with type, default and description",
        description="Without SECTION: the config's sections. With one (e.g. `stillhouse schema train`): every field "
        "of it, nested ones as dotted paths (train.kd.temperature), with type, default and description.",
    )
    schema.add_argument("section", nargs="?", default=None, metavar="SECTION", help="e.g. curate, sample, train")
    schema.add_argument("--json", action="store_true", help="print JSON Schema (of the whole config, or of SECTION)")
    pull = commands.add_parser(
        "pull",
        help="download a published student, verify it against its stillhouse.json, then prompt or chat with it",
        description="Download REPO_ID from the Hub (or --endpoint), check every file's sha256 against stillhouse.json "
        "and the Hub's LFS records, load it with plain transformers, and answer --prompt or chat interactively.",
    )
    pull.add_argument("repo_id", metavar="REPO_ID", help="Hub repo, e.g. alice/Llama-tiny-student")
    pull.add_argument("--revision", default=None, help="branch, tag (e.g. v3) or commit; default: main")
    pull.add_argument(
        "--endpoint", default=None, help="Hub endpoint of a self-hosted Hub; default: $HF_ENDPOINT or huggingface.co"
    )
    pull.add_argument(
        "--prompt", default=None, help="answer this prompt and exit; without it, chat until `exit` or Ctrl-D"
    )
    pull.add_argument("--max-new-tokens", type=int, default=128, help="tokens per answer (default: 128)")
    pull.add_argument(
        "--token-env",
        default="HF_TOKEN",
        help="environment variable holding a token, for private repos (default: HF_TOKEN)",
    )
    pull.add_argument(
        "--verify-key",
        default=None,
        metavar="PUBLIC_KEY_PEM",
        help="the publisher's public key (PEM): refuse a revision whose signature does not verify with it",
    )
    store = commands.add_parser(
        "store",
        help="check the store: every output's files against its manifest (sizes and sha256)",
        description="Check every output of the config's store (or of one stage) against its manifest, changing "
        "nothing. Exit 0 when none is invalid, 1 otherwise; the next run that needs an invalid output recomputes it.",
    )
    store_commands = store.add_subparsers(dest="store_command", required=True, metavar="ACTION")
    store_verify = store_commands.add_parser("verify", help="hash every file of every output and compare")
    with_config(store_verify)
    store_verify.add_argument("--stage", choices=STAGE_NAMES, default=None, help="check this stage's outputs only")
    deploy = commands.add_parser(
        "deploy",
        help="register the deployments of prefect.yaml (schedules, work pools, the `gpu` limit) on $PREFECT_API_URL",
        description="Check the Prefect API, every cron, the named config and its MLflow server and the work pools, "
        "then register the pipeline and stage deployments of prefect.yaml. Nothing is registered when a check fails.",
    )
    deploy.add_argument(
        "--config",
        type=Path,
        default=None,
        help="named config every deployment runs, e.g. configs/demo.yaml (default: prefect.yaml's)",
    )
    deploy.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="config override passed to every run; repeatable",
    )
    deploy.add_argument(
        "--pool",
        default=None,
        help="run every deployment on this work pool (default: each deployment's, `local` or `gpu`)",
    )
    deploy.add_argument(
        "--gpu-limit",
        type=int,
        default=1,
        help="slots of the global concurrency limit `gpu`: flow runs at once (default: 1)",
    )
    deploy.add_argument(
        "--prefect-file",
        type=Path,
        default=None,
        help="deployments file (default: prefect.yaml at the repository root)",
    )
    serve = commands.add_parser(
        "serve", help="run the pipeline of a config on a cron schedule in this process (flow.serve; no worker needed)"
    )
    with_config(serve)
    serve.add_argument("--cron", required=True, help='cron expression in UTC, e.g. "0 2 * * *" (02:00 every day)')
    serve.add_argument(
        "--until", choices=STAGE_NAMES, default="publish", help="stop after this stage (default: publish)"
    )
    return parser


def summary_console():
    """A console for the summary: in a terminal, its width; piped or redirected, lines are never wrapped, so a
    command or URL stays one line to copy (rich would cut them at 80 columns)."""
    from rich.console import Console

    return Console(soft_wrap=True) if sys.stdout.isatty() else Console(width=200, soft_wrap=True)


def registered_line(result) -> str:
    """``Registered: models:/x@candidate (version 3), also models:/x@champion``: every alias the version holds."""
    registered = result.registered
    aliases = [registered.alias]
    try:
        from stillhouse.registry.tracking import version_aliases

        aliases = version_aliases(result.tracking_uri, registered.name, registered.version) or aliases
    except Exception:  # the summary never fails a finished run: the alias it set is known anyway
        pass
    first = registered.alias if registered.alias in aliases else aliases[0]
    line = f"Registered: models:/{registered.name}@{first} (version {registered.version})"
    others = [alias for alias in aliases if alias != first]
    return line + ("".join(f", also models:/{registered.name}@{alias}" for alias in others))


def print_summary(result, config: PipelineConfig, command: str) -> None:
    from rich.table import Table

    from stillhouse.evaluation.report import comparison_table

    console = summary_console()
    if result.report:
        console.print(
            comparison_table(result.report.metrics, title=f"Stillhouse · {config.name}", verdict=result.verdict)
        )
    if result.verdict is not None and not result.verdict.passed:
        console.print(
            "[bold red]Promotion gate failed[/bold red]: "
            + "; ".join(result.verdict.failures)
            + "\n  the student stays @candidate and was not published"
        )

    stages = Table(title="Stages")
    stages.add_column("stage")
    stages.add_column("seconds", justify="right")
    stages.add_column("output")
    for stage, seconds in result.seconds.items():
        stages.add_row(stage, f"{seconds:.1f}", "reused from store" if result.cached.get(stage) else "computed")
    stages.add_row("total", f"{sum(result.seconds.values()):.1f}", "")
    console.print(stages)

    # URLs and commands are printed without markup: rich would read `[...]` in them as style tags.
    console.print(f"MLflow run: [bold]{result.mlflow_run_id}[/bold] (experiment {result.experiment_id})")
    console.print(
        f"  browse:  mlflow ui --backend-store-uri {result.tracking_uri} --port 5000   then open "
        f"http://127.0.0.1:5000/#/experiments/{result.experiment_id}/runs/{result.mlflow_run_id}",
        markup=False,
    )
    if result.registered:
        console.print(registered_line(result), markup=False)
    if result.published:
        published = result.published
        console.print(
            f"Published folder: {published.folder}"
            + ("" if published.repo_id else "  (set publish.repo_id and a token to push it to the Hub)"),
            markup=False,
        )
        if published.repo_id:
            where = published.revision_url or f"https://huggingface.co/{published.repo_id}"
            endpoint = f" --endpoint {config.publish.endpoint}" if config.publish.endpoint else ""
            console.print(
                f"  pushed to {where} (tag {published.tag}, commit {published.commit_oid})\n"
                f"  pull it: stillhouse pull {published.repo_id} --revision {published.tag}{endpoint}",
                markup=False,
            )
    console.print(f"Rerun: {command}", markup=False)


def human_count(count: int) -> str:
    """120640 -> 120.6K, 494032768 -> 494.0M."""
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if count >= size:
            return f"{count / size:.1f}{unit}"
    return str(count)


def validation_lines(summary) -> list[str]:
    """What `validate` found, as the lines it prints before `OK`."""
    lines = ["Data:"]
    for source in summary.sources:
        where = f"  {source.name} ({source.source}; {source.kind}"
        if source.rows is None:
            lines.append(f"{where}): {source.note}")
            continue
        dropped = [
            f"{count} {what}" for count, what in ((source.empty, "empty"), (source.skipped, "malformed, skipped"))
        ]
        duplicates = source.rows - source.distinct
        dropped += [f"{duplicates} exact duplicate{'s' if duplicates > 1 else ''}"] if duplicates else []
        dropped = [part for part in dropped if not part.startswith("0 ")]
        lines.append(
            f"{where}, format {source.format}): {source.rows:,} prompts"
            + (f" ({', '.join(dropped)})" if dropped else "")
            + f" -> train {source.train_rows:,}, eval {source.eval_rows:,}"
        )
    if summary.train_rows is not None:
        lines.append(
            f"  splits: train {summary.train_rows:,}, eval {summary.eval_rows:,} (eval_fraction "
            f"{summary.eval_fraction}; {summary.split_caveat})"
        )
    for role, model in (("Teacher", summary.teacher), ("Student", summary.student)):
        if isinstance(model, str):
            lines.append(f"{role}: {model}")
            continue
        lines.append(
            f"{role}: {model.reference}: {model.model_type}, {model.layers} layers x {model.hidden_size} hidden, "
            f"{human_count(model.parameters)} parameters, vocabulary {model.vocab_size:,} (tokenizer: "
            f"{model.tokenizer})"
        )
    k = summary.top_k
    lines.append(
        f"k (sample.top_k_logprobs): {k}"
        + (" (the teacher's text only: black-box)" if k == 0 else " log-probs stored per token")
    )
    lines.append(f"Store: {summary.store}")
    return lines


@dataclass(frozen=True)
class FieldRow:
    """One config field as `stillhouse schema SECTION` shows it."""

    path: str  # train.kd.temperature; a list of sections shows as curate.sources[].weight
    type: str
    default: str
    description: str


def type_name(annotation: Any) -> str:
    """A field's type as a user writes it in YAML: `float`, `kl | reverse_kl`, `str | null`, `list[str]`."""
    origin, arguments = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None):
        return "null"
    if origin is Literal:
        return " | ".join("null" if value is None else str(value) for value in arguments)
    if origin in (Union, types.UnionType):
        return " | ".join(dict.fromkeys(type_name(argument) for argument in arguments))
    if origin in (list, tuple, set):
        return f"list[{type_name(arguments[0])}]" if arguments else "list"
    if origin is dict:
        return f"dict[{', '.join(type_name(argument) for argument in arguments)}]" if arguments else "dict"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    return getattr(annotation, "__name__", str(annotation))


def nested_model(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """(the pydantic model inside ``annotation`` or None, whether it sits in a list)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    for argument in typing.get_args(annotation):
        model, in_list = nested_model(argument)
        if model is not None:
            return model, in_list or typing.get_origin(annotation) in (list, tuple)
    return None, False


def default_text(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        value = field.default_factory()
        return "(below)" if isinstance(value, BaseModel) else json.dumps(value)
    value = field.default
    if isinstance(value, BaseModel):
        return "(below)"
    return "null" if value is None else json.dumps(value) if not isinstance(value, str) else value


def config_fields(section: str) -> list[FieldRow]:
    """Every field of ``section``, nested sections flattened into dotted paths (`train.kd.temperature`)."""
    rows: list[FieldRow] = []

    def walk(path: str, field: FieldInfo) -> None:
        first_line = (field.description or "").strip()
        rows.append(FieldRow(path, type_name(field.annotation), default_text(field), first_line))
        model, in_list = nested_model(field.annotation)
        if model is not None:
            for name, child in model.model_fields.items():
                walk(f"{path}{'[]' if in_list else ''}.{name}", child)

    walk(section, PipelineConfig.model_fields[section])
    return rows


def section_rows() -> list[tuple[str, str, str]]:
    """(section, type, description) of every top-level key of a config."""
    return [
        (name, type_name(field.annotation), (field.description or "").strip())
        for name, field in PipelineConfig.model_fields.items()
    ]


def section_schema(schema: dict, section: str) -> dict:
    """The JSON Schema of one section: its property, and only the definitions it refers to (directly or not)."""
    definitions, wanted, seen = schema.get("$defs", {}), [schema["properties"][section]], set()
    while wanted:
        node = wanted.pop()
        if isinstance(node, dict):
            reference = node.get("$ref", "")
            name = reference.removeprefix("#/$defs/")
            if reference and name not in seen:
                seen.add(name)
                wanted.append(definitions[name])
            wanted.extend(node.values())
        elif isinstance(node, list):
            wanted.extend(node)
    section_schema = dict(schema["properties"][section])
    if seen:
        section_schema["$defs"] = {name: definitions[name] for name in sorted(seen)}
    return section_schema


SCHEMA_WIDTH = 160  # piped schema tables: wide enough that a field's path and type stay on one line


def schema_command(arguments: argparse.Namespace) -> int:
    """`stillhouse schema [SECTION] [--json]`: the sections, one section's fields as a table, or JSON Schema."""
    from stillhouse.config import did_you_mean

    sections = PipelineConfig.model_fields
    section = arguments.section
    if section is not None and section not in sections:
        suggestion = did_you_mean((), section).removeprefix("; did you mean `").removesuffix("`?")
        hint = f"did you mean '{suggestion}'?" if suggestion else f"sections: {', '.join(sections)}"
        print(f"error: unknown section {section!r}; {hint}", file=sys.stderr)
        return 2
    if arguments.json:
        schema = PipelineConfig.model_json_schema()
        if section is not None:
            schema = section_schema(schema, section)
        print(json.dumps(schema, indent=2))
        return 0
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = Console() if sys.stdout.isatty() else Console(width=SCHEMA_WIDTH)
    if section is None:
        table = Table(title="Config sections (stillhouse schema SECTION for its fields, --json for JSON Schema)")
        table.box = box.SIMPLE
        for column in ("section", "type", "description"):
            table.add_column(column, overflow="fold")
        for name, kind, description in section_rows():
            table.add_row(name, kind, description)
        console.print(table)
        return 0
    rows = config_fields(section)
    if len(rows) > 1:  # a section: its own row is the table's title
        rows = rows[1:]
        title = f"{section}: every field (set one with --set {section}.FIELD=VALUE)"
    else:
        title = f"{section} (set it with --set {section}=VALUE)"
    table = Table(title=title, box=box.SIMPLE)
    table.add_column("field", no_wrap=True)
    table.add_column("type", overflow="fold", max_width=28)  # a Literal of many values wraps, not the description
    table.add_column("default", overflow="fold", max_width=20)
    table.add_column("description", overflow="fold", ratio=1)
    for row in rows:
        table.add_row(row.path, row.type, row.default, row.description)
    console.print(table)
    return 0


def plan_command(arguments: argparse.Namespace) -> int:
    """Print the plan's table; 0 even when a stage doesn't fit (`validate` is the gate), 2 on bad input."""
    import shutil

    from rich.console import Console

    from stillhouse.planning import hardware_from_flags, plan_pipeline, render

    try:
        config = load_config(resolve_config(arguments.config), arguments.overrides)
        hardware = hardware_from_flags(arguments.gpus, arguments.gpu_memory, arguments.nodes)
        plan = plan_pipeline(config, hardware)
    except (ConfigError, StillhouseError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    # Piped output would be cut to 80 columns; the table needs more.
    width = shutil.get_terminal_size((160, 24)).columns if sys.stdout.isatty() else 160
    Console(width=width).print(render(plan))
    return 0


def store_verify_command(arguments: argparse.Namespace) -> int:
    """`stillhouse store verify`: print one line per output and a summary; 0 when nothing is invalid."""
    from stillhouse.store import Store, verify_store

    try:
        config = load_config(resolve_config(arguments.config), arguments.overrides)
        report = verify_store(Store.from_config(config.store), arguments.stage)
    except (ConfigError, StillhouseError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(report.text())
    return 0 if report.ok else 1


def stop_on_sigterm() -> None:
    """SIGTERM ends a run like Ctrl-C: stages stop, the MLflow run is marked KILLED, Prefect's server is stopped."""

    def interrupt(signum, frame) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
        raise Interrupted("stopped by SIGTERM; rerun the same command to resume from the store")

    signal.signal(signal.SIGTERM, interrupt)


class _UserErrorsWithoutTracebacks(logging.Filter):
    """Prefect logs a failed task's traceback; for an error a user can fix (its message names the fix) or an interrupt,
    the message is all that helps, and a traceback before the CLI's `error:` line only buries it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], (StillhouseError, KeyboardInterrupt)):
            record.exc_info, record.exc_text = None, None
        return True


def quiet_tracebacks_of_user_errors() -> None:
    for logger in (logging.getLogger("prefect"), logging.getLogger()):
        for handler in logger.handlers:
            handler.addFilter(_UserErrorsWithoutTracebacks())


def main(argv: list[str] | None = None) -> int:
    """The `stillhouse` command; a reader that stops early (`stillhouse schema --json | head`) ends it quietly."""
    try:
        code = run_command(argv)
        sys.stdout.flush()  # here, not at interpreter exit, where a closed pipe can't be caught
        return code
    except BrokenPipeError:
        # The reader has what it wanted. Point stdout at /dev/null so the interpreter's last flush doesn't complain.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def console_main() -> None:
    """The `stillhouse` command as installed: `main`, then, after a pipeline run, an exit without library teardown.

    When `main` returns from `run` or `demo`, everything the run leaves is written: the store's outputs are sealed,
    the MLflow run is ended (its writes are synchronous), Prefect's log and event workers are drained and a
    temporary server is stopped. What the interpreter would still do is stop the libraries' background threads and
    run their atexit hooks: 1.1 s of a fully cached demo rerun's 8 s, measured (medians of 3). `main` itself returns
    normally, for callers in Python.
    """
    code = main()
    if sys.argv[1:2] in (["run"], ["demo"]):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def run_command(argv: list[str] | None = None) -> int:
    apply_embedded_defaults()  # before Prefect, MLflow or the Hub client is imported
    logging.getLogger("stillhouse").setLevel(logging.INFO)  # the core's own lines (resuming, mixtures) are shown
    arguments = build_parser().parse_args(argv)
    if arguments.command == "demo":
        arguments.config = DEMO_CONFIG
    if arguments.command == "schema":
        return schema_command(arguments)
    if arguments.command == "plan":
        return plan_command(arguments)
    if arguments.command == "pull":
        from stillhouse.registry.pull import pull_command

        try:
            return pull_command(
                arguments.repo_id,
                arguments.revision,
                arguments.endpoint,
                arguments.prompt,
                arguments.max_new_tokens,
                arguments.token_env,
                verify_key=arguments.verify_key,
            )
        except StillhouseError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    if arguments.command == "store":
        return store_verify_command(arguments)
    if arguments.command in ("deploy", "serve"):
        from stillhouse.flows import deploy

        try:
            if arguments.command == "serve":
                deploy.serve(arguments.config, arguments.cron, overrides=arguments.overrides, until=arguments.until)
                return 0
            names = deploy.deploy(
                arguments.config,
                arguments.pool,
                prefect_file=arguments.prefect_file or deploy.PREFECT_FILE,
                overrides=arguments.overrides,
                gpu_limit=arguments.gpu_limit,
            )
        except (ConfigError, StillhouseError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        print("registered: " + ", ".join(names))
        return 0
    command = "stillhouse " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    try:
        config = load_config(resolve_config(arguments.config), arguments.overrides)
        if config.publish.endpoint and "huggingface.co" not in config.publish.endpoint:
            os.environ.setdefault("HF_HUB_DISABLE_XET", "1")  # a self-hosted Hub speaks plain LFS, not xet
        from stillhouse.health import redact_url_credentials
        from stillhouse.preflight import preflight
        from stillhouse.registry.credentials import without_tracking_credentials
        from stillhouse.registry.signing import check_signing

        # A password in tracking.uri moves to MLflow's environment variables before the config reaches Prefect
        # (which stores a flow run's parameters), MLflow's params or any log line.
        config = without_tracking_credentials(config)

        def checks() -> None:
            preflight(config)
            check_signing(config)  # the signing library is installed and the key reads, before any stage

        if arguments.command == "validate":  # bad hardware flags fail before anything is read
            from stillhouse.planning import check_plan, hardware_from_flags, plan_pipeline
            from stillhouse.preflight import validation_summary

            hardware = hardware_from_flags(arguments.gpus, arguments.gpu_memory, arguments.nodes)
            checks()
            summary = validation_summary(config)  # every row read and mapped; config.json and tokenizer files only
            check_plan(plan_pipeline(config, hardware))  # config.json files only: no weights load
            print("\n".join(validation_lines(summary)))
            print(f"{arguments.config}: OK ({config.name}; fits {hardware.describe()})")
            return 0
        from stillhouse.flows.local_server import temporary_prefect_server

        stop_on_sigterm()

        def checks_and_imports() -> None:
            checks()
            import stillhouse.flows.distill  # noqa: F401  (Prefect, MLflow: seconds of imports)

        # The checks and the flow's imports run while Prefect's temporary server starts: before any stage runs.
        with temporary_prefect_server(ready=checks_and_imports):
            from stillhouse.flows.distill import distill

            quiet_tracebacks_of_user_errors()
            result = distill(
                config,
                until=arguments.until,
                checked=True,
                # Prefect keeps a flow run's parameters: no password from a --set tracking.uri reaches it.
                overrides=redact_url_credentials(list(arguments.overrides)),
                command=redact_url_credentials(command),
            )
    except (ConfigError, StillhouseError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:  # Ctrl-C or SIGTERM: say where it stopped and what a rerun does
        print(str(interrupt) or "interrupted; rerun the same command to resume from the store", file=sys.stderr)
        # Everything that matters is done: the MLflow run is KILLED, Prefect's logs are sent, its server is stopped,
        # and the store holds only sealed outputs and complete checkpoints. What remains is the interpreter's own
        # teardown (library threads and atexit hooks), measured at 3-4 s: a user who pressed Ctrl-C wants the prompt.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    print_summary(result, config, command)
    return (
        0 if result.verdict is None or result.verdict.passed else 3
    )  # 3: ran fine, but the gate kept the student back


if __name__ == "__main__":
    console_main()
