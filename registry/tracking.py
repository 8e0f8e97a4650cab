"""MLflow tracking: one parent run per pipeline run, one nested run per stage.

Params are the flattened config; tags carry the Prefect flow-run id, the stage fingerprints and the
teacher and student ids. The tracking URI is the config's, else $MLFLOW_TRACKING_URI, else the
embedded default ``sqlite:///.stillhouse/mlflow.db`` with artifacts in ``.stillhouse/mlartifacts``.

Credentials in the URI (``http://user:password@host``) never reach MLflow's params, tags, its "View
run … at" line, a log or an error: `tracking_uri` moves them to $MLFLOW_TRACKING_USERNAME and
$MLFLOW_TRACKING_PASSWORD (where MLflow's client reads them on every request) and returns the URI
without them; params are redacted; `without_tracking_credentials` does the same to a whole config
before a flow run records it as a parameter.
"""

from __future__ import annotations

import os
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import mlflow
from filelock import FileLock
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from pydantic import BaseModel

import stillhouse
from stillhouse.config import PipelineConfig, TrackingConfig
from stillhouse.health import redact_url_credentials
from stillhouse.refs import DatasetRef, SamplesRef
from stillhouse.registry.credentials import credentials_to_environment

DEFAULT_HOME = Path(".stillhouse")
# Read by MLflow's UI (mlflow/server/js: `mlflow.experimentKind`, value CUSTOM_MODEL_DEVELOPMENT): the experiment
# opens in its "Model training" view (runs, metrics, models) rather than the GenAI one (traces, prompts).
EXPERIMENT_KIND_TAG = ("mlflow.experimentKind", "custom_model_development")
# MLflow shows this tag as a run's (or experiment's) description, rendered as Markdown.
DESCRIPTION_TAG = "mlflow.note.content"
RUN_NAME_LIMIT = 120  # what fits MLflow's run table; the full overrides are in the description


class TrackingContext(BaseModel):
    """What a task needs to log under the pipeline's parent run."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    flow_run_id: str | None = None
    flow_run_url: str | None = None
    method: str = ""  # the distillation method (`kd`, `sft`, `gkd+dpo`): stage runs are named after stage and method


@cache
def code_version() -> str:
    """The package version, plus the git commit (and `.dirty`) when running from a checkout; no network."""
    try:
        source = Path(stillhouse.__file__).resolve().parent
        commit = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=source,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=source,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return stillhouse.__version__
    return f"{stillhouse.__version__}+g{commit}" + (".dirty" if dirty else "")


def lineage_tags(
    config: PipelineConfig,
    context: TrackingContext,
    dataset: DatasetRef | None = None,
    samples: SamplesRef | None = None,
) -> dict[str, str]:
    """The tags that tie a run or model version to what made it: teacher and revision, data, method, flow run, code."""
    from stillhouse.registry.card import distillation_method  # the one definition of the method label

    tags = {
        "stillhouse.teacher": config.sample.teacher,
        "stillhouse.method": distillation_method(config),
        "stillhouse.code_version": code_version(),
        "prefect.flow_run_id": context.flow_run_id or "",
    }
    if context.flow_run_url:
        tags["prefect.flow_run_url"] = context.flow_run_url
    if dataset is not None:
        tags["stillhouse.data_fingerprint"] = dataset.fingerprint
    if samples is not None:
        tags.update(
            {
                "stillhouse.teacher_revision": samples.teacher_revision,
                "stillhouse.samples_fingerprint": samples.fingerprint,
                "stillhouse.tokenizer_fingerprint": samples.tokenizer_fingerprint,
            }
        )
    return tags


def tracking_uri(config: TrackingConfig) -> str:
    """The URI to give MLflow, without credentials: ``user:password@`` in it go to MLflow's environment variables."""
    if config.uri:
        return credentials_to_environment(config.uri)
    if os.environ.get("MLFLOW_TRACKING_URI"):
        clean = credentials_to_environment(os.environ["MLFLOW_TRACKING_URI"])
        os.environ["MLFLOW_TRACKING_URI"] = clean  # mlflow's own fallback reads it too
        return clean
    DEFAULT_HOME.mkdir(exist_ok=True)
    return f"sqlite:///{(DEFAULT_HOME / 'mlflow.db').resolve()}"


_prepared_databases: set[str] = set()


def use_tracking_uri(uri: str) -> None:
    """`mlflow.set_tracking_uri` for this process only.

    MLflow also exports the URI as $MLFLOW_TRACKING_URI, for subprocesses; in a process that runs several
    pipelines (`stillhouse serve`, a worker, a notebook) the next config without `tracking.uri` would then track
    into the previous one's server instead of its own default. The variable keeps what the user set.
    """
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


