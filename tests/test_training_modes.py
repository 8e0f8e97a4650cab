"""Training modes: vocabulary check, online and on-policy KD, LoRA, resume from checkpoints, 2 processes."""

import json
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_model, curate_and_sample
from transformers import AutoModelForCausalLM, Gemma3Config, LlamaConfig, MixtralConfig, Qwen2MoeConfig

from stillhouse.config import EvaluateConfig, TrainConfig
from stillhouse.errors import InputError
from stillhouse.evaluation.stage import evaluate_student
from stillhouse.models import load_tokenizer, vocabulary_difference
from stillhouse.training.stage import train_student
from stillhouse.training.train import may_leave_parameters_unused

ARCHITECTURE = {"hidden_size": 16, "num_layers": 2, "intermediate_size": 32, "num_heads": 2}


@pytest.fixture(scope="module")
def sharp_teacher(tmp_path_factory):
    """A random teacher with peaked next-token distributions (a random init's are nearly uniform)."""
    folder = build_tiny_model(tmp_path_factory.mktemp("sharp-teacher"), hidden_size=48, seed=2)
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)  # tied: logits scale by about 8 after the final norm
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sampled(tmp_path_factory, sharp_teacher, prompts_jsonl):
    return curate_and_sample(tmp_path_factory.mktemp("store"), sharp_teacher, prompts_jsonl)


def kd_config(**changes) -> TrainConfig:
    settings = {
        "architecture": ARCHITECTURE,
        "method": "kd",
        "max_steps": 30,
        "batch_size": 16,
        "learning_rate": 0.01,
        "logging_steps": 5,
        "warmup_ratio": 0.0,
        "ce_weight": 0.0,
    }
    settings.update(changes)
    return TrainConfig.model_validate(settings)


def test_vocabulary_check_accepts_padded_embeddings_and_refuses_a_real_mismatch(sampled, tmp_path, sharp_teacher):
    store, dataset, samples = sampled
    padded = build_tiny_model(tmp_path / "padded", hidden_size=16)
    model = AutoModelForCausalLM.from_pretrained(padded)
    model.resize_token_embeddings(len(load_tokenizer(str(padded))) + 13)  # rows that are padding, as in Qwen2.5
    model.save_pretrained(padded)
    student = train_student(
        TrainConfig(student=str(padded), method="kd", max_steps=2, batch_size=8), dataset, samples, store
    )
    assert AutoModelForCausalLM.from_pretrained(student.model_path).config.vocab_size == model.config.vocab_size

    other = build_tiny_model(tmp_path / "other", hidden_size=16)
    tokenizer = load_tokenizer(str(other))
    tokenizer.add_tokens(["<tool>"])
    tokenizer.save_pretrained(other)
    assert "1 student-only tokens" in vocabulary_difference(tokenizer, load_tokenizer(str(sharp_teacher)))
    with pytest.raises(InputError, match=r"vocabulary differs from the teacher's .*use method `sft`"):
        train_student(TrainConfig(student=str(other), method="kd", max_steps=1, batch_size=8), dataset, samples, store)


@pytest.mark.parametrize(
    "kd",
    [
        {"teacher": "online"},
        {"teacher": "online", "online_top_k": 8, "kind": "jsd"},
        {"kind": "reverse_kl", "tail": "renormalize"},
    ],
)
def test_kd_lowers_the_held_out_teacher_student_kl(sampled, kd):
    store, dataset, samples = sampled
    evaluation = EvaluateConfig(max_new_tokens=4, max_prompts=10)
    barely = evaluate_student(
        evaluation, dataset, samples, train_student(kd_config(kd=kd, max_steps=1), dataset, samples, store), store
    )
    trained = evaluate_student(
        evaluation, dataset, samples, train_student(kd_config(kd=kd), dataset, samples, store), store
    )
    assert trained.metrics["kl_teacher_student"] < 0.8 * barely.metrics["kl_teacher_student"]


def test_on_policy_training_scores_the_students_own_samples(sampled):
    store, dataset, samples = sampled
    config = kd_config(
        kd={"teacher": "online", "lmbda": 1.0, "kind": "reverse_kl", "rollout_max_new_tokens": 6},
        max_steps=6,
        logging_steps=2,
    )
    student = train_student(config, dataset, samples, store)
    losses = [point["loss"] for point in student.loss_history]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))


