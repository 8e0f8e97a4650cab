"""MLflow tracking and model registry; Hub publishing and model cards."""