def prepare_database(uri: str) -> None:
    """Create (or migrate) an embedded sqlite database under a lock, once per process.

    MLflow builds its schema on first use with alembic migrations, which are not safe to run twice at once: two
    first runs of a fresh project collide on ``table _alembic_tmp_experiments already exists``. The lock file sits
    beside the database; a server URI needs nothing (the server owns its database).
    """
    if not uri.startswith("sqlite:///") or uri in _prepared_databases:
        return
    database = Path(uri.removeprefix("sqlite:///"))
    database.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{database}.lock"):
        MlflowClient(uri).search_experiments(max_results=1)  # the first query builds the schema
    _prepared_databases.add(uri)


def ensure_experiment(name: str, uri: str) -> str:
    """The id of experiment ``name`` at ``uri``, created when missing (also when another run creates it meanwhile)."""
    prepare_database(uri)
    use_tracking_uri(uri)
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        key, kind = EXPERIMENT_KIND_TAG
        if key not in experiment.tags:  # made before the tag existed, or by hand: a kind someone chose stays
            MlflowClient(uri).set_experiment_tag(experiment.experiment_id, key, kind)
        return experiment.experiment_id
    artifact_location = None
    if uri.startswith("sqlite:///"):  # embedded: keep artifacts beside the database, not in ./mlruns
        artifact_location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
    try:
        return mlflow.create_experiment(name, artifact_location=artifact_location, tags=dict([EXPERIMENT_KIND_TAG]))
    except MlflowException as error:
        experiment = mlflow.get_experiment_by_name(name)  # a concurrent first run created it a moment ago
        if experiment is None:
            raise error from None
        return experiment.experiment_id


