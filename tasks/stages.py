"""Prefect tasks: each runs one core stage, records it in MLflow and leaves a Prefect artifact.

The store is the cache (a rerun with the same fingerprint reuses the output), so Prefect's own
task caching is off. Retries sit only at I/O boundaries: the Hub push.
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from registry.model_registry import RegisteredModel, register_student
from registry.publish import PublishedModel, push_folder, write_publish_folder
from registry.tracking import TrackingContext, log_stage
from stillhouse.config import PipelineConfig
from stillhouse.data.curate import curate
from stillhouse.evaluation.evaluate import evaluate_student
from stillhouse.refs import DatasetRef, EvalReport, ModelRef, SamplesRef
from stillhouse.sampling.sample import sample_teacher
from stillhouse.store import Store, fingerprint
from stillhouse.training.train import train_student
from tasks.progress import progress_artifact


def _report(stage: str, ref, seconds: float) -> None:
    verb = "reused cached output" if ref.cached else "computed"
    get_run_logger().info("%s: %s %s in %.1fs (%s)", stage, verb, ref.fingerprint, seconds, ref.path)


@task(name="curate", cache_policy=NO_CACHE)
def curate_task(config: PipelineConfig, tracking: TrackingContext) -> DatasetRef:
    started = time.perf_counter()
    dataset = curate(config.curate, Store(config.store))
    seconds = time.perf_counter() - started
    _report("curate", dataset, seconds)
    log_stage(tracking, "curate", fingerprint=dataset.fingerprint, cached=dataset.cached, seconds=seconds,
              params=config.curate.model_dump(mode="json"), metrics=dataset.counts)
    create_markdown_artifact(
        "| | rows |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in dataset.counts.items()),
        key="curation-counts", description="Rows in and out of curation",
    )
    return dataset


@task(name="sample-teacher", cache_policy=NO_CACHE)
def sample_task(config: PipelineConfig, dataset: DatasetRef, tracking: TrackingContext) -> SamplesRef:
    started = time.perf_counter()
    samples = sample_teacher(config.sample, dataset, Store(config.store), progress=progress_artifact("Teacher sampling"))
    seconds = time.perf_counter() - started
    _report("sample", samples, seconds)
    log_stage(tracking, "sample", fingerprint=samples.fingerprint, cached=samples.cached, seconds=seconds,
              params=config.sample.model_dump(mode="json"), metrics={"rows": samples.rows, "generated_tokens": samples.generated_tokens},
              tags={"teacher_revision": samples.teacher_revision, "tokenizer_fingerprint": samples.tokenizer_fingerprint})
    return samples


@task(name="train-student", cache_policy=NO_CACHE)
def train_task(config: PipelineConfig, dataset: DatasetRef, samples: SamplesRef, tracking: TrackingContext) -> ModelRef:
    started = time.perf_counter()
    student = train_student(config.train, dataset, samples, Store(config.store), progress=progress_artifact("Student training"))
    seconds = time.perf_counter() - started
    _report("train", student, seconds)
    log_stage(tracking, "train", fingerprint=student.fingerprint, cached=student.cached, seconds=seconds,
              params=config.train.model_dump(mode="json"),
              metrics={"parameters": student.parameters, "train_seconds": student.train_seconds, **({"final_loss": student.final_loss} if student.final_loss is not None else {})},
              metric_history=[{"step": p["step"], "train_loss": p["loss"], "learning_rate": p["learning_rate"]} for p in student.loss_history])
    return student


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(config: PipelineConfig, dataset: DatasetRef, samples: SamplesRef, student: ModelRef, tracking: TrackingContext) -> EvalReport:
    started = time.perf_counter()
    report = evaluate_student(config.evaluate, dataset, samples, student, Store(config.store), progress=progress_artifact("Evaluation"))
    seconds = time.perf_counter() - started
    _report("evaluate", report, seconds)
    log_stage(tracking, "evaluate", fingerprint=report.fingerprint, cached=report.cached, seconds=seconds,
              params=config.evaluate.model_dump(mode="json"), metrics=report.metrics)
    rows = "\n".join(f"| {name} | {value:.4g} |" for name, value in sorted(report.metrics.items()))
    create_markdown_artifact(f"| metric | value |\n|---|---|\n{rows}", key="evaluation", description="Teacher vs student on held-out prompts")
    return report


@task(name="register", cache_policy=NO_CACHE)
def register_task(config: PipelineConfig, student: ModelRef, report: EvalReport, tracking: TrackingContext) -> RegisteredModel:
    started = time.perf_counter()
    run_id = log_stage(tracking, "register", fingerprint=student.fingerprint, cached=False, seconds=0.0, metrics=report.metrics)
    registered = register_student(config.registry, tracking, student, run_id, tags={"stillhouse.pipeline": config.name, "stillhouse.eval_fingerprint": report.fingerprint},
                                  license=config.publish.license)
    get_run_logger().info("register: %s version %s (alias @%s)%s in %.1fs", registered.name, registered.version, registered.alias,
                          ", reused" if registered.cached else "", time.perf_counter() - started)
    return registered


@task(name="push-to-hub", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=[2, 5, 15])
def push_task(folder: str, config: PipelineConfig) -> PublishedModel:
    return push_folder(Path(folder), config)


@task(name="publish", cache_policy=NO_CACHE)
def publish_task(
    config: PipelineConfig, dataset: DatasetRef, samples: SamplesRef, student: ModelRef, report: EvalReport,
    registered: RegisteredModel | None, tracking: TrackingContext,
) -> PublishedModel:
    started = time.perf_counter()
    store = Store(config.store)
    publish_fingerprint = fingerprint("publish", config.publish.model_dump(mode="json", exclude={"token_env"}),
                                      {"student": student.fingerprint, "evaluate": report.fingerprint}, 1)
    provenance = {
        "mlflow": {"tracking_uri": tracking.tracking_uri, "run_id": tracking.parent_run_id,
                   "registered_model": registered.model_dump(exclude={"cached"}) if registered else None},
        "teacher": {"id": config.sample.teacher, "revision": samples.teacher_revision},
        "store": config.store,
    }

    def compute(stage_folder: Path) -> dict:
        folder = write_publish_folder(stage_folder / config.name, config, dataset, samples, student, report, provenance)
        pushed = push_task(str(folder), config) if config.publish.repo_id else PublishedModel(folder=str(folder))
        return pushed.model_dump()

    # Sealed like any stage: an unchanged rerun neither rewrites the folder nor pushes a new commit.
    output = store.build("publish", publish_fingerprint, compute)
    published = PublishedModel.model_validate({**output.manifest, "cached": output.cached})
    get_run_logger().info("publish: %s %s", "reused" if output.cached else "wrote", published.folder)
    log_stage(tracking, "publish", fingerprint=publish_fingerprint, cached=output.cached, seconds=time.perf_counter() - started,
              params=config.publish.model_dump(mode="json"), tags={"folder": published.folder, "repo_id": published.repo_id or "", "commit": published.commit_oid or ""})
    return published
