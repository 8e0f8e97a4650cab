"""Publishing as Prefect tasks: license check, the folder sealed in the store, the Hub push, the round trip, the MLflow
links.

    published = publish_task(config, dataset, samples, student, report, registered, tracking)

Order: the license check and the public names of teacher, base model and data (again: the config
may have changed since preflight), the signing key (when ``publish.signing`` is set), the student's
stored files hashed against their manifest (weights that changed after training are refused, never
pushed), the folder (model, card, stillhouse.json, model.sig), a last read of its text for local
paths and the login name, the push (one commit + a tag; each Hub call retried inside `push_folder`,
so the task itself has no Prefect retries that would redo a finished commit), the round trip
(download the revision into a fresh cache and compare greedy generations), then MLflow: the parent
run, the publish run and the model version get the Hub repo, commit, tag and URLs, and the
round-trip result. A failed round trip fails the task after it is recorded. The card and
stillhouse.json name the MLflow run that trained the student (`training_run`), which a rerun that
only publishes is not, and the publishing run beside it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from stillhouse.config import PipelineConfig
from stillhouse.data.curate import read_split
from stillhouse.errors import StillhouseError
from stillhouse.licenses import check_pipeline_licenses
from stillhouse.public_names import check_public_names
from stillhouse.refs import DatasetRef, EvalReport, ModelRef, SamplesRef
from stillhouse.registry.card import redact_url_credentials
from stillhouse.registry.hub import push_folder
from stillhouse.registry.model_registry import RegisteredModel
from stillhouse.registry.publish import (
    PublishedModel,
    RoundTrip,
    check_folder_is_public,
    link_to_hub_revision,
    round_trip,
    training_run,
    write_publish_folder,
)
from stillhouse.registry.signing import check_signing
from stillhouse.registry.tracking import TrackingContext, code_version, log_stage, section_params
from stillhouse.store import Store, fingerprint

# 2: stillhouse.json, license section, tag, round trip; 3: content_sha256, signature; 4: public names, no local
# paths, the teacher's terms, the training run
CODE_VERSION = 4


@task(name="push-to-hub", cache_policy=NO_CACHE)
def push_task(folder: str, config: PipelineConfig, tag: str | None, description: str) -> PublishedModel:
    revision = push_folder(Path(folder), config, tag=tag, description=description, log=get_run_logger().warning)
    return PublishedModel(folder=folder, **revision.model_dump())


@task(name="round-trip", cache_policy=NO_CACHE)
def round_trip_task(published: PublishedModel, config: PipelineConfig, dataset: DatasetRef) -> RoundTrip:
    prompts = [
        json.loads(messages)
        for messages in read_split(dataset, "eval")["messages"].head(config.publish.round_trip_prompts)
    ]
    return round_trip(
        published, Path(published.folder), prompts, config, max_new_tokens=min(config.evaluate.max_new_tokens, 32)
    )


def hub_tags(published: PublishedModel) -> dict[str, str]:
    return {
        "stillhouse.hub.repo_id": published.repo_id or "",
        "stillhouse.hub.commit": published.commit_oid or "",
        "stillhouse.hub.commit_url": published.commit_url or "",
        "stillhouse.hub.revision_url": published.revision_url or "",
        "stillhouse.hub.tag": published.tag or "",
    }


def verify_student(store: Store, student: ModelRef) -> None:
    """Hash every stored file of the student against its output's manifest; raise, before anything is written or
    pushed, when one doesn't match (whatever ``store.verify`` says: what is published is always hashed)."""
    check = store.verify_output(student.stage, student.fingerprint, f"publish: the student ({student.stage} output)")
    folder = Path(check.path).resolve()
    if not Path(student.model_path).resolve().is_relative_to(folder):
        raise StillhouseError(
            f"publish: the student's model folder {student.model_path} is not inside its verified store output "
            f"{folder}; publish a student the pipeline trained into the store"
        )


