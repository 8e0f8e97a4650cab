"""``train.strategy: fsdp``: the student sharded over 2 CPU processes (torchrun, gloo, FSDP2 through accelerate).

Sharded runs must train like one process with the same global batch (the ranks split each global batch, in
the same order), hold half of the parameters each, resume a killed run from its sharded checkpoint to the
same weights, and save one plain student that transformers loads. Every test that starts torchrun takes from
10 s to a few minutes on a 2-core machine and is marked slow; the checks before any weight loads are not.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_model, curate_and_sample
from faults.kill9 import run_then_kill
from transformers import AutoModelForCausalLM

from stillhouse import hardware
from stillhouse.config import TrainConfig
from stillhouse.errors import InputError
from stillhouse.models import load_tokenizer
from stillhouse.store import MANIFEST, Store
from stillhouse.training import train as training
from stillhouse.training.checks import check_training_hardware, cpu_cores
from stillhouse.training.stage import train_student
from stillhouse.training.train import fsdp_settings, last_complete_checkpoint

ARCHITECTURE = {"hidden_size": 16, "num_layers": 2, "intermediate_size": 32, "num_heads": 2}


@pytest.fixture(scope="module")
def sampled(tmp_path_factory, tiny_teacher, prompts_jsonl):
    return curate_and_sample(tmp_path_factory.mktemp("store"), tiny_teacher, prompts_jsonl)


def config(**changes) -> TrainConfig:
    settings = {
        "architecture": ARCHITECTURE,
        "method": "kd",
        "max_steps": 4,
        "batch_size": 16,
        "learning_rate": 0.01,
        "logging_steps": 1,
        "warmup_ratio": 0.0,
        "threads": 1,
        "device": "cpu",
    }
    settings.update(changes)
    return TrainConfig.model_validate(settings)


def sharded(**changes) -> TrainConfig:
    return config(**{"strategy": "fsdp", "num_processes": 2, **changes})


def weights(model_path: str) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(model_path).state_dict()


def assert_one_plain_student(student, manifest: dict) -> None:
    """``model/`` holds one set of safetensors that plain transformers loads and that generates."""
    folder = Path(student.model_path)
    assert [p.name for p in folder.glob("*.safetensors")] == ["model.safetensors"]
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert sum(p.numel() for p in model.parameters()) == student.parameters == manifest["parameters"]
    tokenizer = load_tokenizer(str(folder))
    prompt = tokenizer("<|user|>reverse: abc<|assistant|>", return_tensors="pt", add_special_tokens=False)
    assert model.generate(**prompt, max_new_tokens=3, do_sample=False).shape[1] == prompt["input_ids"].shape[1] + 3
    assert not (Path(student.path) / "checkpoints").exists()


# --- before any weight loads ---------------------------------------------------------------------


def test_fsdp_wraps_each_decoder_layer_and_maps_the_train_fsdp_settings(tiny_teacher):
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher)
    settings = sharded(
        gradient_checkpointing=True, fsdp={"reshard_after_forward": False, "cpu_offload": True}, device="auto"
    )
    arguments = fsdp_settings(settings, model)
    assert arguments["fsdp"] is True
    assert arguments["fsdp_config"] == {
        "version": 2,
        "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
        "reshard_after_forward": False,
        "cpu_offload": torch.cuda.is_available(),  # a CPU run already keeps everything in CPU memory
        "state_dict_type": "SHARDED_STATE_DICT",
        "activation_checkpointing": True,
    }
    lora = training.with_lora(model, sharded(architecture=None, student=str(tiny_teacher), lora={"r": 2}))
    assert fsdp_settings(sharded(), lora)["fsdp_config"]["transformer_layer_cls_to_wrap"] == ["LlamaDecoderLayer"]


def test_more_processes_than_the_machine_has_are_refused_before_the_store_is_touched(sampled, tmp_path, monkeypatch):
    _, dataset, samples = sampled
    cores = cpu_cores()
    store = Store(tmp_path / "store")
    with pytest.raises(InputError, match=rf"num_processes is {cores + 1} per node, but this machine has {cores} CPU"):
        train_student(sharded(num_processes=cores + 1, batch_size=16 * (cores + 1)), dataset, samples, store)
    assert not store.root.exists()

    monkeypatch.setattr(hardware, "may_have_gpus", lambda: True)  # GPU device files, as on a GPU machine
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(InputError, match=r"num_processes is 4 per node, but this machine has 2 CUDA GPUs.*train.nodes"):
        check_training_hardware(sharded(num_processes=4, device="auto"))
    check_training_hardware(sharded(num_processes=2, device="auto"))
    # device: cpu on a GPU machine counts cores.
    with pytest.raises(InputError, match="CPU cores"):
        check_training_hardware(sharded(num_processes=cores + 1, batch_size=16 * (cores + 1)))


def test_kd_with_a_student_of_another_vocabulary_is_refused_before_any_weight_loads(sampled, tmp_path, monkeypatch):
    _, dataset, samples = sampled
    other = build_tiny_model(tmp_path / "other", hidden_size=16)
    tokenizer = load_tokenizer(str(other))
    tokenizer.add_tokens(["<tool>"])
    tokenizer.save_pretrained(other)

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(training, "load_causal_lm", no_weights)
    monkeypatch.setattr(training, "build_student", no_weights)
    store = Store(tmp_path / "store")
    with pytest.raises(InputError, match=r"vocabulary differs from the teacher's .*use method `sft`"):
        train_student(sharded(architecture=None, student=str(other)), dataset, samples, store)
    assert not store.root.exists()


def test_several_nodes_need_a_store_every_node_mounts(sampled):
    _, dataset, samples = sampled
    with pytest.raises(InputError, match="every node mounts"):
        train_student(
            sharded(nodes=2, num_processes=1, rendezvous="127.0.0.1:29400"),
            dataset,
            samples,
            Store("memory://stillhouse-test-store"),
        )


def test_a_served_teacher_without_a_server_is_refused_before_the_store_is_touched(sampled, tmp_path):
    _, dataset, samples = sampled
    store = Store(tmp_path / "store")
    served = sharded(kd={"teacher": "served", "online_top_k": 4, "served_model": "tiny-teacher"})
    with pytest.raises(InputError, match=r"kd.teacher: served needs the teacher's server: set train.kd.served"):
        train_student(served, dataset, samples, store)
    assert not store.root.exists()


def test_the_rendezvous_is_not_part_of_the_fingerprint(sampled, tmp_path):
    """torchrun wants a new rendezvous id per run: a rerun with a new one must find the first run's checkpoints."""
    _, dataset, samples = sampled
    first = train_student(config(max_steps=1), dataset, samples, Store(tmp_path))
    again = train_student(
        config(max_steps=1, rendezvous="10.0.0.1:29400", rendezvous_id="second-try"), dataset, samples, Store(tmp_path)
    )
    assert again.cached and again.fingerprint == first.fingerprint


