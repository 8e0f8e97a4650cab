"""The curated dataset in MLflow: its splits as dataset inputs (digest = the curate fingerprint) and its report.

    log_curated_dataset(tracking, run_id, dataset, name="demo")

The inputs point at the Parquet files in the store rather than copying them; the digest is the
stage fingerprint, so two runs trained on the same curated data show the same dataset in the UI.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, Schema
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from registry.tracking import TrackingContext
from stillhouse.refs import DatasetRef

COLUMNS = (("prompt_id", True), ("messages", True), ("reference", False), ("category", False), ("source", False))
SPLIT_CONTEXTS = {"train": "training", "eval": "evaluation"}


def dataset_input(dataset: DatasetRef, split: str, name: str) -> DatasetInput:
    path = Path(dataset.path) / f"{split}.parquet"
    with warnings.catch_warnings():  # MLflow registers its local-file source twice and warns that the choice is ambiguous
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(path.resolve().as_uri())
    schema = Schema([ColSpec("string", column, required=required) for column, required in COLUMNS])
    meta = MetaDataset(source=source, name=f"{name}-{split}", digest=dataset.fingerprint, schema=schema)
    # MlflowClient logs inputs as entities; `mlflow.log_input` would need a fluent active run.
    return DatasetInput(meta._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, SPLIT_CONTEXTS[split])])


def log_curated_dataset(context: TrackingContext, run_id: str, dataset: DatasetRef, name: str) -> None:
    """Log both splits as dataset inputs of ``run_id`` and the curation report folder as its artifacts."""
    client = MlflowClient(context.tracking_uri)
    client.log_inputs(run_id, datasets=[dataset_input(dataset, split, name) for split in SPLIT_CONTEXTS])
    report = Path(dataset.path) / "report"
    if report.is_dir():
        client.log_artifacts(run_id, str(report), artifact_path="curation_report")
