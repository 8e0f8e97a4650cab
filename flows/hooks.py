"""What ties a Prefect flow run and its MLflow run together, also when the run fails or crashes.

- `link_mlflow_run`: a Prefect artifact on the flow run pointing at its MLflow run (a link when the
  tracking server is HTTP, a Markdown note with the run id otherwise).
- `record_failure`: the error's type and message as tags on the MLflow run (`stillhouse.error`,
  `stillhouse.error_type`), so a failed run explains itself in the MLflow UI, not only in Prefect's log.
- `mark_mlflow_run_crashed`: an `on_crashed` hook. A crash (the process got SIGTERM, the pod was
  evicted) skips the flow's own `except` path; the hook finds the MLflow run by its Prefect flow-run
  id and marks it FAILED with the crash message, instead of leaving it RUNNING forever.

Whatever these write (artifacts, tags, log lines) has URL credentials removed
(`stillhouse.health.redact_url_credentials`): an error message can quote a URL with ``user:password@``.
"""

from __future__ import annotations

import logging

from mlflow.tracking import MlflowClient

from stillhouse.health import redact_url_credentials
from stillhouse.registry.tracking import TrackingContext, tracking_uri

ERROR_TAG = "stillhouse.error"
MAX_MESSAGE = 4000

log = logging.getLogger(__name__)


def mlflow_run_url(context: TrackingContext) -> str | None:
    """The run's page in the MLflow UI, when the tracking URI is a server's."""
    if not context.tracking_uri.startswith(("http://", "https://")):
        return None
    base = redact_url_credentials(context.tracking_uri).rstrip("/")
    return f"{base}/#/experiments/{context.experiment_id}/runs/{context.parent_run_id}"


def link_mlflow_run(context: TrackingContext) -> None:
    from prefect.artifacts import create_link_artifact, create_markdown_artifact

    url = mlflow_run_url(context)
    shown_uri = redact_url_credentials(context.tracking_uri)
    description = f"MLflow run {context.parent_run_id} (experiment {context.experiment_id})"
    if url:
        create_link_artifact(
            key="mlflow-run", link=url, link_text=description, description="The MLflow run of this pipeline run"
        )
    else:
        create_markdown_artifact(
            key="mlflow-run",
            markdown=f"**{description}** in `{shown_uri}`\n\nBrowse it: `mlflow ui --backend-store-uri {shown_uri}`",
            description="The MLflow run of this pipeline run",
        )


def record_failure(context: TrackingContext, error: BaseException) -> None:
    """Put the error on the MLflow run; the caller marks the run FAILED."""
    client = MlflowClient(context.tracking_uri)
    message = redact_url_credentials(f"{type(error).__name__}: {error}" if str(error) else type(error).__name__)
    client.set_tag(context.parent_run_id, ERROR_TAG, message[:MAX_MESSAGE])
    client.set_tag(context.parent_run_id, "stillhouse.error_type", type(error).__name__)


def mark_mlflow_run_crashed(flow, flow_run, state) -> None:
    """`on_crashed` hook of the pipeline flow: mark its still-RUNNING MLflow run FAILED with the crash message."""
    try:
        from stillhouse.config import PipelineConfig

        config = PipelineConfig.model_validate(flow_run.parameters["config"])
        client = MlflowClient(tracking_uri(config.tracking))
        experiment = client.get_experiment_by_name(config.tracking.experiment)
        if experiment is None:
            return
        runs = client.search_runs(
            [experiment.experiment_id], filter_string=f"tags.`prefect.flow_run_id` = '{flow_run.id}'"
        )
        for run in runs:
            if run.info.status == "RUNNING":
                message = redact_url_credentials(f"Prefect flow run crashed: {state.message or state.name}")
                client.set_tag(run.info.run_id, ERROR_TAG, message[:MAX_MESSAGE])
                client.set_terminated(run.info.run_id, status="FAILED")
    except Exception as error:  # a hook must not hide the crash it reports
        log.warning(
            "could not mark the MLflow run of crashed flow run %s FAILED: %s",
            flow_run.id,
            redact_url_credentials(str(error)),
        )