def flatten(settings: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{"train": {"lr": 1}} -> {"train.lr": "1"}; MLflow params are flat strings."""
    flat: dict[str, str] = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat


def short_override(override: str) -> str:
    """``train.kd.temperature=2`` -> ``temperature=2``: the key's last part is what tells runs apart in a list."""
    path, separator, value = override.partition("=")
    return f"{path.rsplit('.', 1)[-1]}={value}" if separator else override


def pipeline_run_name(config: PipelineConfig, overrides: list[str] | None = None) -> str:
    """``nu-sft · kd``, plus the overrides in short form (``nu-sft · kd · max_steps=100``), cut to fit MLflow's list."""
    from stillhouse.registry.card import distillation_method

    name = f"{config.name} · {distillation_method(config)}"
    if overrides:
        name += " · " + " ".join(short_override(override) for override in overrides)
    return name if len(name) <= RUN_NAME_LIMIT else name[: RUN_NAME_LIMIT - 1] + "…"


def run_description(config: PipelineConfig, overrides: list[str] | None, command: str | None) -> str:
    """The run's description (Markdown): the command that ran it and each override, so a run says how to rerun it."""
    lines = [f"**{config.name}**, method `{config.train.method}`, teacher `{config.sample.teacher}`"]
    if command:
        lines += ["", "```", redact_url_credentials(command), "```"]
    if overrides:
        lines += ["", "Overrides:", *(f"- `{redact_url_credentials(override)}`" for override in overrides)]
    elif not command:
        lines += ["", "No overrides: the config file as written."]
    return "\n".join(lines)


def start_pipeline_run(
    config: PipelineConfig,
    flow_run_id: str | None,
    flow_run_url: str | None = None,
    *,
    overrides: list[str] | None = None,
    command: str | None = None,
) -> TrackingContext:
    """The parent run, named after the config, the method and ``overrides`` (the `--set` values of this run);
    ``command`` (the command line) and the overrides go in its description. ``flow_run_url`` is the Prefect UI page
    of the flow run when a Prefect server (PREFECT_UI_URL) is configured."""
    from stillhouse.registry.card import distillation_method

    uri = tracking_uri(config.tracking)
    experiment_id = ensure_experiment(config.tracking.experiment, uri)
    client = MlflowClient(uri)
    pending = TrackingContext(
        tracking_uri=uri,
        experiment_id=experiment_id,
        parent_run_id="",
        flow_run_id=flow_run_id,
        flow_run_url=flow_run_url,
        method=distillation_method(config),
    )
    run = client.create_run(
        experiment_id,
        run_name=redact_url_credentials(pipeline_run_name(config, overrides)),
        tags={
            DESCRIPTION_TAG: run_description(config, overrides, command),
            "stillhouse.pipeline": config.name,
            "teacher": config.sample.teacher,
            "student": config.train.student
            or "scratch:{hidden_size}x{num_layers}".format(**config.train.architecture.model_dump()),
            "method": config.train.method,
            **lineage_tags(config, pending),
        },
    )
    params = flatten(redact_url_credentials(config.model_dump(mode="json")))
    client.log_batch(run.info.run_id, params=[mlflow.entities.Param(k, v[:6000]) for k, v in params.items()])
    return pending.model_copy(update={"parent_run_id": run.info.run_id})


def section_params(config: PipelineConfig, section: str) -> dict[str, Any]:
    """A config section as nested params under its own path, so `flatten` names a value the same in every run:
    `train.kd.temperature`."""
    value: Any = redact_url_credentials(config.model_dump(mode="json"))
    for part in section.split("."):
        value = value[part]
    for part in reversed(section.split(".")):
        value = {part: value}
    return value


def start_stage_run(context: TrackingContext, stage: str, params: dict[str, Any] | None = None) -> str:
    """Open the nested run of a stage (params already nested by section, see `section_params`); returns its id."""
    client = MlflowClient(context.tracking_uri)
    run = client.create_run(
        context.experiment_id,
        run_name=f"{stage} · {context.method}" if context.method else stage,
        tags={"mlflow.parentRunId": context.parent_run_id, "stillhouse.stage": stage},
    )
    client.log_batch(
        run.info.run_id,
        params=[mlflow.entities.Param(k, v[:6000]) for k, v in flatten(redact_url_credentials(params or {})).items()],
    )
    return run.info.run_id


def finish_stage_run(
    context: TrackingContext,
    run_id: str,
    stage: str,
    *,
    fingerprint: str,
    cached: bool,
    seconds: float,
    metrics: dict[str, float] | None = None,
    tags: dict[str, str] | None = None,
    metric_history: list[dict[str, float]] | None = None,
) -> None:
    """Record a stage's outcome on its nested run and close it; the parent run gets the stage's fingerprint."""
    client = MlflowClient(context.tracking_uri)
    entities = mlflow.entities
    client.log_batch(
        run_id,
        # Metric names are the report's own (`student_exact_match/reverse`): MLflow accepts `/` and groups charts by it.
        metrics=[entities.Metric(k, float(v), 0, 0) for k, v in (metrics or {}).items()]
        + [entities.Metric("stage_seconds", seconds, 0, 0)]
        + [
            entities.Metric(k, float(v), 0, int(point["step"]))
            for point in metric_history or []
            for k, v in point.items()
            if k != "step"
        ],
        tags=[
            entities.RunTag(k, redact_url_credentials(v))
            for k, v in {
                "stillhouse.fingerprint": fingerprint,
                "stillhouse.cached": str(cached).lower(),
                **(tags or {}),
            }.items()
        ],
    )
    client.set_tag(context.parent_run_id, f"stillhouse.fingerprint.{stage}", fingerprint)
    client.set_terminated(run_id)


def fail_stage_run(context: TrackingContext, run_id: str, error: BaseException) -> None:
    """Close a stage's nested run as FAILED, with the error's type on it."""
    client = MlflowClient(context.tracking_uri)
    client.set_tag(run_id, "stillhouse.error_type", type(error).__name__)
    client.set_terminated(run_id, status="KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")


def log_stage(
    context: TrackingContext,
    stage: str,
    *,
    fingerprint: str,
    cached: bool,
    seconds: float,
    params: dict[str, Any] | None = None,
    metrics: dict[str, float] | None = None,
    tags: dict[str, str] | None = None,
    metric_history: list[dict[str, float]] | None = None,
) -> str:
    """Record a finished stage as a nested run of the pipeline run in one go; returns the nested run id."""
    run_id = start_stage_run(context, stage, params)
    finish_stage_run(
        context,
        run_id,
        stage,
        fingerprint=fingerprint,
        cached=cached,
        seconds=seconds,
        metrics=metrics,
        tags=tags,
        metric_history=metric_history,
    )
    return run_id


def version_aliases(uri: str, model_name: str, version: str) -> list[str]:
    """The aliases a registered version holds now (`candidate`, `champion`, ...), as MLflow's registry says."""
    return sorted(MlflowClient(uri).get_model_version(model_name, version).aliases)


def tag_run(context: TrackingContext, tags: dict[str, str], run_id: str | None = None) -> None:
    """Set tags on a run (the pipeline's parent run by default)."""
    client = MlflowClient(context.tracking_uri)
    for key, value in tags.items():
        client.set_tag(run_id or context.parent_run_id, key, redact_url_credentials(value))


def log_files(context: TrackingContext, run_id: str, paths: list[Path], artifact_path: str) -> None:
    """Upload files as artifacts of a run, under ``artifact_path``."""
    client = MlflowClient(context.tracking_uri)
    for path in paths:
        client.log_artifact(run_id, str(path), artifact_path=artifact_path)


def log_texts(context: TrackingContext, run_id: str, texts: dict[str, str]) -> None:
    """Write each text as an artifact file of a run: {file name: content}."""
    client = MlflowClient(context.tracking_uri)
    for name, text in texts.items():
        client.log_text(run_id, text, name)


def finish_pipeline_run(context: TrackingContext, metrics: dict[str, float], status: str = "FINISHED") -> None:
    client = MlflowClient(context.tracking_uri)
    client.log_batch(
        context.parent_run_id, metrics=[mlflow.entities.Metric(k, float(v), 0, 0) for k, v in metrics.items()]
    )
    client.set_terminated(context.parent_run_id, status=status)
