"""Health checks of the servers a run depends on, before it pays for any work; and URL credentials kept out of
everything that is shown or stored.

Light on purpose (httpx only): `stillhouse deploy` calls these without importing the model stack.

A server URL may carry ``user:password@`` (``http://alice:s3cret@mlflow:5000``). `redact_url_credentials`
drops them from any URL in a string, dict or list before it reaches a log line, an error message, an
MLflow param or tag, or a Prefect artifact; `split_url_credentials` takes them out of a URL for a client
that reads them from elsewhere (MLflow: $MLFLOW_TRACKING_USERNAME and $MLFLOW_TRACKING_PASSWORD).
"""

from __future__ import annotations

import os
import re
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import httpx

from stillhouse.errors import StillhouseError

# scheme://userinfo@ : the userinfo ends at the last "@" before the host's "/", "?", "#" or whitespace.
_URL_CREDENTIALS = re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.-]*://)[^/?#\s]*@")


def redact_url_credentials(value: Any) -> Any:
    """``value`` with ``user:password@`` dropped from every URL in it: a string, or a (nested) dict or list of them."""
    if isinstance(value, dict):
        return {key: redact_url_credentials(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_url_credentials(item) for item in value)
    if isinstance(value, str):
        return _URL_CREDENTIALS.sub(r"\1", value)
    return value


def split_url_credentials(url: str) -> tuple[str, str | None, str | None]:
    """(the URL without credentials, user name, password); the last two None when it has none."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url, None, None
    userinfo, _, host = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    return urlunsplit(parts._replace(netloc=host)), unquote(user) or None, unquote(password) if password else None


def check_server_health(
    base_url: str, what: str, fix: str, timeout_s: float = 10.0, auth: tuple[str, str] | None = None
) -> None:
    """Raise `StillhouseError` naming ``what`` at ``base_url`` and ``fix`` unless ``<base_url>/health`` answers 200.

    Credentials in ``base_url`` (or ``auth``) are sent as basic auth, and never shown in the error.
    """
    clean, user, password = split_url_credentials(base_url)
    if user is not None:
        auth = (user, password or "")
    health_url = clean.rstrip("/") + "/health"
    shown, shown_health = redact_url_credentials(base_url), health_url
    try:
        response = httpx.get(health_url, timeout=timeout_s, auth=auth)
    except httpx.HTTPError as error:
        raise StillhouseError(
            f"{what} at {shown} does not answer ({type(error).__name__}: {redact_url_credentials(str(error))}); {fix}"
        ) from None
    if response.status_code != 200:
        raise StillhouseError(
            f"{what} at {shown} answered its health check {shown_health} with HTTP {response.status_code}; {fix}"
        )


def check_tracking_server(uri: str, timeout_s: float = 10.0) -> None:
    """Fail fast, naming the URI, when an MLflow server doesn't answer its health check.

    Without this, MLflow's own client retries for minutes before the first log call fails, which
    is after the curation and sampling a run has already paid for. Non-HTTP URIs (sqlite, file)
    are local and need no check.
    """
    if uri.startswith(("http://", "https://")):
        user = os.environ.get("MLFLOW_TRACKING_USERNAME")  # where a credential-free tracking URI's user is
        check_server_health(
            uri,
            "the MLflow tracking server",
            "start it (mlflow server ...) or fix tracking.uri / $MLFLOW_TRACKING_URI",
            timeout_s,
            auth=(user, os.environ.get("MLFLOW_TRACKING_PASSWORD", "")) if user else None,
        )
