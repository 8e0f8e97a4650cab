"""A NaN loss stops training at that step, names it, keeps the last good checkpoint, seals nothing.

The NaN is real: one response's stored teacher log-probs are NaN (what a broken teacher server or a
bad conversion can write), so the KD loss of the batch holding that row is NaN on the real trainer.
"""

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import curate_and_sample
from safetensors.torch import load_file

from stillhouse.config import TrainConfig
from stillhouse.errors import StillhouseError
from stillhouse.sampling.teacher_outputs import SCHEMA_V1, read_shard
from stillhouse.store import MANIFEST
from stillhouse.training.stage import train_student
from stillhouse.training.train import NonFiniteLossError

pytestmark = pytest.mark.slow

ARCHITECTURE = {"hidden_size": 16, "num_layers": 2, "intermediate_size": 32, "num_heads": 2}
POISONED_ROW = 40  # of the first shard; the trainer's seeded shuffle reaches it a few steps in


def rewrite_logprobs(shard: Path, change) -> pd.DataFrame:
    """Rewrite ``shard`` with each row's top-k log-probs replaced by ``change(row index, [positions, k] array)``.

    Format 2 refuses to store NaN or +inf (`logprob_codes`), so the shard is written back in format 1 (float16),
    which the reader still reads: exactly what an older Stillhouse, a broken teacher server or a bad conversion
    could have left in a store.
    """
    rows = read_shard(shard)
    rows["top_k_logprobs"] = [change(index, values.copy()) for index, values in enumerate(rows["top_k_logprobs"])]
    columns = {name: list(rows[name]) for name in ("prompt_id", "split", "sample_index", "response_text")}
    for name in ("response_token_ids", "top_k_ids", "top_k_logprobs", "tail_logprobs"):
        columns[name] = [None if value is None else value.tolist() for value in rows[name]]
    pq.write_table(pa.Table.from_pydict(columns, schema=SCHEMA_V1), shard)
    return rows


def poison_teacher_logprobs(samples_path: str, row: int) -> str:
    """Overwrite one row's top-k log-probs with NaN in its shard; returns the row's prompt id."""
    (shard,) = sorted(p for p in Path(samples_path).glob("shard-*.parquet"))[:1]
    rows = rewrite_logprobs(shard, lambda index, values: np.full_like(values, np.nan) if index == row else values)
    return rows["prompt_id"][row]


def test_a_nan_loss_stops_training_at_that_step_and_keeps_the_last_good_checkpoint(
    tmp_path, tiny_teacher, prompts_jsonl
):
    store, dataset, samples = curate_and_sample(tmp_path / "store", tiny_teacher, prompts_jsonl)
    poison_teacher_logprobs(samples.path, POISONED_ROW)
    config = TrainConfig.model_validate(
        {
            "architecture": ARCHITECTURE,
            "method": "kd",
            "max_steps": 40,
            "batch_size": 8,
            "learning_rate": 0.005,
            "logging_steps": 5,
            "save_steps": 1,
            "threads": 1,
            "device": "cpu",
        }
    )
    with pytest.raises(NonFiniteLossError) as raised:
        train_student(config, dataset, samples, store)
    message = str(raised.value)
    step = int(message.split(" at step ")[1].split(" ")[0])
    assert 1 < step <= 40, message  # a few good steps first, so there is a good checkpoint to keep
    assert f"the loss is nan at step {step} of 40" in message
    assert "Lower train.learning_rate" in message and "check the data" in message and "not marked complete" in message

    (folder,) = (store.root / "train").iterdir()
    assert not (folder / MANIFEST).exists() and not (folder / "model").exists()
    checkpoints = sorted(int(p.name.split("-")[1]) for p in (folder / "checkpoints").glob("checkpoint-*"))
    # Stopped before the optimizer applied the NaN gradients: nothing was written at or after the bad step.
    assert checkpoints and max(checkpoints) == step - 1, (checkpoints, step)
    assert f"The last good checkpoint is kept at {folder / 'checkpoints' / f'checkpoint-{step - 1}'}" in message
    weights = load_file(folder / "checkpoints" / f"checkpoint-{step - 1}" / "model.safetensors")
    assert all(torch.isfinite(weight).all() for weight in weights.values())
    state = json.loads((folder / "checkpoints" / f"checkpoint-{step - 1}" / "trainer_state.json").read_text())
    logged = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert all(math.isfinite(loss) for loss in logged)

    # A rerun resumes from that checkpoint and meets the same bad batch: it fails the same way, and
    # the stage still is not sealed (a NaN run never becomes a cached "success").
    with pytest.raises(NonFiniteLossError, match=f"at step {step} of 40"):
        train_student(config, dataset, samples, store)
    assert not (folder / MANIFEST).exists()


def test_a_non_finite_loss_at_the_first_step_stops_with_no_checkpoint_and_nothing_sealed(
    tmp_path, tiny_teacher, prompts_jsonl
):
    """+inf teacher log-probs in every row: the first step's loss is not finite (inf x 0 makes it NaN)."""
    store, dataset, samples = curate_and_sample(tmp_path / "store", tiny_teacher, prompts_jsonl)
    (shard,) = sorted(Path(samples.path).glob("shard-*.parquet"))[:1]

    def first_logprob_infinite(index, values):  # every row: the first step fails
        values[:, 0] = np.inf
        return values

    rewrite_logprobs(shard, first_logprob_infinite)
    config = TrainConfig.model_validate(
        {"architecture": ARCHITECTURE, "method": "kd", "max_steps": 5, "batch_size": 8, "threads": 1, "device": "cpu"}
    )
    with pytest.raises(
        NonFiniteLossError, match=r"the loss is (inf|nan) at step 1 of 5; .*No checkpoint was written yet"
    ):
        train_student(config, dataset, samples, store)
    assert not list((store.root / "train").glob(f"*/{MANIFEST}"))


def test_under_torchrun_the_stopping_rank_s_message_reaches_the_caller(tmp_path, tiny_teacher, prompts_jsonl):
    """Two processes: the rank that meets the NaN writes its message, torchrun stops the other, and
    the launching process raises that message instead of a bare exit code."""
    store, dataset, samples = curate_and_sample(tmp_path / "store", tiny_teacher, prompts_jsonl)
    poison_teacher_logprobs(samples.path, POISONED_ROW)
    config = TrainConfig.model_validate(
        {
            "architecture": ARCHITECTURE,
            "method": "kd",
            "max_steps": 40,
            "batch_size": 8,
            "learning_rate": 0.005,
            "logging_steps": 5,
            "threads": 1,
            "device": "cpu",
            "num_processes": 2,
        }
    )
    with pytest.raises(StillhouseError, match=r"train: the loss is nan at step \d+ of 40.*Lower train.learning_rate"):
        train_student(config, dataset, samples, store)
    assert not list((store.root / "train").glob(f"*/{MANIFEST}"))