# --- sharded training ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_and_two(sampled):
    """The same 4 steps (fused loss) in one plain process and sharded over 2 processes."""
    store, dataset, samples = sampled
    single = train_student(config(loss_chunk_size=7), dataset, samples, store)
    double = train_student(sharded(loss_chunk_size=7), dataset, samples, store)
    return single, double, json.loads((Path(double.path) / MANIFEST).read_text())


@pytest.mark.slow
def test_two_sharded_processes_follow_the_single_process_loss_curve(one_and_two):
    single, double, _ = one_and_two
    one, two = ([p["loss"] for p in run.loss_history] for run in (single, double))
    print("one process", one, "fsdp, two processes", two)
    assert len(one) == len(two) == 4 and two[-1] < two[0]
    for a, b in zip(one, two):
        assert abs(a - b) <= 0.01 * a
    # The ranks split each global batch in its single-process order, so the weights agree to rounding: the
    # output embedding's gradient from the fused loss (taken outside FSDP's forward) reached every shard.
    plain, gathered = weights(single.model_path), weights(double.model_path)
    assert plain.keys() == gathered.keys()
    for name in plain:
        torch.testing.assert_close(gathered[name], plain[name], rtol=0, atol=1e-5, msg=name)


@pytest.mark.slow
def test_each_rank_holds_about_half_of_the_parameters(one_and_two):
    _, double, manifest = one_and_two
    ranks = manifest["processes"]
    assert [rank["rank"] for rank in ranks] == [0, 1]
    assert sum(rank["local_parameters"] for rank in ranks) == double.parameters
    for rank in ranks:
        assert abs(rank["local_parameters"] - double.parameters / 2) <= 0.02 * double.parameters
    print("parameters", double.parameters, "per rank", ranks)


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode",
    [
        {"method": "sft"},
        {"method": "kd", "loss_chunk_size": 5, "gradient_checkpointing": True},
        {"method": "sft", "lora": {"r": 4, "alpha": 8}},
        {
            "method": "kd",
            "ce_weight": 0.0,
            "kd": {"teacher": "online", "lmbda": 1.0, "kind": "reverse_kl", "rollout_max_new_tokens": 6},
            "loss_chunk_size": 8,
        },
    ],
    ids=["sft", "kd-fused", "lora", "gkd"],
)
def test_each_mode_trains_sharded_and_saves_one_loadable_student(sampled, tmp_path, mode):
    store, dataset, samples = sampled
    if "lora" in mode:  # LoRA needs a pretrained student; an untied one shards its output layer on its own
        base = build_tiny_model(tmp_path / "base", hidden_size=16, seed=3)
        AutoModelForCausalLM.from_pretrained(base, tie_word_embeddings=False).save_pretrained(base)
        mode = {**mode, "architecture": None, "student": str(base)}
    student = train_student(sharded(max_steps=2, logging_steps=1, **mode), dataset, samples, store)
    manifest = json.loads((Path(student.path) / MANIFEST).read_text())
    assert manifest["optimizer_steps"] == 2 and math.isfinite(student.final_loss)
    assert_one_plain_student(student, manifest)
    if "lora" in mode:
        trained, original = weights(student.model_path), weights(mode["student"])
        assert trained.keys() == original.keys()  # merged: no adapter weights left
        assert any(not torch.equal(trained[name], original[name]) for name in trained if "q_proj" in name)


