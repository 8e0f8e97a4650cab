"""Prefect task wrappers around the Stillhouse core, one module per stage.

Each task runs a core stage through `run_stage` (timing, the log line, the nested MLflow run) and
leaves Prefect artifacts. The store is the cache (a rerun with the same fingerprint reuses the
output), so Prefect's own task caching is off; retries sit only at I/O boundaries (the Hub push).
"""
