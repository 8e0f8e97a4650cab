"""The small references that stages pass to each other: paths, fingerprints and counts, never data."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, model_validator


class Stage(StrEnum):
    """The pipeline's stages, in the order they run, as a run can be stopped after them (`--until`).

    `train` includes a feedback chain's links (the judge and feedback stages, which have their own
    store entries), so it always ends with the final student; `register` includes the promotion gate.
    """

    curate = "curate"
    sample = "sample"
    train = "train"
    evaluate = "evaluate"
    register = "register"
    publish = "publish"

    def reached_by(self, until: Stage) -> bool:
        """Whether a run that stops after ``until`` runs this stage."""
        order = list(Stage)
        return order.index(self) <= order.index(until)


class StageRef(BaseModel):
    stage: str
    fingerprint: str
    path: str = Field(description="Folder of the stage's output in the store.")
    cached: bool = Field(description="True when a completed output with this fingerprint was reused.")


class DatasetRef(StageRef):
    train_rows: int
    eval_rows: int
    has_references: bool
    counts: dict[str, int] = Field(description="Rows in, and rows dropped by each filter.")


class SamplesRef(StageRef):
    rows: int
    teacher: str
    teacher_revision: str
    tokenizer_fingerprint: str
    top_k_logprobs: int
    generated_tokens: int
    teacher_tokenizer: str | None = Field(
        None,
        description="Where the teacher's tokenizer loads from (a local folder or Hub id): the teacher itself for "
        "engines hf and vllm, sample.openai.tokenizer for a served teacher; "
        "null when a served teacher's tokenizer is unknown.",
    )
    teacher_is_served: bool = Field(
        False,
        description="The teacher answered through an HTTP endpoint (engine `openai`): `teacher` is the served model's "
        "name, and its weights can't be loaded here.",
    )

    @model_validator(mode="before")
    @classmethod
    def _local_teacher_is_its_own_tokenizer(cls, data: Any) -> Any:
        # References and manifests written before these fields existed came from a local teacher folder or Hub id.
        if isinstance(data, dict) and "teacher_tokenizer" not in data and not data.get("teacher_is_served"):
            data = {**data, "teacher_tokenizer": data.get("teacher")}
        return data


class ModelRef(StageRef):
    model_path: str
    parameters: int
    train_seconds: float
    final_loss: float | None
    loss_history: list[dict[str, float]] = Field(default_factory=list)

    @classmethod
    def from_manifest(
        cls, stage: str, fingerprint: str, path: str | Path, cached: bool, manifest: dict[str, Any]
    ) -> ModelRef:
        """The student a training stage's output at ``path`` holds in ``model/``, with the figures of its manifest."""
        return cls(
            stage=stage,
            fingerprint=fingerprint,
            path=str(path),
            cached=cached,
            model_path=str(Path(path) / "model"),
            parameters=manifest["parameters"],
            train_seconds=manifest["train_seconds"],
            final_loss=manifest["final_loss"],
            loss_history=manifest["loss_history"],
        )


class EvalReport(StageRef):
    metrics: dict[str, float]


class PairsRef(StageRef):
    pairs: int
    counts: dict[str, int]
    judge_consistency: float | None = Field(
        None, description="Pairwise judges: share of comparisons whose two orders agreed."
    )