@pytest.mark.slow
def test_on_policy_kd_from_a_served_teacher_in_every_rank_equals_the_in_memory_teacher(sampled, tiny_teacher):
    """GKD with ``kd.teacher: served`` under fsdp: each rank asks the server (tests/openai_server.py, the teacher in
    its process answering vLLM's ``prompt_logprobs``) for its own rows; the endpoint is the sample stage's
    ``sample.openai`` passed to the stage (``kd.served`` is null). Same losses as the teacher in memory."""
    from openai_server import FakeOpenAIServer

    from stillhouse.config import OpenAIEngineConfig

    store, dataset, samples = sampled
    gkd = {"kind": "jsd", "lmbda": 0.5, "rollout_max_new_tokens": 6, "online_top_k": 20}
    online = train_student(sharded(max_steps=4, kd={**gkd, "teacher": "online"}), dataset, samples, store)
    with FakeOpenAIServer(tiny_teacher, served_name="tiny-teacher") as server:
        endpoint = OpenAIEngineConfig(base_url=server.url, api_key_env=None, backoff_seconds=0.0)
        served = train_student(
            sharded(max_steps=4, kd={**gkd, "teacher": "served", "served_model": "tiny-teacher"}),
            dataset,
            samples,
            store,
            teacher_endpoint=endpoint,
        )
        assert server.requests, "the served teacher was never asked"
    assert [p["step"] for p in served.loss_history] == [p["step"] for p in online.loss_history] == [1, 2, 3, 4]
    for got, want in zip(served.loss_history, online.loss_history):
        assert got["loss"] == pytest.approx(want["loss"], abs=1e-4), (got, want)


