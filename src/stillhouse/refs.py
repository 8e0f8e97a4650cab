"""The small references that stages pass to each other: paths, fingerprints and counts, never data."""

from __future__ import annotations

from pydantic import BaseModel, Field


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


class ModelRef(StageRef):
    model_path: str
    parameters: int
    train_seconds: float
    final_loss: float | None
    loss_history: list[dict[str, float]] = Field(default_factory=list)


class EvalReport(StageRef):
    metrics: dict[str, float]


class PairsRef(StageRef):
    pairs: int
    counts: dict[str, int]
    judge_consistency: float | None = Field(None, description="Pairwise judges: share of comparisons whose two orders agreed.")
