"""The environment defaults of the embedded set-up, applied by the entry points (the CLI, the deployed flows).

Measured on a 2-core machine: Prefect's temporary server took 8-15 s to start (longer than its default
20 s limit allows for under load) on a fresh database, and its telemetry once raced the sqlite database.
A value the user set wins.
"""

from __future__ import annotations

import os
import sys

EMBEDDED_DEFAULTS = {
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # The core logs through `logging` (e.g. a mixture that dropped rows): shown in the console and the Prefect UI.
    "PREFECT_LOGGING_EXTRA_LOGGERS": "stillhouse",
}


def apply_embedded_defaults() -> None:
    """Set each default the environment doesn't already set; call it before Prefect, MLflow or the Hub client is
    imported."""
    for name, value in EMBEDDED_DEFAULTS.items():
        os.environ.setdefault(name, value)
    if not sys.stderr.isatty():
        # A log file or CI: progress bars would be `\r`-rewritten lines by the hundred. Progress still shows in the
        # Prefect UI (progress artifacts) and in each stage's log line.
        os.environ.setdefault("TQDM_DISABLE", "1")
