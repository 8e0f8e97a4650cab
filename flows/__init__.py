"""Prefect flows: the distillation pipeline, the deployments' flows, and the `stillhouse` command line."""
