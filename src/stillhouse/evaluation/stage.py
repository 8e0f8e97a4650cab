"""The evaluate stage's entry: its fingerprint, its checks and the store, without importing torch.

`evaluate_student` returns the report the store already holds for this student, config and data, and only when it
has to measure imports `stillhouse.evaluation.evaluate` (torch, transformers), so a fully cached rerun of a
pipeline never pays for them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd

from stillhouse import capabilities
from stillhouse.config import EvaluateConfig
from stillhouse.errors import InputError
from stillhouse.refs import DatasetRef, EvalReport, ModelRef, SamplesRef
from stillhouse.store import Store, fingerprint

CODE_VERSION = 3  # 3: KL and top-1 agreement across tokenizers


def check_eval_set(config: EvaluateConfig, dataset: DatasetRef) -> None:
    """Refuse an empty eval split, or explicitly chosen reference metrics on data without references.

    Whether the data has references is known for sure only after curation (a reference column can be empty),
    so these are errors the user fixes, not internal ones.
    """
    if dataset.eval_rows == 0:
        raise InputError("evaluate: the eval split has no rows; add data or raise curate.eval_fraction")
    listed = config.metrics or []
    for problem in (
        capabilities.reference_metrics_problem(listed_metric_groups=listed, has_references=dataset.has_references),
        capabilities.verifier_win_rate_problem(
            listed_metric_groups=listed, win_rate_judge=config.win_rate_judge, has_references=dataset.has_references
        ),
    ):
        if problem:
            raise InputError(problem)


def evaluate_student(
    config: EvaluateConfig,
    dataset: DatasetRef,
    samples: SamplesRef,
    student: ModelRef,
    store: Store,
    progress: Callable[[float], None] | None = None,
    baseline: ModelRef | None = None,
) -> EvalReport:
    """Measure teacher, student and baseline on the eval split; the result is cached in the store by fingerprint.

    ``baseline`` (e.g. the SFT student a feedback stage started from) is evaluated as role ``baseline``
    and takes precedence over ``config.baseline``.
    """
    check_eval_set(config, dataset)
    # Config validation refuses a served teacher as the win-rate judge; met here, it is an internal error.
    capabilities.assert_no_problem(
        capabilities.win_rate_judge_problem(
            teacher_is_served=samples.teacher_is_served,
            listed_metric_groups=config.metrics or [],
            win_rate_judge=config.win_rate_judge,
            judge_model=config.judge_model,
        )
    )
    settings = config.model_dump(
        mode="json", exclude={"gate"}
    )  # the gate decides promotion; it doesn't change measurements
    inputs = {"dataset": dataset.fingerprint, "samples": samples.fingerprint, "student": student.fingerprint}
    if baseline is not None:
        inputs["baseline"] = baseline.fingerprint
    stage_fingerprint = fingerprint("evaluate", settings, inputs, CODE_VERSION)

    def compute(folder: Path) -> dict:
        from stillhouse.evaluation.evaluate import measure  # torch and transformers: only when it measures

        return measure(folder, config, dataset, samples, student, progress, baseline)

    output = store.build("evaluate", stage_fingerprint, compute)
    return EvalReport(
        stage="evaluate",
        fingerprint=stage_fingerprint,
        path=str(output.path),
        cached=output.cached,
        metrics=output.manifest["metrics"],
    )


def read_generations(report: EvalReport) -> pd.DataFrame:
    return pd.read_parquet(Path(report.path) / "generations.parquet")


def report_files(report: EvalReport) -> list[Path]:
    """The report's files (Markdown, HTML, PNG) in the stage folder; empty when evaluate.report was off."""
    folder = Path(report.path) / "report"
    return sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
