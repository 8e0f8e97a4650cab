"""The flows that deployments run: the pipeline and each stage, each from a named config file.

    python -c "from stillhouse.flows.stages import train; train('configs/demo.yaml')"
                                                                              # curate and sample come from the store
    stillhouse deploy --config configs/demo.yaml                              # registers them all (prefect.yaml)
    prefect deployment run 'stillhouse-pipeline/nightly'                      # then a worker on pool `local` runs it

A deployment's parameters are JSON, so these flows take the *path* of a named config (relative to
the run's working directory, else one of the configs bundled with Stillhouse) plus `--set`-style
overrides, and validate it when the run starts. A stage flow runs the pipeline up to that stage: the stages before it
are reused from the content-addressed store when nothing changed, which is also what makes the schedules cheap: a
nightly re-distillation recomputes only what new data or a new config changed.

Every flow here holds one slot of the global concurrency limit `gpu` (created by `stillhouse deploy`,
one slot per GPU) for its whole run, so scheduled runs don't fight over one accelerator. Without a
server or without the limit, the slot is not enforced.
"""

# No `from __future__ import annotations` here: `flow.serve` loads this file as a script, and Prefect then
# can't resolve string annotations such as `Stage` when it validates a run's parameters (every served run
# failed with "PipelineModel is not fully defined"). Real annotation objects need no resolving.

from prefect import flow
from prefect.concurrency.sync import concurrency
from prefect.runtime import flow_run

from stillhouse.config import PipelineConfig, load_config
from stillhouse.errors import StillhouseError
from stillhouse.flows.bundled import resolve_config
from stillhouse.flows.distill import PipelineResult, distill
from stillhouse.flows.environment import apply_embedded_defaults
from stillhouse.flows.hooks import link_mlflow_run, record_failure
from stillhouse.health import redact_url_credentials
from stillhouse.preflight import preflight
from stillhouse.refs import EvalReport, ModelRef, Stage
from stillhouse.registry.credentials import without_tracking_credentials
from stillhouse.registry.model_registry import champion_version
from stillhouse.registry.tracking import (
    finish_pipeline_run,
    start_pipeline_run,
    tag_run,
    tracking_uri,
)
from stillhouse.store import Store
from stillhouse.tasks.curate import curate_task
from stillhouse.tasks.evaluate import evaluate_task
from stillhouse.tasks.sample import sample_task

GPU_LIMIT = "gpu"


def load_named_config(config: str, overrides: list[str] | None = None) -> PipelineConfig:
    """The config a deployment names: a path from the run's working directory, else a bundled config."""
    apply_embedded_defaults()  # a deployed flow run is an entry point of its own
    # Prefect keeps a flow run's parameters: a password in tracking.uri goes to the environment first.
    return without_tracking_credentials(load_config(resolve_config(config), list(overrides or [])))


def run_until(config: str, overrides: list[str] | None, until: Stage) -> PipelineResult:
    settings = load_named_config(config, overrides)
    with concurrency(GPU_LIMIT, occupy=1, strict=False):
        return distill(settings, until=until, overrides=redact_url_credentials(list(overrides or [])))


@flow(name="stillhouse-pipeline", log_prints=True)
def pipeline(
    config: str = "configs/demo.yaml", overrides: list[str] | None = None, until: Stage = Stage.publish
) -> PipelineResult:
    """The whole pipeline (curate → … → publish) of a named config."""
    return run_until(config, overrides, until)


@flow(name="stillhouse-curate", log_prints=True)
def curate(config: str = "configs/demo.yaml", overrides: list[str] | None = None) -> PipelineResult:
    """Curate the config's prompts into the store."""
    return run_until(config, overrides, Stage.curate)


@flow(name="stillhouse-sample", log_prints=True)
def sample(config: str = "configs/demo.yaml", overrides: list[str] | None = None) -> PipelineResult:
    """Sample the teacher on the curated prompts (curation reused from the store)."""
    return run_until(config, overrides, Stage.sample)


@flow(name="stillhouse-train", log_prints=True)
def train(config: str = "configs/demo.yaml", overrides: list[str] | None = None) -> PipelineResult:
    """Train the student on the teacher's outputs (earlier stages reused from the store)."""
    return run_until(config, overrides, Stage.train)


@flow(name="stillhouse-evaluate", log_prints=True)
def evaluate(config: str = "configs/demo.yaml", overrides: list[str] | None = None) -> PipelineResult:
    """Evaluate the config's student on the current eval split; new eval data gives a new evaluation."""
    return run_until(config, overrides, Stage.evaluate)


@flow(name="stillhouse-register", log_prints=True)
def register(config: str = "configs/demo.yaml", overrides: list[str] | None = None) -> PipelineResult:
    """Register the evaluated student in MLflow and run the promotion gate (champion only when it passes)."""
    return run_until(config, overrides, Stage.register)


@flow(name="stillhouse-publish", log_prints=True)
def publish(config: str = "configs/demo.yaml", overrides: list[str] | None = None) -> PipelineResult:
    """Publish the gated student to the Hugging Face Hub (everything before it reused from the store)."""
    return run_until(config, overrides, Stage.publish)


def champion_student(config: PipelineConfig) -> tuple[str, ModelRef]:
    """(version, student) of the registry version holding the champion alias, its weights found in the store by
    fingerprint."""
    alias, name = config.evaluate.gate.champion_alias, config.registry.model_name
    version, train_fingerprint = champion_version(tracking_uri(config.tracking), name, alias)
    store = Store.from_config(config.store)
    manifest = store.manifest("train", train_fingerprint) if train_fingerprint else None
    if manifest is None:
        raise StillhouseError(
            f"{name} version {version} (@{alias}): its training output train/{train_fingerprint} is not in the store "
            f"{config.store.root}; point `store:` at the store the champion was trained into"
        )
    folder = store.path("train", train_fingerprint)
    return version, ModelRef.from_manifest("train", train_fingerprint, folder, True, manifest)


@flow(name="stillhouse-evaluate-champion", log_prints=True)
def evaluate_champion(config: str = "configs/demo.yaml", overrides: list[str] | None = None) -> EvalReport:
    """Re-evaluate the champion (the registry version holding the gate's champion alias) on the config's current eval
    split.

    Curation and sampling come from the store when the data didn't change; new data gives a new
    eval split, teacher answers for it and a new evaluation of the same champion weights. The run is
    its own MLflow run, tagged with the champion's version.
    """
    settings = load_named_config(config, overrides)
    preflight(settings)
    version, champion = champion_student(settings)
    with concurrency(GPU_LIMIT, occupy=1, strict=False):
        tracking = start_pipeline_run(
            settings, flow_run.get_id(), overrides=redact_url_credentials(list(overrides or []))
        )
        tag_run(tracking, {"stillhouse.champion_version": version})
        link_mlflow_run(tracking)
        try:
            dataset = curate_task(settings, tracking)
            samples = sample_task(settings, dataset, tracking)
            report = evaluate_task(settings, dataset, samples, champion, tracking)
        except BaseException as error:
            record_failure(tracking, error)
            finish_pipeline_run(tracking, {}, status="FAILED")
            raise
        finish_pipeline_run(tracking, report.metrics)
    return report
