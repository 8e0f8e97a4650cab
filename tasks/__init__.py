"""Prefect task wrappers around the Stillhouse core, one module per stage.

Importing this package sets the embedded defaults measured in shared/ENVIRONMENT.md (a longer
start-up limit for Prefect's ephemeral server, telemetry off) unless the user set them already.
"""

import os

for _name, _value in {
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_name, _value)
