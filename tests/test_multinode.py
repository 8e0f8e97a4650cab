"""``train.nodes`` > 1: two "nodes" on loopback, each its own stage run and torchrun agent, meet at one c10d endpoint.

Every node runs the same stage with the same config against one store folder (as nodes sharing a mount
would); torchrun's c10d rendezvous on 127.0.0.1 joins their processes into one run, global rank 0 writes the
student, and both stage runs end with the one sealed output. 2 nodes x 1 process must train exactly like
1 node x 2 processes: the same ranks see the same batches.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import curate_and_sample
from servers import free_port
from transformers import AutoModelForCausalLM

from stillhouse.config import TrainConfig
from stillhouse.store import MANIFEST
from stillhouse.training.stage import train_student

pytestmark = pytest.mark.slow

NODE = """
import json, sys, torch
torch.set_num_threads(1)
from stillhouse.config import TrainConfig
from stillhouse.refs import DatasetRef, SamplesRef
from stillhouse.store import Store
from stillhouse.training.stage import train_student
config = TrainConfig.model_validate_json(open(sys.argv[1]).read())
dataset = DatasetRef.model_validate_json(open(sys.argv[2]).read())
samples = SamplesRef.model_validate_json(open(sys.argv[3]).read())
student = train_student(config, dataset, samples, Store(sys.argv[4]))
print("STUDENT", student.model_dump_json())
"""


@pytest.fixture(scope="module")
def sampled(tmp_path_factory, tiny_teacher, prompts_jsonl):
    return curate_and_sample(tmp_path_factory.mktemp("store"), tiny_teacher, prompts_jsonl)


def config(**changes) -> TrainConfig:
    settings = {
        "architecture": {"hidden_size": 16, "num_layers": 2, "intermediate_size": 32, "num_heads": 2},
        "method": "kd",
        "strategy": "fsdp",
        "max_steps": 4,
        "batch_size": 16,
        "learning_rate": 0.01,
        "logging_steps": 1,
        "warmup_ratio": 0.0,
        "loss_chunk_size": 7,
        "threads": 1,
        "device": "cpu",
    }
    return TrainConfig.model_validate({**settings, **changes})


def test_two_nodes_of_one_process_train_like_one_node_of_two(sampled, tmp_path):
    store, dataset, samples = sampled
    two_nodes = config(nodes=2, num_processes=1, rendezvous=f"127.0.0.1:{free_port()}", rendezvous_id="loopback")
    for name, model in {"config": two_nodes, "dataset": dataset, "samples": samples}.items():
        (tmp_path / f"{name}.json").write_text(model.model_dump_json())
    arguments = [*(str(tmp_path / f"{n}.json") for n in ("config", "dataset", "samples")), str(store.root)]
    nodes = [  # started together, as on two machines; the first to bind the endpoint hosts the c10d store
        subprocess.Popen(
            [sys.executable, "-c", NODE, *arguments],
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        outputs = [node.communicate(timeout=600) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    for node, (_, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-3000:]
    students = [json.loads(out.split("STUDENT ", 1)[1]) for out, _ in outputs]
    assert students[0]["path"] == students[1]["path"]  # one output, sealed by whichever node got there first
    assert sorted(student["cached"] for student in students) == [False, True]
    folder = Path(students[0]["path"])
    manifest = json.loads((folder / MANIFEST).read_text())
    assert [rank["rank"] for rank in manifest["processes"]] == [0, 1]

    one_node = train_student(config(num_processes=2), dataset, samples, store)
    two, one = ([p["loss"] for p in history] for history in (students[0]["loss_history"], one_node.loss_history))
    print("2 nodes x 1 process", two, "1 node x 2 processes", one)
    assert len(two) == len(one) == 4
    for a, b in zip(one, two):
        assert abs(a - b) <= 1e-4 * a
    first, second = (
        AutoModelForCausalLM.from_pretrained(path).state_dict() for path in (folder / "model", one_node.model_path)
    )
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=0, atol=1e-6, msg=name)