def stage_processes(spec: Path) -> list[int]:
    """Processes whose command line names the stage's launch spec: the torchrun workers of that stage."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if str(spec) in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


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


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds the workers through /proc")
def test_a_killed_sharded_run_resumes_from_its_sharded_checkpoint_to_the_same_weights(sampled, tmp_path):
    _, dataset, samples = sampled
    settings = sharded(
        max_steps=120, batch_size=8, learning_rate=0.005, logging_steps=10, save_steps=10, loss_chunk_size=16
    )
    for name, model in {"config": settings, "dataset": dataset, "samples": samples}.items():
        (tmp_path / f"{name}.json").write_text(model.model_dump_json())
    store = Store(tmp_path / "store")
    run_then_kill(
        CHILD,
        [*(str(tmp_path / f"{n}.json") for n in ("config", "dataset", "samples")), str(store.root)],
        ready=lambda: len(list(store.root.glob("train/*/checkpoints/checkpoint-*/trainer_state.json"))) >= 2,
        what="sharded training",
    )
    (folder,) = {path.parent for path in (store.root / "train").glob("*/checkpoints")}
    assert not (folder / MANIFEST).exists(), "training finished before the kill; the test needs a longer run"
    # The launcher was killed, not torchrun: its workers notice and stop, so no rerun races them.
    deadline = time.monotonic() + 30
    while stage_processes(folder / "launch.json") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not stage_processes(folder / "launch.json"), "the workers outlived the killed launcher"

    newest = Path(last_complete_checkpoint(folder / "checkpoints"))
    assert {"pytorch_model_fsdp_0", "optimizer_0", "rng_state_0.pth", "rng_state_1.pth"} <= {
        p.name for p in newest.iterdir()
    }
    assert {p.name for p in (newest / "pytorch_model_fsdp_0").iterdir()} >= {
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
    }
    killed_at = json.loads((newest / "trainer_state.json").read_text())["global_step"]
    assert 10 <= killed_at < 120
    # What a kill while the next checkpoint is written leaves: shards, no trainer_state.json.
    half_written = folder / "checkpoints" / f"checkpoint-{killed_at + 10}" / "pytorch_model_fsdp_0"
    half_written.mkdir(parents=True, exist_ok=True)
    (half_written / "__0_0.distcp").write_bytes(b"half a shard")

    resumed = train_student(settings, dataset, samples, store)
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["resumed_from"].endswith(f"checkpoint-{killed_at}")
    assert manifest["optimizer_steps"] == 120
    assert [p["step"] for p in resumed.loss_history] == list(range(10, 121, 10))

    uninterrupted = train_student(settings, dataset, samples, Store(tmp_path / "uninterrupted"))
    assert resumed.loss_history == uninterrupted.loss_history
    # Model, optimizer (sharded), scheduler, each rank's RNG and the data position are restored: bit for bit.
    first, second = weights(resumed.model_path), weights(uninterrupted.model_path)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)


GATHER = textwrap.dedent(
    """
    import sys, torch, torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from stillhouse.training.train import gathered_weight

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    head = torch.nn.Linear(3, 7, bias=False)  # 7 rows: shards of 4 and 3
    full = head.weight.detach().clone().requires_grad_()
    inputs = torch.randn(world, 5, 3)
    fully_shard(head)
    weight = gathered_weight(head.weight)  # a DTensor shard, outside the module's forward
    assert type(weight) is torch.Tensor and weight.shape == (7, 3)
    (inputs[rank] @ weight.T).pow(2).sum().backward()
    # FSDP's own reduction: the gradient of the mean of the ranks' losses.
    (sum((inputs[r] @ full.T).pow(2).sum() for r in range(world)) / world).backward()
    torch.testing.assert_close(head.weight.grad.full_tensor(), full.grad)
    assert head.weight.grad.to_local().shape[0] == (4, 3)[rank]
    sys.stdout.write(f"rank {rank} ok\\n")  # one write: print writes each argument apart, and two ranks interleave
    sys.stdout.flush()
    dist.destroy_process_group()
    """
)


@pytest.mark.slow
def test_a_sharded_weight_gathered_outside_the_forward_gets_the_averaged_sharded_gradient(tmp_path):
    script = tmp_path / "gather.py"
    script.write_text(GATHER)
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
         f"--master-port={training.free_port()}", str(script)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert completed.stdout.count(" ok") == 2


# --- a real shape --------------------------------------------------------------------------------

QWEN25_05B_VOCABULARY = 151_936


def word_level_tokenizer(size: int):
    """The demo tokenizer's specials and characters, then filler words up to ``size`` entries: a vocabulary of
    Qwen2.5's size, built offline with `tokenizers` (each character one word)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from stillhouse.demo.tokenizer import CHARACTERS, CHAT_TEMPLATE, EOS, PAD, SPECIAL_TOKENS, UNK

    words = SPECIAL_TOKENS + list(CHARACTERS)
    words += [f"<w{index}>" for index in range(size - len(words))]
    backend = Tokenizer(models.WordLevel(vocab={word: index for index, word in enumerate(words)}, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    backend.add_special_tokens(SPECIAL_TOKENS)
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, eos_token=EOS, unk_token=UNK, padding_side="left"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def qwen2(folder: Path, tokenizer, **shape) -> Path:
    """A random-init Qwen2 of ``shape`` with ``tokenizer``, saved to ``folder``."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=len(tokenizer),
            tie_word_embeddings=True,
            max_position_embeddings=512,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=None,
            **shape,
        )
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_two_optimizer_steps_of_a_qwen2_5_0_5b_shaped_student_sharded_with_the_fused_loss(tmp_path, prompts_jsonl):
    """KD on the stored top-4 of a tiny teacher with Qwen2.5's vocabulary size; the student has Qwen2.5-0.5B's
    shape (494 M parameters, 2 GB of fp32 weights). Prints the time and the peak memory of each rank."""
    tokenizer = word_level_tokenizer(QWEN25_05B_VOCABULARY)
    assert len(tokenizer) == QWEN25_05B_VOCABULARY
    teacher = qwen2(
        tmp_path / "teacher",
        tokenizer,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    store, dataset, samples = curate_and_sample(tmp_path / "store", teacher, prompts_jsonl)
    student_folder = qwen2(
        tmp_path / "student",
        tokenizer,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
    )
    settings = sharded(
        architecture=None,
        student=str(student_folder),
        max_steps=2,
        batch_size=4,
        learning_rate=1e-4,
        max_seq_len=64,
        loss_chunk_size=128,
    )
    started = time.perf_counter()
    student = train_student(settings, dataset, samples, store)
    seconds = time.perf_counter() - started
    manifest = json.loads((Path(student.path) / MANIFEST).read_text())
    print(
        f"Qwen2.5-0.5B shape, fsdp over 2 CPU processes: {student.parameters:,} parameters, stage {seconds:.0f} s, "
        f"training {student.train_seconds} s for 2 steps, per rank {manifest['processes']}"
    )
    assert student.parameters == 494_032_768  # Qwen2.5-0.5B's count, embeddings tied
    assert manifest["optimizer_steps"] == 2 and all(math.isfinite(p["loss"]) for p in student.loss_history)
    for rank in manifest["processes"]:
        assert abs(rank["local_parameters"] - student.parameters / 2) <= 0.01 * student.parameters
    saved = AutoModelForCausalLM.from_pretrained(student.model_path)
    assert saved.config.model_type == "qwen2" and saved.config.tie_word_embeddings
    assert sum(p.numel() for p in saved.parameters()) == student.parameters
