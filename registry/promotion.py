"""The champion in the MLflow model registry: who holds the alias, what it scored, and moving the alias.

A version's metrics are those its registering run logged (`register_task` logs the evaluation
report there), so comparing with the champion needs no re-evaluation.
"""

from __future__ import annotations

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from pydantic import BaseModel

from stillhouse.evaluation.gate import GateVerdict


class Champion(BaseModel):
    version: str
    run_id: str | None
    metrics: dict[str, float]


def find_champion(client: MlflowClient, model_name: str, alias: str) -> Champion | None:
    """The version holding ``alias`` and the metrics of the run that registered it; None when no version holds it."""
    try:
        version = client.get_model_version_by_alias(model_name, alias)
    except MlflowException:  # no such model, or no version holds the alias
        return None
    metrics = dict(client.get_run(version.run_id).data.metrics) if version.run_id else {}
    return Champion(version=str(version.version), run_id=version.run_id, metrics=metrics)


def promote(client: MlflowClient, model_name: str, version: str, alias: str) -> None:
    """Move ``alias`` to ``version`` (MLflow keeps one holder per alias, so the previous champion loses it)."""
    client.set_registered_model_alias(model_name, alias, version)


def tag_verdict(client: MlflowClient, model_name: str, version: str, verdict: GateVerdict) -> None:
    """Record the gate's outcome on the model version, so the registry UI shows why it was or wasn't promoted."""
    client.set_model_version_tag(model_name, version, "stillhouse.gate", "passed" if verdict.passed else "failed")
    client.set_model_version_tag(model_name, version, "stillhouse.gate_failures", "; ".join(verdict.failures)[:5000] or "none")