def test_on_policy_training_takes_off_policy_targets_from_the_stored_top_k(sampled, monkeypatch):
    """With the online teacher compared by its top-4 (= the stored k), only on-policy steps run the teacher."""
    from stillhouse.training.train import DistillationTrainer

    store, dataset, samples = sampled
    forwards, rollouts = [], []
    scored = DistillationTrainer.teacher_distribution
    rollout = DistillationTrainer.student_rollout

    def counting_teacher(self, inputs, stored, first=0):
        forwards.append(stored is None)
        return scored(self, inputs, stored, first)

    def counting_rollout(self, *args):
        rollouts.append(1)
        return rollout(self, *args)

    monkeypatch.setattr(DistillationTrainer, "teacher_distribution", counting_teacher)
    monkeypatch.setattr(DistillationTrainer, "student_rollout", counting_rollout)
    config = kd_config(
        kd={"teacher": "online", "lmbda": 0.5, "online_top_k": 4, "kind": "jsd", "rollout_max_new_tokens": 6},
        max_steps=10,
        logging_steps=5,
    )
    student = train_student(config, dataset, samples, store)
    assert all(torch.isfinite(torch.tensor([point["loss"] for point in student.loss_history])))
    assert 0 < len(rollouts) < 10 and len(forwards) == 10
    assert sum(forwards) == len(rollouts)  # the teacher ran on the rollouts alone


