"""The training stage: a student learns from the teacher's outputs on `transformers.Trainer`.

- ``method: sft`` (black-box): cross-entropy on the teacher's response tokens; prompt tokens are masked.
- ``method: kd`` (white-box): ``kd_weight`` x forward KL to the stored teacher top-k (tail bucket)
  + ``ce_weight`` x cross-entropy. Needs a student that shares the teacher's tokenizer.

The student is a pretrained model (``train.student``) or a Llama built from scratch with the
teacher's tokenizer (``train.architecture``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from stillhouse.config import TrainConfig
from stillhouse.data.curate import read_split
from stillhouse.errors import InputError
from stillhouse.models import count_parameters, load_causal_lm, load_tokenizer, resolve_model, tokenizer_fingerprint
from stillhouse.refs import DatasetRef, ModelRef, SamplesRef
from stillhouse.sampling.hf_engine import render_prompts
from stillhouse.sampling.teacher_outputs import read_teacher_outputs
from stillhouse.store import Store, fingerprint
from stillhouse.training.losses import TopK, cross_entropy, forward_kl

CODE_VERSION = 1


def build_student(config: TrainConfig, teacher_path: str):
    """(model, tokenizer) for the configured student."""
    if config.student is not None:
        path = resolve_model(config.student, "train.student")
        return load_causal_lm(path, device="cpu"), load_tokenizer(path)
    tokenizer = load_tokenizer(teacher_path)
    shape = config.architecture
    torch.manual_seed(config.seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_heads, num_key_value_heads=shape.num_heads,
        max_position_embeddings=max(config.max_seq_len, 128), tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    ))
    return model, tokenizer


def build_examples(
    dataset: DatasetRef, samples: SamplesRef, tokenizer, *, split: str, same_tokenizer: bool, with_top_k: bool, max_seq_len: int,
    prompt_ids: set[str] | None = None,
) -> list[dict]:
    """Token ids, labels (prompt masked) and, ``with_top_k``, top-k targets aligned with the labels.

    ``prompt_ids`` keeps only those prompts' responses (all of the split when None).
    """
    prompts = read_split(dataset, split).set_index("prompt_id")
    outputs = read_teacher_outputs(samples.path, split=split)
    if prompt_ids is not None:
        outputs = outputs[outputs["prompt_id"].isin(prompt_ids)]
    rendered = render_prompts(tokenizer, [json.loads(prompts.at[pid, "messages"]) for pid in outputs["prompt_id"]])
    examples = []
    for prompt, row in zip(rendered, outputs.itertuples(index=False)):
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if same_tokenizer:
            response_ids = list(row.response_token_ids)
        else:
            response_ids = tokenizer(row.response_text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        input_ids = (prompt_ids + response_ids)[: max_seq_len]
        example = {"input_ids": input_ids, "labels": ([-100] * len(prompt_ids) + response_ids)[: max_seq_len]}
        if with_top_k:
            k = samples.top_k_logprobs
            # Teacher top-k for response token j sits at label position len(prompt) + j.
            example["top_k_ids"] = ([[0] * k] * len(prompt_ids) + [list(ids) for ids in row.top_k_ids])[: max_seq_len]
            example["top_k_logprobs"] = ([[0.0] * k] * len(prompt_ids) + [list(lp) for lp in row.top_k_logprobs])[: max_seq_len]
        examples.append(example)
    return examples


class PadCollator:
    """Right-pads a batch; labels with -100, top-k targets with zeros (masked by the labels)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(example["input_ids"]) for example in batch)
        collated = {
            "input_ids": torch.full((len(batch), width), self.pad_token_id),
            "attention_mask": torch.zeros((len(batch), width), dtype=torch.long),
            "labels": torch.full((len(batch), width), -100),
        }
        if "top_k_ids" in batch[0]:
            k = len(batch[0]["top_k_ids"][0])
            collated["top_k_ids"] = torch.zeros((len(batch), width, k), dtype=torch.long)
            collated["top_k_logprobs"] = torch.zeros((len(batch), width, k))
        for row, example in enumerate(batch):
            length = len(example["input_ids"])
            collated["input_ids"][row, :length] = torch.tensor(example["input_ids"])
            collated["attention_mask"][row, :length] = 1
            collated["labels"][row, :length] = torch.tensor(example["labels"])
            if "top_k_ids" in example:
                collated["top_k_ids"][row, :length] = torch.tensor(example["top_k_ids"])
                collated["top_k_logprobs"][row, :length] = torch.tensor(example["top_k_logprobs"])
        return collated


