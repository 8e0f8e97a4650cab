"""Prefect flows: the distillation pipeline, and the `stillhouse` command line."""

import tasks  # noqa: F401  (sets the embedded defaults before Prefect is imported)
