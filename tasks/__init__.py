"""Prefect task wrappers around the Stillhouse core, one module per stage.

Each task runs a core stage, records it as a nested MLflow run and leaves Prefect artifacts. The
store is the cache (a rerun with the same fingerprint reuses the output), so Prefect's own task
caching is off; retries sit only at I/O boundaries (the Hub push).

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
