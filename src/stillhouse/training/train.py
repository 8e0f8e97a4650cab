"""The training stage: a student learns from the teacher on `transformers.Trainer`.

- ``method: sft`` (black-box): cross-entropy on the teacher's response tokens; prompt tokens are masked.
- ``method: kd`` (white-box): ``kd_weight`` x a divergence (``train.kd.kind``) to the teacher's
  distribution + ``ce_weight`` x cross-entropy. The teacher's distribution is the top-k stored by the
  sample stage (``kd.teacher: offline``) or the teacher model in memory (``online``: dense, or its
  top-k). With ``kd.lmbda`` > 0 a batch is, with that probability, replaced by the student's own
  samples scored by the online teacher (on-policy GKD; no cross-entropy on those). White-box KD needs
  student and teacher to share a vocabulary (same token->id map).

Sequence-level KD (GKD's ``seq_kd``) is what the offline data already is: the teacher's own responses.
TRL's GKDTrainer is not used because it supports only its JSD on full teacher logits; stored top-k
teachers and the other divergences go through one trainer here.

The student is a pretrained model (``train.student``, optionally with LoRA adapters) or a Llama built
from scratch with the teacher's tokenizer (``train.architecture``). ``num_processes`` > 1 runs this
stage under ``torchrun`` (data parallel; gloo on CPU):

    python -m torch.distributed.run --nproc_per_node 2 -m stillhouse.training.worker STAGE_FOLDER/launch.json
"""

from __future__ import annotations

import json
import math
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from stillhouse import capabilities
from stillhouse.config import KDConfig, TrainConfig
from stillhouse.errors import InputError, StillhouseError
from stillhouse.models import count_parameters, load_causal_lm, load_tokenizer, resolve_model, vocabulary_difference
from stillhouse.refs import DatasetRef, ModelRef, SamplesRef
from stillhouse.store import Store, fingerprint
from stillhouse.training.examples import PadCollator, build_examples
from stillhouse.training.losses import TopK, cross_entropy, distillation_loss, distillation_loss_from_hidden

CODE_VERSION = 2
TRAINER_STATE = "trainer_state.json"  # the last file Trainer writes into a checkpoint


class NonFiniteLossError(StillhouseError):
    """The training loss became NaN or infinite; training stopped before the bad step updated any weight."""


def build_student(config: TrainConfig, teacher_path: str):
    """(model, tokenizer) for the configured student."""
    if config.student is not None:
        path = resolve_model(config.student, "train.student")
        return (
            load_causal_lm(path, device="cpu", trust_remote_code=config.trust_remote_code, field="train.student"),
            load_tokenizer(path, trust_remote_code=config.trust_remote_code),
        )
    tokenizer = load_tokenizer(teacher_path)
    shape = config.architecture
    torch.manual_seed(config.seed)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=shape.hidden_size,
            intermediate_size=shape.intermediate_size,
            num_hidden_layers=shape.num_layers,
            num_attention_heads=shape.num_heads,
            num_key_value_heads=shape.num_heads,
            max_position_embeddings=max(config.max_seq_len, 128),
            tie_word_embeddings=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
        )
    )
    return model, tokenizer


def check_vocabularies(config: TrainConfig, teacher_tokenizer) -> str | None:
    """None when the student shares the teacher's vocabulary (stored token ids and top-k apply as they are),
    else what differs.

    Reads tokenizers only. A student built from scratch takes the teacher's tokenizer. A served teacher whose
    tokenizer is unknown (``teacher_tokenizer`` None) shares nothing: its responses are re-tokenized as text.
    White-box ``kd`` between different vocabularies is refused.
    """
    if config.student is None:
        return None
    if teacher_tokenizer is None:
        difference = "the served teacher's tokenizer is unknown (sample.openai.tokenizer is null)"
    else:
        student_tokenizer = load_tokenizer(
            resolve_model(config.student, "train.student"), trust_remote_code=config.trust_remote_code
        )
        difference = vocabulary_difference(student_tokenizer, teacher_tokenizer)
    if config.method == "kd" and difference is not None:
        raise InputError(
            "train.method: `kd` compares token distributions, but the student's vocabulary differs from the teacher's "
            f"({difference}); use method `sft` (black-box) or a student of the teacher's family"
        )
    return difference