@task(name="publish", cache_policy=NO_CACHE)
def publish_task(
    config: PipelineConfig,
    dataset: DatasetRef,
    samples: SamplesRef,
    student: ModelRef,
    report: EvalReport,
    registered: RegisteredModel | None,
    tracking: TrackingContext,
) -> PublishedModel:
    started = time.perf_counter()
    logger = get_run_logger()
    settings = config.publish
    check = check_pipeline_licenses(config)
    if settings.repo_id:
        check.enforce(settings.license_override)
        check_public_names(config)
    elif not check.ok:
        logger.warning("publish: the folder is written, but pushing it would be refused:\n%s", check.report())
    check_signing(config)  # the library and the key, before anything is written
    store = Store.from_config(config.store)
    verify_student(store, student)
    publish_fingerprint = fingerprint(
        "publish",
        settings.model_dump(mode="json", exclude={"token_env", "hub_retries", "retry_backoff_s"}),
        {
            "student": student.fingerprint,
            "evaluate": report.fingerprint,
            "version": registered.version if registered else "",
        },
        CODE_VERSION,
    )
    tag = (
        settings.tag.format(version=registered.version if registered else publish_fingerprint, name=config.name)
        if settings.repo_id
        else None
    )
    trained = training_run(tracking, student, registered)
    lineage = {
        **trained,  # mlflow_run_id and its URL, experiment and Prefect flow run: the run that trained the student
        "mlflow_publish_run_id": tracking.parent_run_id,
        "prefect_publish_flow_run_id": tracking.flow_run_id,
        "mlflow_tracking_uri": redact_url_credentials(tracking.tracking_uri),
        "registered_model": registered.model_dump(exclude={"cached"}) if registered else None,
        "prefect_flow_run_url": tracking.flow_run_url if trained["mlflow_run_id"] == tracking.parent_run_id else None,
        "code_version": code_version(),
        "store": redact_url_credentials(config.store.root),
        "publish_fingerprint": publish_fingerprint,  # part of content_sha256: a rerun finds its own Hub commit by it
    }

    def compute(stage_folder: Path) -> dict:
        folder = write_publish_folder(
            stage_folder / config.name, config, dataset, samples, student, report, check, lineage
        )
        if not settings.repo_id:
            return PublishedModel(folder=str(folder)).model_dump()
        check_folder_is_public(folder, config)  # what is about to leave the machine, read once more
        published_from = (
            f" (published from run {tracking.parent_run_id})"
            if trained["mlflow_run_id"] != tracking.parent_run_id
            else ""
        )
        description = (
            f"MLflow run {trained['mlflow_run_id']}{published_from}; publish fingerprint {publish_fingerprint}; "
            f"code {code_version()}"
        )
        pushed = push_task(str(folder), config, tag, description)
        checked = round_trip_task(pushed, config, dataset) if settings.round_trip_prompts > 0 else None
        return {**pushed.model_dump(), "round_trip": checked.model_dump() if checked else None}

    # Sealed like any stage: an unchanged rerun neither rewrites the folder nor pushes a new commit.
    output = store.build("publish", publish_fingerprint, compute)
    published = PublishedModel.model_validate({**output.manifest, "cached": output.cached})
    checked = RoundTrip.model_validate(output.manifest["round_trip"]) if output.manifest.get("round_trip") else None
    logger.info(
        "publish: %s %s%s",
        "reused" if output.cached else "wrote",
        published.folder,
        f"; pushed {published.repo_id}@{published.commit_oid} ({published.tag})" if published.repo_id else "",
    )

    metrics = {}
    tags = {"folder": published.folder, "repo_id": published.repo_id or "", "commit": published.commit_oid or ""}
    if published.repo_id:
        tags.update(hub_tags(published))
    if checked is not None:
        metrics = {
            "round_trip_prompts": checked.prompts,
            "round_trip_matching": checked.matching,
            "round_trip_passed": float(checked.passed),
        }
        tags["stillhouse.round_trip"] = "passed" if checked.passed else "failed"
    log_stage(
        tracking,
        "publish",
        fingerprint=publish_fingerprint,
        cached=output.cached,
        seconds=time.perf_counter() - started,
        params=section_params(config, "publish"),
        metrics=metrics,
        tags=tags,
    )
    if published.repo_id:  # the run links to the Hub revision (the card links back to the run)
        round_trip_tag = {"stillhouse.round_trip": tags["stillhouse.round_trip"]} if checked else {}
        link_to_hub_revision(tracking, registered, {**hub_tags(published), **round_trip_tag})
    if checked is not None and not checked.passed:
        raise StillhouseError(
            f"round trip: the published revision {published.repo_id}@{published.commit_oid} generated differently "
            f"from the local student on {checked.prompts - checked.matching} of {checked.prompts} prompts "
            f"({'; '.join(checked.mismatches)})"
        )
    return published
