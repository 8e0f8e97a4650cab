"""A tracking server's credentials, moved from its URI to MLflow's environment variables before anything stores
the URI (Prefect's flow-run parameters, MLflow's params, log lines). No MLflow import: `stillhouse validate` and
`run` apply it before either library loads.
"""

from __future__ import annotations

import os

from stillhouse.config import PipelineConfig
from stillhouse.health import split_url_credentials


def credentials_to_environment(uri: str) -> str:
    """``uri`` without ``user:password@``; those go to $MLFLOW_TRACKING_USERNAME / $MLFLOW_TRACKING_PASSWORD.

    MLflow's client sends those as basic auth on every request to the server, so the URI it is given,
    and prints ("View run … at"), holds no secret. Credentials in the URI win over the variables: the
    config says which server and which user.
    """
    clean, user, password = split_url_credentials(uri)
    if user is not None:
        os.environ["MLFLOW_TRACKING_USERNAME"] = user
        if password is not None:
            os.environ["MLFLOW_TRACKING_PASSWORD"] = password
    return clean


def without_tracking_credentials(config: PipelineConfig) -> PipelineConfig:
    """``config`` with ``tracking.uri``'s credentials moved to the environment (see `credentials_to_environment`).

    Apply it before a flow is called with the config: Prefect stores a flow run's parameters (and
    shows them in its UI and events), so a password must be gone from them before the run starts.
    """
    if not config.tracking.uri or "@" not in config.tracking.uri:
        return config
    tracking = config.tracking.model_copy(update={"uri": credentials_to_environment(config.tracking.uri)})
    return config.model_copy(update={"tracking": tracking})