class DistillationTrainer(Trainer):
    """`Trainer` whose loss is ``ce_weight * CE + kd_weight * divergence`` on shifted positions."""

    def __init__(
        self,
        *args,
        ce_weight: float,
        kd_weight: float,
        kd: KDConfig,
        vocab_size: int,
        teacher: torch.nn.Module | None = None,
        pad_token_id: int = 0,
        eos_token_id: int | None = None,
        loss_chunk_size: int | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.loss_chunk_size = loss_chunk_size
        self.ce_weight, self.kd_weight, self.kd = ce_weight, kd_weight, kd
        self.vocab_size, self.teacher = vocab_size, teacher
        self.pad_token_id, self.eos_token_id = pad_token_id, eos_token_id
        self.on_policy_draws = random.Random(self.args.seed)  # the same draws on every process
        # Our loss is a mean per micro-batch, not a sum over `num_items_in_batch`: let Trainer divide
        # it by the accumulation steps (it skips that for models that accept loss kwargs).
        self.model_accepts_loss_kwargs = False

    def training_step(self, model, inputs, num_items_in_batch=None):
        """One micro-batch's forward and backward; a NaN or infinite loss stops training here.

        The check runs before the optimizer step, so the bad gradients never reach the weights and no
        checkpoint written afterwards can hold them: the newest checkpoint on disk is the last good one.
        (Trainer's own `logging_nan_inf_filter` would instead hide the NaN in the logged average.)
        """
        loss = super().training_step(model, inputs, num_items_in_batch)
        value = float(loss.detach())
        if not math.isfinite(value):
            step = self.state.global_step + 1
            logged = [entry["loss"] for entry in self.state.log_history if "loss" in entry]
            last_good = last_complete_checkpoint(Path(self.args.output_dir))
            raise NonFiniteLossError(
                f"train: the loss is {value} at step {step} of {self.state.max_steps}"
                + (f" (last logged loss {logged[-1]:.4g})" if logged else "")
                + "; training stopped and the stage is not marked complete. "
                + (
                    f"The last good checkpoint is kept at {last_good}. "
                    if last_good
                    else "No checkpoint was written yet (set train.save_steps to keep some). "
                )
                + "Lower train.learning_rate (or raise warmup_ratio), check the data for empty or broken rows "
                "(NaN/inf teacher log-probs, all-masked responses), or turn off bf16."
            )
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        stored = TopK(inputs.pop("top_k_ids"), inputs.pop("top_k_logprobs")) if "top_k_ids" in inputs else None
        prompt_ids, prompt_mask = inputs.pop("prompt_input_ids", None), inputs.pop("prompt_attention_mask", None)
        ce_weight = self.ce_weight
        if self.kd.lmbda > 0 and model.training and self.on_policy_draws.random() < self.kd.lmbda:
            inputs, labels = self.student_rollout(model, prompt_ids, prompt_mask)
            stored, ce_weight = None, 0.0  # the student's own samples are scored, not imitated
        targets = labels[:, 1:]  # the output at t predicts the token at t+1
        divergence = {
            "kind": self.kd.kind,
            "beta": self.kd.beta,
            "alpha": self.kd.alpha,
            "temperature": self.kd.temperature,
            "tail": self.kd.tail,
        }
        if self.loss_chunk_size:
            # Memory-bounded: losses from the final hidden state, [B*T, V] logits never exist at once.
            outputs, hidden = self.final_hidden_state(model, inputs)
            weight = self.accelerator.unwrap_model(model).get_output_embeddings().weight[: self.vocab_size]

            def loss_of(teacher, **options):
                return distillation_loss_from_hidden(
                    hidden[:, :-1], weight, teacher, targets, chunk_size=self.loss_chunk_size, **options
                )

            # Cross-entropy is forward KL to a one-hot teacher: its only outcome is the label (log-prob 0).
            one_hot = TopK(targets.clamp(min=0).unsqueeze(-1), torch.zeros(targets.shape + (1,), device=targets.device))
            loss = ce_weight * loss_of(one_hot, kind="forward_kl") if ce_weight > 0 else hidden.new_zeros(())
            if self.kd_weight > 0:
                loss = loss + self.kd_weight * loss_of(self.teacher_distribution(inputs, stored), **divergence)
        else:
            outputs = model(**inputs)
            logits = outputs.logits[:, :-1, : self.vocab_size]  # rows past the shared vocabulary are padding
            loss = ce_weight * cross_entropy(logits, targets) if ce_weight > 0 else logits.new_zeros(())
            if self.kd_weight > 0:
                loss = loss + self.kd_weight * distillation_loss(
                    logits, self.teacher_distribution(inputs, stored), targets, **divergence
                )
        return (loss, outputs) if return_outputs else loss

    def final_hidden_state(self, model, inputs: dict) -> tuple:
        """(outputs, the decoder's last hidden state [B, T, H]), computing logits for one position only.

        The forward still goes through ``model`` (the DDP wrapper, when there is one) so gradient
        synchronisation works; a hook on the decoder catches its output.
        """
        decoder = self.accelerator.unwrap_model(model).get_decoder()
        captured = {}

        def keep_hidden(module, args, output) -> None:  # returning None leaves the output untouched
            captured["hidden"] = output.last_hidden_state

        handle = decoder.register_forward_hook(keep_hidden)
        try:
            outputs = model(**inputs, logits_to_keep=1)
        finally:
            handle.remove()
        return outputs, captured["hidden"]

    def teacher_distribution(self, inputs: dict, stored: TopK | None) -> torch.Tensor | TopK:
        """The teacher at each shifted position: stored top-k, or the online teacher's logits / top-k."""
        if self.teacher is None:
            return TopK(stored.ids[:, 1:], stored.logprobs[:, 1:])
        with torch.no_grad():
            logits = self.teacher(**inputs).logits[:, :-1, : self.vocab_size].float()
        if self.kd.online_top_k is None:
            return logits
        values, ids = logits.log_softmax(-1).topk(self.kd.online_top_k, dim=-1)
        return TopK(ids, values)

    def student_rollout(self, model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> tuple[dict, torch.Tensor]:
        """Sample responses from the student; labels cover the generated tokens up to the first EOS."""
        student = self.accelerator.unwrap_model(model)
        student.eval()
        with torch.no_grad():
            sequences = student.generate(
                input_ids=prompt_ids,
                attention_mask=prompt_mask,
                max_new_tokens=self.kd.rollout_max_new_tokens,
                do_sample=True,
                temperature=self.kd.rollout_temperature,
                top_k=0,
                top_p=1.0,
                pad_token_id=self.pad_token_id,
                eos_token_id=self.eos_token_id,
            )
        student.train()
        generated = sequences[:, prompt_ids.shape[1] :]
        is_eos = generated.eq(self.eos_token_id)
        after_eos = (is_eos.cumsum(-1) - is_eos.long()) > 0  # strictly after the first EOS
        attention_mask = torch.cat([prompt_mask, (~after_eos).long()], dim=1)
        labels = torch.cat([torch.full_like(prompt_ids, -100), generated.masked_fill(after_eos, -100)], dim=1)
        # Prompts are left-padded here, so positions come from the mask (as generate computed them).
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        return {"input_ids": sequences, "attention_mask": attention_mask, "position_ids": position_ids}, labels


class ProgressCallback(TrainerCallback):
    def __init__(self, progress: Callable[[float], None]):
        self.progress = progress

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % max(1, state.max_steps // 50) == 0:
            self.progress(state.global_step / state.max_steps)


def last_complete_checkpoint(checkpoints: Path) -> str | None:
    """The newest ``checkpoint-N`` folder that Trainer finished writing, or None.

    A kill -9 can land while a checkpoint is being written: Trainer writes ``trainer_state.json``
    last, so a checkpoint without a readable one is half written and skipped (transformers'
    ``get_last_checkpoint`` would pick it and the resume would fail).
    """
    if not checkpoints.is_dir():
        return None
    candidates = []
    for path in checkpoints.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        suffix = path.name.removeprefix(f"{PREFIX_CHECKPOINT_DIR}-")
        if not (path.is_dir() and suffix.isdigit()):
            continue
        try:
            json.loads((path / TRAINER_STATE).read_text())
        except (OSError, ValueError):
            continue
        candidates.append((int(suffix), path))
    return str(max(candidates)[1]) if candidates else None


def with_lora(model, config: TrainConfig):
    from peft import LoraConfig, get_peft_model

    settings = config.lora
    adapters = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, adapters)


def check_teacher_capabilities(config: TrainConfig, samples: SamplesRef) -> None:
    """Refuse a training that needs what the sampled teacher can't give: weights here, a known tokenizer, stored top-k.

    Config validation refuses such a config before anything runs (`stillhouse.capabilities`), so meeting one
    here is an internal error: a hand-built config or reference, or a bug.
    """
    tokenizer_known = samples.teacher_tokenizer is not None
    capabilities.assert_no_problem(
        capabilities.online_teacher_problem(
            teacher_is_served=samples.teacher_is_served, method=config.method, kd_teacher=config.kd.teacher
        ),
        capabilities.kd_vocabulary_problem(teacher_tokenizer_known=tokenizer_known, method=config.method),
        capabilities.student_from_scratch_problem(
            teacher_tokenizer_known=tokenizer_known, student_from_scratch=config.student is None
        ),
        capabilities.offline_kd_top_k_problem(
            method=config.method, kd_teacher=config.kd.teacher, top_k_stored=samples.top_k_logprobs > 0
        ),
    )


def run_training(
    config: TrainConfig,
    dataset: DatasetRef,
    samples: SamplesRef,
    folder: Path,
    progress: Callable[[float], None] | None = None,
) -> dict:
    """Train in this process (one rank of several under torchrun); returns the manifest's content."""
    if config.threads:
        torch.set_num_threads(config.threads)
    check_teacher_capabilities(config, samples)
    teacher_tokenizer = load_tokenizer(samples.teacher_tokenizer) if samples.teacher_tokenizer else None
    online = config.method == "kd" and config.kd.teacher == "online"
    difference = check_vocabularies(config, teacher_tokenizer)  # tokenizers only, before any weights load
    model, tokenizer = build_student(config, samples.teacher_tokenizer)
    if config.lora is not None:
        model = with_lora(model, config)
    examples = build_examples(
        dataset,
        samples,
        tokenizer,
        split="train",
        shared_vocabulary=difference is None,
        with_top_k=config.method == "kd" and not online,
        max_seq_len=config.max_seq_len,
    )
    cpu = config.device == "cpu" or not torch.cuda.is_available()
    micro_batch = config.batch_size // (config.num_processes * config.gradient_accumulation_steps)
    checkpoints = folder / "checkpoints"
    arguments = TrainingArguments(
        output_dir=str(checkpoints),
        max_steps=config.max_steps,
        per_device_train_batch_size=micro_batch,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        gradient_checkpointing=config.gradient_checkpointing,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_ratio,
        weight_decay=config.weight_decay,
        logging_steps=config.logging_steps,
        report_to="none",
        save_strategy="steps" if config.save_steps else "no",
        save_steps=config.save_steps or 500,
        # Two kept: if a kill lands while the newest is written, the one before it is complete.
        save_total_limit=2,
        logging_nan_inf_filter=False,
        seed=config.seed,
        data_seed=config.seed,
        remove_unused_columns=False,
        use_cpu=config.device == "cpu",
        bf16=config.bf16,
        dataloader_pin_memory=not cpu,
        dataloader_drop_last=len(examples) >= config.batch_size,
        ddp_backend="gloo" if cpu and config.num_processes > 1 else None,
    )
    teacher = (
        load_causal_lm(samples.teacher, device="cpu", field="sample.teacher").to(arguments.device).requires_grad_(False)
        if online
        else None
    )
    weights = (
        {"ce_weight": 1.0, "kd_weight": 0.0}
        if config.method == "sft"
        else {"ce_weight": config.ce_weight, "kd_weight": config.kd_weight}
    )
    trainer = DistillationTrainer(
        model=model,
        args=arguments,
        train_dataset=examples,
        data_collator=PadCollator(tokenizer.pad_token_id, with_prompts=config.method == "kd" and config.kd.lmbda > 0),
        callbacks=[ProgressCallback(progress)] if progress else None,
        kd=config.kd,
        vocab_size=len(teacher_tokenizer)
        if difference is None
        else len(tokenizer),  # the student's own, when it learns from text
        teacher=teacher,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        loss_chunk_size=config.loss_chunk_size,
        **weights,
    )
    resume = last_complete_checkpoint(checkpoints)  # a crashed run's progress, when it saved any
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - started
    history = [
        {"step": e["step"], "loss": e["loss"], "learning_rate": e["learning_rate"]}
        for e in trainer.state.log_history
        if "loss" in e
    ]
    result = {
        "parameters": 0,
        "train_seconds": round(seconds, 2),
        "final_loss": history[-1]["loss"] if history else None,
        "loss_history": history,
        "examples": len(examples),
        "resumed_from": resume,
        "optimizer_steps": trainer.state.global_step,
    }
    if trainer.is_world_process_zero():
        student = trainer.accelerator.unwrap_model(model)
        if config.lora is not None:
            student = student.merge_and_unload()
        student.generation_config = GenerationConfig(
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, max_new_tokens=64, do_sample=False
        )
        student.save_pretrained(folder / "model")
        tokenizer.save_pretrained(folder / "model")
        result["parameters"] = count_parameters(student)
        # Checkpoints exist to resume an incomplete stage; once the student is saved they are dead weight.
        shutil.rmtree(checkpoints, ignore_errors=True)
    return result


def launch_training(config: TrainConfig, dataset: DatasetRef, samples: SamplesRef, folder: Path) -> dict:
    """Run `run_training` in ``config.num_processes`` processes with torchrun; returns rank 0's result."""
    import socket

    spec = folder / "launch.json"
    spec.write_text(
        json.dumps(
            {
                "config": config.model_dump(mode="json"),
                "dataset": dataset.model_dump(),
                "samples": samples.model_dump(),
                "folder": str(folder),
            }
        )
    )
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={config.num_processes}",
        "--master_addr=127.0.0.1",
        f"--master_port={port}",
        "-m",
        "stillhouse.training.worker",
        str(spec),
    ]
    (folder / "error.txt").unlink(missing_ok=True)
    completed = subprocess.run(command)
    if completed.returncode != 0:
        if (folder / "error.txt").is_file():
            raise StillhouseError((folder / "error.txt").read_text())
        raise RuntimeError(
            f"train: {config.num_processes}-process training failed (exit {completed.returncode}); "
            "rerun to resume from its last checkpoint"
        )
    return json.loads((folder / "result.json").read_text())


def train_student(
    config: TrainConfig,
    dataset: DatasetRef,
    samples: SamplesRef,
    store: Store,
    progress: Callable[[float], None] | None = None,
) -> ModelRef:
    if config.student is not None:
        resolve_model(config.student, "train.student")
    stage_fingerprint = fingerprint(
        "train",
        config.model_dump(mode="json", exclude={"threads", "device", "trust_remote_code"}),
        {"dataset": dataset.fingerprint, "samples": samples.fingerprint},
        CODE_VERSION,
    )

    def compute(folder: Path) -> dict:
        if config.num_processes > 1:
            result = launch_training(config, dataset, samples, folder)
        else:
            result = run_training(config, dataset, samples, folder, progress)
        return {"model_path": str(folder / "model"), **result}

    output = store.build("train", stage_fingerprint, compute)
    return ModelRef.from_manifest("train", stage_fingerprint, output.path, output.cached, output.manifest)
