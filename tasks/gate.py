"""The promotion gate as a Prefect task: candidate vs thresholds and vs the `champion`, before publishing.

    verdict = gate_task(config, report, registered, tracking)   # after register_task, before publish_task
    if verdict.passed: publish ...

The candidate's metrics (the evaluation report) are checked against ``evaluate.gate``'s thresholds
and, with ``must_beat_champion``, against the metrics of the version holding the ``champion`` alias.
A passing candidate gets the alias; a failing one keeps only ``candidate`` and must not be published.
The verdict, the metrics it read and the champion version are logged to MLflow as a nested ``gate``
run (tags ``stillhouse.gate``, ``stillhouse.champion_version``; artifacts ``gate_verdict.json``,
``gate.md``), tagged on the parent run and on the model version, and shown as a Prefect markdown artifact.

A failed gate does not fail the task or the flow run: the run ends **Completed** and returns the
verdict. Prefect's Failed means something broke and a retry might help; here every stage worked,
its outputs are valid and cached, and a rerun would reach the same verdict. The rejection is a
result, surfaced by the verdict (``passed: false`` with one message per failed threshold), the
``stillhouse.gate=failed`` tags in MLflow, the ``gate`` artifact in Prefect, and the CLI, which prints
the failures and exits with a non-zero status so scripts and CI notice.
"""

from __future__ import annotations

import time

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from stillhouse.config import PipelineConfig
from stillhouse.evaluation.gate import GateVerdict, check_candidate
from stillhouse.evaluation.report import gate_markdown
from stillhouse.refs import EvalReport
from stillhouse.registry.model_registry import RegisteredModel
from stillhouse.registry.promotion import find_champion, promote, record_verdict
from stillhouse.registry.tracking import TrackingContext, log_stage, section_params


@task(name="gate", cache_policy=NO_CACHE)
def gate_task(
    config: PipelineConfig, report: EvalReport, registered: RegisteredModel | None, tracking: TrackingContext
) -> GateVerdict:
    """Check the candidate, move `champion` to it only when it passes, log everything; returns the verdict."""
    started = time.perf_counter()
    gate = config.evaluate.gate
    champion = find_champion(tracking, registered.name, gate.champion_alias) if registered is not None else None
    verdict = check_candidate(
        gate,
        report.metrics,
        champion=champion.metrics if champion else None,
        champion_version=champion.version if champion else None,
        candidate_version=registered.version if registered else None,
    )
    if verdict.passed and registered is not None and (champion is None or champion.version != registered.version):
        promote(tracking, registered.name, registered.version, gate.champion_alias)
        verdict.promoted = True
    outcome = "passed" if verdict.passed else "failed"
    run_id = log_stage(
        tracking,
        "gate",
        fingerprint=report.fingerprint,
        cached=False,
        seconds=time.perf_counter() - started,
        params=section_params(config, "evaluate.gate"),
        metrics={
            "gate_passed": float(verdict.passed),
            **{f"candidate.{k}": v for k, v in verdict.candidate_metrics.items()},
            **{f"champion.{k}": v for k, v in verdict.champion_metrics.items()},
        },
        tags={
            "stillhouse.gate": outcome,
            "stillhouse.champion_version": verdict.champion_version or "none",
            "stillhouse.candidate_version": verdict.candidate_version or "none",
            "stillhouse.promoted": str(verdict.promoted).lower(),
        },
    )
    record_verdict(tracking, run_id, registered, verdict, gate_markdown(verdict))
    create_markdown_artifact(gate_markdown(verdict), key="gate", description=f"Promotion gate: {outcome}")
    logger = get_run_logger()
    if verdict.passed:
        logger.info(
            "gate: passed%s",
            f"; version {registered.version} now holds @{gate.champion_alias}" if verdict.promoted else "",
        )
    else:
        logger.warning(
            "gate: FAILED, not promoted and not to be published:\n%s", "\n".join(f"  - {f}" for f in verdict.failures)
        )
    return verdict