def test_rollout_labels_cover_generated_tokens_up_to_the_first_eos(tiny_teacher):
    from transformers import TrainingArguments

    from stillhouse.config import KDConfig
    from stillhouse.training.train import DistillationTrainer

    tokenizer = load_tokenizer(str(tiny_teacher))
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher)
    trainer = DistillationTrainer(
        model=model,
        args=TrainingArguments(output_dir="/tmp/unused", use_cpu=True, report_to="none"),
        ce_weight=0.0,
        kd_weight=1.0,
        kd=KDConfig(teacher="online", lmbda=1.0, rollout_max_new_tokens=5),
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    prompt_ids = torch.tensor([[tokenizer.pad_token_id, 7, 8], [5, 6, 7]])
    prompt_mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    inputs, labels = trainer.student_rollout(model, prompt_ids, prompt_mask)
    assert inputs["input_ids"].shape == labels.shape and (labels[:, :3] == -100).all()
    for row in range(2):
        generated = inputs["input_ids"][row, 3:].tolist()
        counted = labels[row, 3:].ne(-100).tolist()
        end = generated.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in generated else len(generated)
        assert counted == [True] * end + [False] * (len(generated) - end)
    assert inputs["position_ids"][0, 1] == 0 and inputs["position_ids"][1, 0] == 0


def test_lora_student_is_merged_into_plain_weights(sampled, tmp_path):
    store, dataset, samples = sampled
    base = build_tiny_model(tmp_path / "base", hidden_size=16)
    config = TrainConfig(
        student=str(base), method="sft", max_steps=10, batch_size=8, learning_rate=0.05, lora={"r": 4, "alpha": 8}
    )
    student = train_student(config, dataset, samples, store)
    trained, original = (
        AutoModelForCausalLM.from_pretrained(student.model_path),
        AutoModelForCausalLM.from_pretrained(base),
    )
    assert set(trained.state_dict()) == set(original.state_dict())  # no adapter weights left
    changed = [
        name for name, weight in trained.state_dict().items() if not torch.equal(weight, original.state_dict()[name])
    ]
    assert any("q_proj" in name for name in changed)


def test_a_crashed_run_resumes_from_its_last_checkpoint(sampled):
    store, dataset, samples = sampled
    config = kd_config(max_steps=10, save_steps=4, logging_steps=1)

    def crash_at_step_7(fraction):
        if fraction >= 0.7:
            raise KeyboardInterrupt("simulated crash")

    with pytest.raises(KeyboardInterrupt):
        train_student(config, dataset, samples, store, progress=crash_at_step_7)
    student = train_student(config, dataset, samples, store)
    manifest = json.loads((store.path("train", student.fingerprint) / "manifest.json").read_text())
    assert manifest["resumed_from"].endswith("checkpoint-4")
    assert [point["step"] for point in student.loss_history][-1] == 10


@pytest.mark.slow
def test_two_processes_follow_the_single_process_loss_curve(sampled, capfd):
    store, dataset, samples = sampled
    single = train_student(kd_config(max_steps=20, batch_size=16, threads=1), dataset, samples, store)
    # The 2-process run also takes the chunked loss path, which must give the same curve.
    reported: list[float] = []
    double = train_student(
        kd_config(max_steps=20, batch_size=16, threads=1, num_processes=2, loss_chunk_size=64),
        dataset,
        samples,
        store,
        progress=reported.append,
    )
    # The workers' progress reaches the launching process (the terminal, the Prefect UI) as in-process training's.
    assert reported and reported == sorted(reported) and reported[-1] == 1.0, reported
    assert (Path(double.path) / "result.json").is_file()  # written by rank 0 of the torchrun launch
    # `device: auto` on a CPU-only machine: the ranks average their gradients, so their replicas stay equal (they
    # trained one replica each, on half the data, when accelerate set the workers up as undistributed).
    ranks = json.loads((Path(double.path) / "result.json").read_text())["processes"]
    assert double.parameters == single.parameters and len(ranks) == 2
    assert ranks[0]["parameter_checksum"] == ranks[1]["parameter_checksum"], ranks
    # A dense student: DDP does not search each step's graph for unused parameters (each rank warned that it did).
    assert "find_unused_parameters=True" not in capfd.readouterr().err
    one, two = ([p["loss"] for p in run.loss_history] for run in (single, double))
    assert len(one) == len(two) == 4
    # Same global batch and schedule; the data order differs (DistributedSampler), so compare the curve loosely.
    print("single-process loss", one, "two processes", two)
    for a, b in zip(one, two):
        assert abs(a - b) <= 0.05 * a
    assert two[-1] < two[0]


def test_warmup_stable_decay_holds_the_peak_rate_then_decays_over_the_last_steps(sampled):
    store, dataset, samples = sampled
    config = kd_config(
        max_steps=20, logging_steps=1, lr_scheduler="warmup_stable_decay", warmup_ratio=0.1, decay_ratio=0.25
    )
    rates = [point["learning_rate"] for point in train_student(config, dataset, samples, store).loss_history]
    assert len(rates) == 20, rates  # each step's rate
    assert rates[:3] == [0.0, 0.005, 0.01], rates  # 2 warmup steps (10% of 20)
    assert set(rates[2:16]) == {0.01}, rates  # the peak, until the last 5 steps (25% of 20) decay it to 0
    assert all(later < earlier for earlier, later in zip(rates[15:], rates[16:])) and rates[-1] < 0.001, rates


def test_gradient_accumulation_and_checkpointing_train_the_same_global_batch(sampled):
    store, dataset, samples = sampled
    plain = train_student(kd_config(max_steps=8, logging_steps=4), dataset, samples, store)
    accumulated = train_student(
        kd_config(max_steps=8, logging_steps=4, gradient_accumulation_steps=2, gradient_checkpointing=True),
        dataset,
        samples,
        store,
    )
    assert [p["step"] for p in accumulated.loss_history] == [4, 8]
    for a, b in zip(plain.loss_history, accumulated.loss_history):
        assert abs(a["loss"] - b["loss"]) <= 0.05 * a["loss"]


@pytest.mark.gpu
def test_bf16_kd_training_on_gpu(sampled):
    store, dataset, samples = sampled
    student = train_student(kd_config(max_steps=4, bf16=True, device="auto"), dataset, samples, store)
    assert torch.isfinite(torch.tensor(student.final_loss))


@pytest.mark.parametrize("method, kd", [("sft", {}), ("kd", {}), ("kd", {"teacher": "online", "kind": "jsd"})])
def test_chunked_losses_train_like_the_logits_path(sampled, method, kd):
    store, dataset, samples = sampled
    settings = {"method": method, "kd": kd, "ce_weight": 0.5, "max_steps": 6, "logging_steps": 3}
    plain = train_student(kd_config(**settings), dataset, samples, store)
    chunked = train_student(kd_config(**settings, loss_chunk_size=7), dataset, samples, store)
    for a, b in zip(plain.loss_history, chunked.loss_history, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3)


def test_ddp_searches_for_unused_parameters_only_where_a_forward_can_leave_some_out():
    assert not may_leave_parameters_unused(LlamaConfig())
    assert may_leave_parameters_unused(MixtralConfig())  # an expert no token was routed to
    assert may_leave_parameters_unused(Qwen2MoeConfig())
    assert may_leave_parameters_unused(Gemma3Config())  # a vision tower that text batches never run