class DistillationTrainer(Trainer):
    """`Trainer` whose loss is ``ce_weight * CE + kd_weight * forward KL`` on shifted positions."""

    def __init__(self, *args, ce_weight: float, kd_weight: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.ce_weight, self.kd_weight = ce_weight, kd_weight

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        top_k_ids, top_k_logprobs = inputs.pop("top_k_ids", None), inputs.pop("top_k_logprobs", None)
        outputs = model(**inputs)
        logits, targets = outputs.logits[:, :-1], labels[:, 1:]  # logits at t predict the token at t+1
        loss = self.ce_weight * cross_entropy(logits, targets)
        if top_k_ids is not None and self.kd_weight > 0:
            loss = loss + self.kd_weight * forward_kl(logits, TopK(top_k_ids[:, 1:], top_k_logprobs[:, 1:]), targets)
        return (loss, outputs) if return_outputs else loss


class ProgressCallback(TrainerCallback):
    def __init__(self, progress: Callable[[float], None]):
        self.progress = progress

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % max(1, state.max_steps // 50) == 0:
            self.progress(state.global_step / state.max_steps)


def train_student(config: TrainConfig, dataset: DatasetRef, samples: SamplesRef, store: Store, progress: Callable[[float], None] | None = None) -> ModelRef:
    if config.student is not None:
        resolve_model(config.student, "train.student")
    stage_fingerprint = fingerprint("train", config.model_dump(mode="json", exclude={"threads", "device"}), {"dataset": dataset.fingerprint, "samples": samples.fingerprint}, CODE_VERSION)

    def compute(folder: Path) -> dict:
        if config.threads:
            torch.set_num_threads(config.threads)
        model, tokenizer = build_student(config, samples.teacher)
        same_tokenizer = tokenizer_fingerprint(tokenizer) == samples.tokenizer_fingerprint
        if config.method == "kd" and not same_tokenizer:
            raise InputError("train.method: `kd` needs a student with the teacher's tokenizer (the stored top-k are teacher token ids); use method `sft` or a student of the same family")
        examples = build_examples(
            dataset, samples, tokenizer, split="train", same_tokenizer=same_tokenizer,
            with_top_k=config.method == "kd", max_seq_len=config.max_seq_len,
        )
        arguments = TrainingArguments(
            output_dir=str(folder / "trainer"), max_steps=config.max_steps, per_device_train_batch_size=config.batch_size,
            learning_rate=config.learning_rate, lr_scheduler_type=config.lr_scheduler, warmup_steps=config.warmup_ratio,
            weight_decay=config.weight_decay, logging_steps=config.logging_steps, save_strategy="no", report_to="none",
            seed=config.seed, data_seed=config.seed, remove_unused_columns=False, use_cpu=config.device == "cpu",
            bf16=config.bf16, dataloader_pin_memory=torch.cuda.is_available(), dataloader_drop_last=len(examples) >= config.batch_size,
        )
        weights = {"ce_weight": 1.0, "kd_weight": 0.0} if config.method == "sft" else {"ce_weight": config.ce_weight, "kd_weight": config.kd_weight}
        trainer = DistillationTrainer(
            model=model, args=arguments, train_dataset=examples, data_collator=PadCollator(tokenizer.pad_token_id),
            callbacks=[ProgressCallback(progress)] if progress else None, **weights,
        )
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
        model_dir = folder / "model"
        model.generation_config = GenerationConfig(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, max_new_tokens=64, do_sample=False)
        trainer.save_model(str(model_dir))
        tokenizer.save_pretrained(model_dir)
        history = [{"step": e["step"], "loss": e["loss"], "learning_rate": e["learning_rate"]} for e in trainer.state.log_history if "loss" in e]
        return {
            "model_path": str(model_dir), "parameters": count_parameters(model), "train_seconds": round(seconds, 2),
            "final_loss": history[-1]["loss"] if history else None, "loss_history": history, "examples": len(examples),
        }

    output = store.build("train", stage_fingerprint, compute)
    manifest = output.manifest
    return ModelRef(
        stage="train", fingerprint=stage_fingerprint, path=str(output.path), cached=output.cached,
        model_path=str(Path(output.path) / "model"), parameters=manifest["parameters"], train_seconds=manifest["train_seconds"],
        final_loss=manifest["final_loss"], loss_history=manifest["loss_history"],
    )
