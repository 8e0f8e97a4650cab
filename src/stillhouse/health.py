"""Health checks of the servers a run depends on, before it pays for any work.

Light on purpose (httpx only): `stillhouse deploy` calls these without importing the model stack.
"""

from __future__ import annotations

import httpx

from stillhouse.errors import StillhouseError


def check_server_health(base_url: str, what: str, fix: str, timeout_s: float = 10.0) -> None:
    """Raise `StillhouseError` naming ``what`` at ``base_url`` and ``fix`` unless ``<base_url>/health`` answers 200."""
    health_url = base_url.rstrip("/") + "/health"
    try:
        response = httpx.get(health_url, timeout=timeout_s)
    except httpx.HTTPError as error:
        raise StillhouseError(
            f"{what} at {base_url} does not answer ({type(error).__name__}: {error}); {fix}"
        ) from None
    if response.status_code != 200:
        raise StillhouseError(
            f"{what} at {base_url} answered its health check {health_url} with HTTP {response.status_code}; {fix}"
        )


def check_tracking_server(uri: str, timeout_s: float = 10.0) -> None:
    """Fail fast, naming the URI, when an MLflow server doesn't answer its health check.

    Without this, MLflow's own client retries for minutes before the first log call fails, which
    is after the curation and sampling a run has already paid for. Non-HTTP URIs (sqlite, file)
    are local and need no check.
    """
    if uri.startswith(("http://", "https://")):
        check_server_health(
            uri,
            "the MLflow tracking server",
            "start it (mlflow server ...) or fix tracking.uri / $MLFLOW_TRACKING_URI",
            timeout_s,
        )
