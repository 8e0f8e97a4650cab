"""The curated dataset in MLflow: its splits as dataset inputs (digest = the curate fingerprint) and its report.

    log_curated_dataset(tracking, run_id, dataset, name="demo")

The inputs point at the Parquet files in the store rather than copying them; the digest is the
stage fingerprint, so two runs trained on the same curated data show the same dataset in the UI.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import mlflow
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.types import ColSpec, Schema

from stillhouse.refs import DatasetRef, PairsRef
from stillhouse.registry.tracking import TrackingContext, use_tracking_uri

COLUMNS = (("prompt_id", True), ("messages", True), ("reference", False), ("category", False), ("source", False))
SPLIT_CONTEXTS = {"train": "training", "eval": "evaluation"}


def split_dataset(dataset: DatasetRef, split: str, name: str) -> MetaDataset:
    path = Path(dataset.path) / f"{split}.parquet"
    with (
        warnings.catch_warnings()
    ):  # MLflow registers its local-file source twice and warns that the choice is ambiguous
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(path.resolve().as_uri())
    schema = Schema([ColSpec("string", column, required=required) for column, required in COLUMNS])
    return MetaDataset(source=source, name=f"{name}-{split}", digest=dataset.fingerprint, schema=schema)


def log_curated_dataset(context: TrackingContext, run_id: str, dataset: DatasetRef, name: str) -> None:
    """Log both splits as dataset inputs of ``run_id`` and the curation report folder as its artifacts."""
    use_tracking_uri(context.tracking_uri)
    with mlflow.start_run(run_id=run_id):
        for split, purpose in SPLIT_CONTEXTS.items():
            mlflow.log_input(split_dataset(dataset, split, name), context=purpose)
        report = Path(dataset.path) / "report"
        if report.is_dir():
            mlflow.log_artifacts(str(report), artifact_path="curation_report")


def log_preference_pairs(context: TrackingContext, run_id: str, pairs: PairsRef, name: str) -> None:
    """The judged preference pairs as a dataset input of the judge run (digest: the judge stage's fingerprint)."""
    use_tracking_uri(context.tracking_uri)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source((Path(pairs.path) / "pairs.parquet").resolve().as_uri())
    with mlflow.start_run(run_id=run_id):
        mlflow.log_input(
            MetaDataset(source=source, name=f"{name}-pairs", digest=pairs.fingerprint), context="preference"
        )
