"""kill -9 during training: the rerun resumes from the last checkpoint and ends at the same step count.

A child process trains with checkpoints every few steps and is killed with SIGKILL once some are on
disk; the rerun (same config, same fingerprint) must pick up the newest complete checkpoint, keep
counting from its step, and stop at ``max_steps`` optimizer steps, like a run that was never killed.
"""

import json

import pytest
import torch
from conftest import curate_and_sample
from kill9 import run_then_kill
from transformers import AutoModelForCausalLM

from stillhouse.config import TrainConfig
from stillhouse.store import MANIFEST, Store
from stillhouse.training.stage import train_student
from stillhouse.training.train import last_complete_checkpoint

pytestmark = pytest.mark.slow

ARCHITECTURE = {"hidden_size": 16, "num_layers": 2, "intermediate_size": 32, "num_heads": 2}

CHILD = """
import sys, torch
torch.set_num_threads(1)
from stillhouse.config import TrainConfig
from stillhouse.refs import DatasetRef, SamplesRef
from stillhouse.store import Store
from stillhouse.training.stage import train_student
config = TrainConfig.model_validate_json(open(sys.argv[1]).read())
dataset = DatasetRef.model_validate_json(open(sys.argv[2]).read())
samples = SamplesRef.model_validate_json(open(sys.argv[3]).read())
train_student(config, dataset, samples, Store(sys.argv[4]))
"""


@pytest.fixture(scope="module")
def sampled(tmp_path_factory, tiny_teacher, prompts_jsonl):
    return curate_and_sample(tmp_path_factory.mktemp("store"), tiny_teacher, prompts_jsonl)


def test_a_killed_training_resumes_from_its_checkpoint_and_ends_at_max_steps(sampled, tmp_path):
    store, dataset, samples = sampled
    config = TrainConfig.model_validate(
        {
            "architecture": ARCHITECTURE,
            "method": "kd",
            "max_steps": 300,
            "batch_size": 8,
            "learning_rate": 0.005,
            "warmup_ratio": 0.0,
            "logging_steps": 10,
            "save_steps": 20,
            "threads": 1,
            "device": "cpu",
        }
    )
    for name, model in {"config": config, "dataset": dataset, "samples": samples}.items():
        (tmp_path / f"{name}.json").write_text(model.model_dump_json())
    # Killed once two checkpoints exist: the run is well under way, and far from its 300 steps.
    run_then_kill(
        CHILD,
        [*(str(tmp_path / f"{n}.json") for n in ("config", "dataset", "samples")), str(store.root)],
        ready=lambda: len(list(store.root.glob("train/*/checkpoints/checkpoint-*/trainer_state.json"))) >= 2,
        what="training",
    )
    (folder,) = {path.parent for path in (store.root / "train").glob("*/checkpoints")}
    assert not (folder / MANIFEST).exists(), "training finished before the kill; the test needs a longer run"
    newest = last_complete_checkpoint(folder / "checkpoints")
    killed_at = json.loads((folder / "checkpoints" / newest.rsplit("/", 1)[1] / "trainer_state.json").read_text())[
        "global_step"
    ]
    assert 20 <= killed_at < 300
    # What a kill in the middle of writing the next checkpoint leaves: a folder without trainer_state.json.
    half_written = folder / "checkpoints" / f"checkpoint-{killed_at + 20}"
    half_written.mkdir(exist_ok=True)
    (half_written / "model.safetensors").write_bytes(b"half a file")
    (half_written / "trainer_state.json").unlink(missing_ok=True)

    resumed = train_student(config, dataset, samples, store)
    manifest = json.loads((folder / MANIFEST).read_text())
    assert not resumed.cached and resumed.fingerprint == folder.name
    assert manifest["resumed_from"].endswith(f"checkpoint-{killed_at}")  # the complete one, not the half-written one
    assert manifest["optimizer_steps"] == 300
    # The step counter continued: the loss history holds the killed run's points and the rerun's, once each.
    steps = [point["step"] for point in resumed.loss_history]
    assert steps == list(range(10, 301, 10))
    assert not (folder / "checkpoints").exists()  # dropped once the student is saved

    uninterrupted = train_student(config, dataset, samples, Store(tmp_path / "uninterrupted"))
    reference = json.loads((tmp_path / "uninterrupted" / "train" / uninterrupted.fingerprint / MANIFEST).read_text())
    assert reference["optimizer_steps"] == manifest["optimizer_steps"] == 300 and reference["resumed_from"] is None
    assert [p["step"] for p in uninterrupted.loss_history] == steps
    # Trainer restores the optimizer, scheduler, RNG states and the data loader's position, so with one
    # thread on one machine the resumed run is the uninterrupted run, bit for bit.
    assert resumed.loss_history == uninterrupted.loss_history
    weights = [AutoModelForCausalLM.from_pretrained(ref.model_path).state_dict() for ref in (resumed, uninterrupted)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
