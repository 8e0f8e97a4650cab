"""The distillation pipeline as one Prefect flow: curate → sample → train [→ judge → feedback] → evaluate → register →
gate → publish.

    stillhouse run configs/demo.yaml                         # the whole pipeline
    stillhouse run configs/demo.yaml --until sample          # stop after a stage (earlier ones come from the store)
    python -c "from stillhouse.flows.distill import distill; ..."       # or call the flow from Python

Every stage output is content-addressed in the store, so a rerun reuses what is done and a
changed training section reuses curation and sampling. Without PREFECT_API_URL the flow runs on
Prefect's ephemeral API; without MLFLOW_TRACKING_URI it tracks into sqlite:///.stillhouse/mlflow.db.
"""

from __future__ import annotations

import time

from prefect import flow
from prefect.runtime import flow_run
from prefect.settings import PREFECT_UI_URL
from pydantic import BaseModel, Field

from stillhouse.config import PipelineConfig
from stillhouse.evaluation.gate import GateVerdict
from stillhouse.flows.hooks import link_mlflow_run, mark_mlflow_run_crashed, record_failure
from stillhouse.preflight import preflight
from stillhouse.refs import DatasetRef, EvalReport, ModelRef, PairsRef, SamplesRef, Stage
from stillhouse.registry.model_registry import RegisteredModel
from stillhouse.registry.publish import PublishedModel
from stillhouse.registry.tracking import finish_pipeline_run, start_pipeline_run
from stillhouse.tasks.curate import curate_task
from stillhouse.tasks.evaluate import evaluate_task
from stillhouse.tasks.feedback import feedback_train_task, judge_task
from stillhouse.tasks.gate import gate_task
from stillhouse.tasks.publish import publish_task
from stillhouse.tasks.register import register_task
from stillhouse.tasks.sample import sample_task
from stillhouse.tasks.train import train_task


class PipelineResult(BaseModel):
    """What a pipeline run produced: references only, plus where to look."""

    name: str
    mlflow_run_id: str
    tracking_uri: str
    experiment_id: str
    seconds: dict[str, float]
    cached: dict[str, bool]
    dataset: DatasetRef | None = None
    samples: SamplesRef | None = None
    student: ModelRef | None = None
    sft_student: ModelRef | None = Field(None, description="With feedback: the student before it (the DPO reference).")
    pairs: PairsRef | None = None
    report: EvalReport | None = None
    registered: RegisteredModel | None = None
    verdict: GateVerdict | None = Field(
        None, description="The promotion gate's verdict; publishing happens only when it passed."
    )
    published: PublishedModel | None = None


@flow(name="distill", log_prints=True, on_crashed=[mark_mlflow_run_crashed])
def distill(
    config: PipelineConfig,
    until: Stage = Stage.publish,
    checked: bool = False,
    overrides: list[str] | None = None,
    command: str | None = None,
) -> PipelineResult:
    """Run the pipeline up to and including ``until``; ``checked``: the caller already ran `preflight` on this
    config. ``overrides`` (the `--set` values already in ``config``) and ``command`` (the command line) name and
    describe the MLflow run; they change nothing else."""
    if not checked:  # the CLI checks before Prefect starts; a deployment's run checks here
        preflight(config)
    # The flow run's UI page only when a Prefect server is configured (the ephemeral API has no UI).
    tracking = start_pipeline_run(
        config,
        flow_run.get_id(),
        flow_run.get_flow_run_ui_url() if PREFECT_UI_URL.value() else None,
        overrides=overrides,
        command=command,
    )
    link_mlflow_run(tracking)  # and the Prefect run points at its MLflow run
    result = PipelineResult(
        name=config.name,
        mlflow_run_id=tracking.parent_run_id,
        tracking_uri=tracking.tracking_uri,
        experiment_id=tracking.experiment_id,
        seconds={},
        cached={},
    )

    def timed(stage: str, call):
        started = time.perf_counter()
        value = call()
        result.seconds[stage] = round(time.perf_counter() - started, 2)
        result.cached[stage] = bool(getattr(value, "cached", False))
        return value

    try:
        result.dataset = timed("curate", lambda: curate_task(config, tracking))
        if Stage.sample.reached_by(until):
            result.samples = timed("sample", lambda: sample_task(config, result.dataset, tracking))
        if Stage.train.reached_by(until):
            result.student = timed("train", lambda: train_task(config, result.dataset, result.samples, tracking))
            if config.feedback is not None:  # dSFT -> dDPO: the chain's links are separate stages in the store
                result.sft_student = result.student
                result.pairs = timed(
                    "judge", lambda: judge_task(config, result.dataset, result.samples, result.sft_student, tracking)
                )
                result.student = timed(
                    "feedback",
                    lambda: feedback_train_task(config, result.dataset, result.pairs, result.sft_student, tracking),
                )
        if Stage.evaluate.reached_by(until):
            result.report = timed(
                "evaluate",
                lambda: evaluate_task(
                    config, result.dataset, result.samples, result.student, tracking, baseline=result.sft_student
                ),
            )
        if Stage.register.reached_by(until) and config.registry.enabled:
            result.registered = timed(
                "register",
                lambda: register_task(
                    config, result.student, result.report, tracking, dataset=result.dataset, samples=result.samples
                ),
            )
        if Stage.register.reached_by(until) and config.evaluate.gate.enabled:
            # A failed gate keeps the run Completed: every stage worked; the verdict says why nothing was promoted.
            result.verdict = timed("gate", lambda: gate_task(config, result.report, result.registered, tracking))
        if Stage.publish.reached_by(until) and (result.verdict is None or result.verdict.passed):
            result.published = timed(
                "publish",
                lambda: publish_task(
                    config, result.dataset, result.samples, result.student, result.report, result.registered, tracking
                ),
            )
    except BaseException as error:
        record_failure(tracking, error)  # the message on the MLflow run, not only in Prefect's log
        # Ctrl-C or SIGTERM: the user stopped it, nothing broke (a rerun resumes from the store and checkpoints).
        finish_pipeline_run(tracking, {}, status="KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
        raise
    finish_pipeline_run(
        tracking,
        {**(result.report.metrics if result.report else {}), **{f"seconds.{k}": v for k, v in result.seconds.items()}},
    )
    return result
