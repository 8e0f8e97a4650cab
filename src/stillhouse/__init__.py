"""Stillhouse: distill open-weights language models, reproducibly.

The core package is plain Python (torch, transformers, datasets). It imports neither Prefect nor
MLflow; `tasks/`, `flows/` and `registry/` wrap it for orchestration and tracking.
"""

__version__ = "0.1.0"
