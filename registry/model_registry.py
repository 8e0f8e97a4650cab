"""Registering the student in the MLflow model registry, as a version with an alias (never stages)."""

from __future__ import annotations

import warnings
from pathlib import Path

import mlflow
from huggingface_hub import ModelCard
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from pydantic import BaseModel

from stillhouse.config import RegisterConfig
from stillhouse.errors import StillhouseError
from stillhouse.licenses import LICENSES
from stillhouse.models import load_causal_lm, load_tokenizer
from stillhouse.refs import DatasetRef, ModelRef, SamplesRef
from stillhouse.registry.datasets import split_dataset
from stillhouse.registry.tracking import TrackingContext, prepare_database, use_tracking_uri

# mlflow.transformers.log_model infers torchvision otherwise, which breaks beside the CPU torch build.
PIP_REQUIREMENTS = ["torch", "transformers", "safetensors", "tokenizers"]


class RegisteredModel(BaseModel):
    name: str
    version: str
    alias: str
    model_uri: str
    run_id: str
    cached: bool


def license_front_matter(license: str) -> str:
    """`license: apache-2.0`, or `license: other` + `license_name` for ids the Hub doesn't know (qwen, deepseek,
    mrl)."""
    terms = LICENSES.get(license)
    if terms is None or terms.hub_id:
        return f"license: {license}\n"
    return f"license: other\nlicense_name: {license}\nlicense_link: {terms.url}\n"


def log_training_inputs(
    context: TrackingContext, run_id: str, dataset: DatasetRef, samples: SamplesRef, name: str
) -> None:
    """Log what the registered student learned from as dataset inputs of its run: the curated prompts and the
    teacher's outputs.

    Digests are the store fingerprints, so the MLflow UI shows the same dataset for every version trained on it.
    """
    use_tracking_uri(context.tracking_uri)
    with (
        warnings.catch_warnings()
    ):  # MLflow registers its local-file source twice and warns that the choice is ambiguous
        warnings.simplefilter("ignore", UserWarning)
        teacher_outputs = resolve_dataset_source(Path(samples.path).resolve().as_uri())
    with mlflow.start_run(run_id=run_id):
        mlflow.log_input(split_dataset(dataset, "train", name), context="training")
        mlflow.log_input(
            MetaDataset(source=teacher_outputs, name=f"{name}-teacher-outputs", digest=samples.fingerprint),
            context="teacher-outputs",
        )


def find_version(client: MlflowClient, name: str, train_fingerprint: str):
    try:
        versions = client.search_model_versions(f"name='{name}'")
    except MlflowException:
        return None
    matching = [v for v in versions if v.tags.get("stillhouse.train_fingerprint") == train_fingerprint]
    return max(matching, key=lambda v: int(v.version)) if matching else None


def register_student(
    config: RegisterConfig,
    context: TrackingContext,
    student: ModelRef,
    run_id: str,
    tags: dict[str, str],
    license: str,
) -> RegisteredModel:
    """Log the student as an MLflow transformers model under ``run_id`` and register a version.

    A version already registered for the same trained student (same train fingerprint) is reused,
    so rerunning an unchanged config does not pile up identical versions.
    """
    use_tracking_uri(context.tracking_uri)
    client = MlflowClient(context.tracking_uri)
    existing = find_version(client, config.model_name, student.fingerprint)
    if existing is not None:
        client.set_registered_model_alias(config.model_name, config.alias, existing.version)
        return RegisteredModel(
            name=config.model_name,
            version=str(existing.version),
            alias=config.alias,
            model_uri=f"models:/{config.model_name}@{config.alias}",
            run_id=existing.run_id,
            cached=True,
        )
    model, tokenizer = load_causal_lm(student.model_path, device="cpu"), load_tokenizer(student.model_path)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.transformers.log_model(
            transformers_model={"model": model, "tokenizer": tokenizer},
            name="student",
            task="text-generation",
            pip_requirements=PIP_REQUIREMENTS,
            registered_model_name=config.model_name,
            # Our own card: without one MLflow tries to fetch the model's card and license from the Hub.
            model_card=ModelCard(
                f"---\n{license_front_matter(license)}library_name: transformers\n---\n# {config.model_name}\n"
            ),
        )
    version = str(info.registered_model_version)
    for key, value in {"stillhouse.train_fingerprint": student.fingerprint, **tags}.items():
        client.set_model_version_tag(config.model_name, version, key, value)
    client.set_registered_model_alias(config.model_name, config.alias, version)
    return RegisteredModel(
        name=config.model_name,
        version=version,
        alias=config.alias,
        model_uri=f"models:/{config.model_name}@{config.alias}",
        run_id=run_id,
        cached=False,
    )


def champion_version(uri: str, model_name: str, alias: str) -> tuple[str, str | None]:
    """(version, train fingerprint) of the version holding ``alias`` in the registry at ``uri``; a clear error when
    none holds it."""
    prepare_database(uri)
    client = MlflowClient(uri)
    try:
        version = client.get_model_version_by_alias(model_name, alias)
    except MlflowException:
        raise StillhouseError(
            f"no version of registered model {model_name!r} holds the alias @{alias} on {uri}: "
            "run the pipeline until a candidate passes the promotion gate, then re-evaluate"
        ) from None
    return str(version.version), version.tags.get("stillhouse.train_fingerprint")
