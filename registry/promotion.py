"""The champion in the MLflow model registry: who holds the alias, what it scored, moving the alias, recording the gate.

A version's metrics are those its registering run logged (`register_task` logs the evaluation
report there), so comparing with the champion needs no re-evaluation.
"""

from __future__ import annotations

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from pydantic import BaseModel

from stillhouse.evaluation.gate import GateVerdict
from stillhouse.registry.model_registry import RegisteredModel
from stillhouse.registry.tracking import TrackingContext


class Champion(BaseModel):
    version: str
    run_id: str | None
    metrics: dict[str, float]


def find_champion(context: TrackingContext, model_name: str, alias: str) -> Champion | None:
    """The version holding ``alias`` and the metrics of the run that registered it; None when no version holds it."""
    client = MlflowClient(context.tracking_uri)
    try:
        version = client.get_model_version_by_alias(model_name, alias)
    except MlflowException:  # no such model, or no version holds the alias
        return None
    metrics = dict(client.get_run(version.run_id).data.metrics) if version.run_id else {}
    return Champion(version=str(version.version), run_id=version.run_id, metrics=metrics)


def promote(context: TrackingContext, model_name: str, version: str, alias: str) -> None:
    """Move ``alias`` to ``version`` (MLflow keeps one holder per alias, so the previous champion loses it)."""
    MlflowClient(context.tracking_uri).set_registered_model_alias(model_name, alias, version)


def record_verdict(
    context: TrackingContext, gate_run_id: str, registered: RegisteredModel | None, verdict: GateVerdict, markdown: str
) -> None:
    """The verdict as files of the gate run, a tag of the pipeline run, and tags of the model version (the registry UI
    shows why)."""
    client = MlflowClient(context.tracking_uri)
    client.log_text(gate_run_id, verdict.model_dump_json(indent=2), "gate_verdict.json")
    client.log_text(gate_run_id, markdown, "gate.md")
    outcome = "passed" if verdict.passed else "failed"
    client.set_tag(context.parent_run_id, "stillhouse.gate", outcome)
    if registered is not None:
        client.set_model_version_tag(registered.name, registered.version, "stillhouse.gate", outcome)
        client.set_model_version_tag(
            registered.name,
            registered.version,
            "stillhouse.gate_failures",
            "; ".join(verdict.failures)[:5000] or "none",
        )
