"""The flows that deployments run: the pipeline and each stage, each from a named config file.

    python -c "from flows.stages import train; train('configs/demo.yaml')"   # curate and sample come from the store
    stillhouse deploy --config configs/demo.yaml                              # registers them all (prefect.yaml)
    prefect deployment run 'stillhouse-pipeline/nightly'                      # then a worker on pool `local` runs it

A deployment's parameters are JSON, so these flows take the *path* of a named config (relative to
the working directory, the repository root) plus `--set`-style overrides, and validate it when the
run starts. A stage flow runs the pipeline up to that stage: the stages before it are reused from
the content-addressed store when nothing changed, which is also what makes the schedules cheap: a
nightly re-distillation recomputes only what new data or a new config changed.

Every flow here holds one slot of the global concurrency limit `gpu` (created by `stillhouse deploy`,
one slot per GPU) for its whole run, so scheduled runs don't fight over one accelerator. Without a
server or without the limit, the slot is not enforced.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.concurrency.sync import concurrency

from flows.distill import PipelineResult, Stage, distill
from stillhouse.config import PipelineConfig, load_config

GPU_LIMIT = "gpu"


def load_named_config(config: str, overrides: list[str] | None = None) -> PipelineConfig:
    return load_config(Path(config), list(overrides or []))


def run_until(config: str, overrides: list[str] | None, until: Stage) -> PipelineResult:
    settings = load_named_config(config, overrides)
    with concurrency(GPU_LIMIT, occupy=1, strict=False):
        return distill(settings, until=until)


@flow(name="stillhouse-pipeline", log_prints=True)
def pipeline(config: str = "configs/demo.yaml", overrides: list[str] | None = None, until: Stage = "publish") -> PipelineResult:
    """The whole pipeline (curate → … → publish) of a named config."""
    return run_until(config, overrides, until)


@flow(name="stillhouse-curate", log_prints=True)
def curate(config: str = "configs/demo.yaml", overrides: list[str] | None = None) -> PipelineResult:
    """Curate the config's prompts into the store."""
    return run_until(config, overrides, "curate")


@flow(name="stillhouse-sample", log_prints=True)
def sample(config: str = "configs/demo.yaml", overrides: list[str] | None = None) -> PipelineResult:
    """Sample the teacher on the curated prompts (curation reused from the store)."""
    return run_until(config, overrides, "sample")


@flow(name="stillhouse-train", log_prints=True)
def train(config: str = "configs/demo.yaml", overrides: list[str] | None = None) -> PipelineResult:
    """Train the student on the teacher's outputs (earlier stages reused from the store)."""
    return run_until(config, overrides, "train")


@flow(name="stillhouse-evaluate", log_prints=True)
def evaluate(config: str = "configs/demo.yaml", overrides: list[str] | None = None) -> PipelineResult:
    """Evaluate the config's student on the current eval split; new eval data gives a new evaluation."""
    return run_until(config, overrides, "evaluate")


@flow(name="stillhouse-register", log_prints=True)
def register(config: str = "configs/demo.yaml", overrides: list[str] | None = None) -> PipelineResult:
    """Register the evaluated student in MLflow and run the promotion gate (champion only when it passes)."""
    return run_until(config, overrides, "register")


@flow(name="stillhouse-publish", log_prints=True)
def publish(config: str = "configs/demo.yaml", overrides: list[str] | None = None) -> PipelineResult:
    """Publish the gated student to the Hugging Face Hub (everything before it reused from the store)."""
    return run_until(config, overrides, "publish")
