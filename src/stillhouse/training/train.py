"""The training stage: a student learns from the teacher on `transformers.Trainer`.

- ``method: sft`` (black-box): cross-entropy on the teacher's response tokens; prompt tokens are masked.
- ``method: kd`` (white-box): ``kd_weight`` x a divergence (``train.kd.kind``) to the teacher's
  distribution + ``ce_weight`` x cross-entropy. The teacher's distribution is the top-k stored by the
  sample stage (``kd.teacher: offline``), the teacher model in memory (``online``: dense, or its
  top-k) or a server's top-k of every position (``served``: `ServedTeacher`, vLLM's ``prompt_logprobs``).
  With ``kd.lmbda`` > 0 a batch is, with that probability, replaced by the student's own samples scored
  by the live teacher (on-policy GKD; no cross-entropy on those). White-box KD needs student and teacher
  to share a vocabulary (same token->id map), unless ``kd.align`` is set (below).
- ``kd.align: byte | uld`` (cross-tokenizer KD, `cross_tokenizer`): teacher and student tokenize differently.
  Their positions are matched where both start a token at the same byte of the response; ``byte`` maps the
  teacher's top-k onto the student's vocabulary by byte prefixes (with a residual bucket) and applies
  ``kd.kind``, ``uld`` compares sorted probability vectors. A stored top-k is mapped once, when the examples are
  built; a live teacher (online, served, on-policy) scores the response text in its own tokens every batch.

What a step computes. Logits (student and teacher) exist only for the positions from a batch's first response
token on: prompt positions count in no loss. The online teacher runs in inference mode, in its own dtype. On-policy
rollouts come from `sample_rollouts` (``generate``'s tokens without its per-step overhead), and an off-policy batch
takes the stored top-k instead of a teacher forward where that is what the teacher would give
(`reuses_stored_top_k`). benchmarks/peer_training.py measures SFT and GKD against TRL's trainers.

Sequence-level KD (GKD's ``seq_kd``) is what the offline data already is: the teacher's own responses.
TRL's GKDTrainer is not used because it supports only its JSD on full teacher logits; stored top-k
teachers and the other divergences go through one trainer here.

The student is a pretrained model (``train.student``, optionally with LoRA adapters) or a Llama built
from scratch with the teacher's tokenizer (``train.architecture``).

Processes. ``num_processes`` > 1, ``nodes`` > 1 or ``strategy: fsdp`` run this stage under ``torchrun``
(`launch_training`; gloo on CPU, NCCL on GPUs), one process per GPU:

    python -m stillhouse.training.agent --nproc-per-node 2 -m stillhouse.training.worker STAGE_FOLDER/launch.json

- ``strategy: ddp``: every process holds the whole student (data parallel).
- ``strategy: fsdp``: torch FSDP2 through accelerate (`TrainingArguments(fsdp=..., fsdp_config=...)`) shards
  parameters, gradients and optimizer states over all processes, each decoder layer (the model's
  ``_no_split_modules``) its own unit. ``train.fsdp`` sets CPU offload and resharding after forward,
  ``gradient_checkpointing`` becomes FSDP's activation checkpointing, ``bf16`` holds the parameters in
  bfloat16 for compute and reduces gradients in float32. Checkpoints are sharded (torch distributed
  checkpoint); at the end the ranks gather the full state dict and rank 0 saves one set of safetensors
  into ``model/``, loadable with plain transformers.
- ``nodes`` > 1: start the same stage (the same ``stillhouse run`` command and config) on every node; the
  torchrun agents meet at ``train.rendezvous`` (c10d rendezvous, ``--rdzv-id train.rendezvous_id``) and
  global rank 0 writes the student and ``result.json``. The store must be a folder every node mounts at the
  same path (NFS, Lustre, ...): the ranks of all nodes write their checkpoint shards into the one stage
  folder, and every node reads rank 0's result from it. An ``s3://`` store is refused for several nodes.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import (
    AutoModelForCausalLM,
    DynamicCache,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedConfig,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.training_args import ParallelMode

from stillhouse.config import KDConfig, OpenAIEngineConfig, TrainConfig
from stillhouse.errors import InputError, Interrupted, StillhouseError
from stillhouse.models import count_parameters, load_causal_lm, load_tokenizer, resolve_model
from stillhouse.refs import DatasetRef, SamplesRef
from stillhouse.sampling.hf_engine import cache_argument
from stillhouse.store import write_json_atomic
from stillhouse.training.checks import check_vocabularies, on_cpu
from stillhouse.training.cross_tokenizer import (
    CrossTargets,
    TokenizerPair,
    cross_tokenizer_loss,
    online_targets,
    pair_tokenizers,
    teacher_sequences,
)
from stillhouse.training.examples import PadCollator, build_examples
from stillhouse.training.losses import (
    TopK,
    cross_entropy,
    distillation_loss,
    distillation_loss_from_hidden,
    top_k_logprobs,
)
from stillhouse.training.stage import check_teacher_capabilities, served_teacher_endpoint, uses_torchrun

if TYPE_CHECKING:
    from stillhouse.training.served_teacher import ServedTeacher

TRAINER_STATE = "trainer_state.json"  # the last file Trainer writes into a checkpoint
# Set by `launch_training` for the torchrun workers: they stop when the process that started them is gone.
LAUNCHER_PID_ENV = "STILLHOUSE_LAUNCHER_PID"
# Batch entries of the cross-tokenizer path (`build_examples`), popped before the student's forward.
CROSS_INPUTS = ("cross_ids", "cross_logprobs", "cross_mask", "teacher_prompt_ids", "response_text")

log = logging.getLogger(__name__)


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


def fsdp_settings(config: TrainConfig, model) -> dict:
    """`TrainingArguments` keywords that shard the student with FSDP2 (accelerate's plugin), from ``train.fsdp``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft model wraps it
    layers = getattr(base, "_no_split_modules", None)
    if not layers:
        raise InputError(
            f"train.strategy: fsdp wraps each decoder layer of the student in its own shard unit, but "
            f"{type(base).__name__} names no decoder layer class (_no_split_modules); use strategy `ddp`"
        )
    return {
        "fsdp": True,
        "fsdp_config": {
            "version": 2,
            "transformer_layer_cls_to_wrap": sorted(set(layers)),
            "reshard_after_forward": config.fsdp.reshard_after_forward,
            # On a CPU run everything already lives in CPU memory (and torch's offload pins memory for a GPU).
            "cpu_offload": config.fsdp.cpu_offload and not on_cpu(config),
            "state_dict_type": "SHARDED_STATE_DICT",  # each rank writes its shard (torch distributed checkpoint)
            "activation_checkpointing": config.gradient_checkpointing,  # FSDP's own, not Trainer's
        },
    }


def enable_fsdp_on_cpu(accelerator, fsdp_plugin_args: dict) -> None:
    """Switch a CPU run's accelerate state to FSDP with the plugin `TrainingArguments` describes.

    accelerate (1.15) turns its FSDP plugin on for accelerator devices only: a CPU run's state is MULTI_CPU
    and the plugin is dropped, silently leaving every rank the whole model. torch's FSDP2 itself runs on CPU
    with gloo, so the state is set as accelerate sets it on a GPU: FSDP, in its process-level state too
    (every `AcceleratorState()` copies that one's type).
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(**fsdp_plugin_args)
    state = accelerator.state
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin, state.distributed_type = plugin, DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def gathered_weight(weight: torch.Tensor) -> torch.Tensor:
    """The full ``weight`` for use outside its module's forward: an FSDP2-sharded DTensor is all-gathered with
    autograd, its gradient flowing back reduce-scattered (averaged over ranks, as FSDP reduces its own);
    anything else (a plain or an already-unsharded parameter) is returned as it is."""
    from torch.distributed.tensor import DTensor, Partial

    if not isinstance(weight, DTensor):
        return weight
    return weight.full_tensor(grad_placements=[Partial("avg")] * weight.device_mesh.ndim)


class DistillationTrainer(Trainer):
    """`Trainer` whose loss is ``ce_weight * CE + kd_weight * divergence`` on shifted positions.

    ``teacher`` is the online teacher model (``kd.teacher: online``), a `ServedTeacher` (``served``), or None
    (the stored top-k, or no teacher for ``sft``). ``pair`` (``kd.align`` set): the teacher's and the student's
    tokenizers; the KD term is then `cross_tokenizer_loss` against targets mapped onto the student's tokens.
    """

    def __init__(
        self,
        *args,
        ce_weight: float,
        kd_weight: float,
        kd: KDConfig,
        vocab_size: int,
        teacher: torch.nn.Module | ServedTeacher | None = None,
        pad_token_id: int = 0,
        eos_token_id: int | None = None,
        loss_chunk_size: int | None = None,
        pair: TokenizerPair | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.loss_chunk_size, self.pair = loss_chunk_size, pair
        self.ce_weight, self.kd_weight, self.kd = ce_weight, kd_weight, kd
        self.vocab_size, self.teacher = vocab_size, teacher
        self.pad_token_id, self.eos_token_id = pad_token_id, eos_token_id
        self.on_policy_draws = random.Random(self.args.seed)  # the same draws on every process
        # Our loss is a mean per micro-batch, not a sum over `num_items_in_batch`: let Trainer divide
        # it by the accumulation steps (it skips that for models that accept loss kwargs).
        self.model_accepts_loss_kwargs = False

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        if self.args.fsdp_plugin_args is not None and not self.accelerator.is_fsdp2:
            enable_fsdp_on_cpu(self.accelerator, self.args.fsdp_plugin_args)
            self.is_fsdp_enabled = True

    def _issue_warnings_after_load(self, load_result) -> None:
        """Resuming a student with tied embeddings: its checkpoint holds no `lm_head.weight` (the output layer *is* the
        embedding), which Trainer reports as a missing key. Tied keys aren't missing; anything else still warns."""
        model = self.accelerator.unwrap_model(self.model)
        tied = getattr(model, "_tied_weights_keys", None) or {}
        if getattr(model.config, "tie_word_embeddings", False) and tied:
            missing = [key for key in load_result.missing_keys if not any(key.endswith(name) for name in tied)]
            if len(missing) < len(load_result.missing_keys):
                model.tie_weights()
                load_result = type(load_result)(missing, load_result.unexpected_keys)
        super()._issue_warnings_after_load(load_result)

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
        cross = {key: inputs.pop(key) for key in CROSS_INPUTS if key in inputs} if self.pair is not None else None
        prompt_ids, prompt_mask = inputs.pop("prompt_input_ids", None), inputs.pop("prompt_attention_mask", None)
        ce_weight = self.ce_weight
        if self.kd.lmbda > 0 and model.training and self.on_policy_draws.random() < self.kd.lmbda:
            inputs, labels = self.student_rollout(model, prompt_ids, prompt_mask)
            stored, ce_weight = None, 0.0  # the student's own samples are scored, not imitated
            if cross is not None:  # the teacher scores the student's text, not the stored response
                cross = {"teacher_prompt_ids": cross["teacher_prompt_ids"]}
        # Only the window of shifted positions from the first counted one on is scored: the prompt columns before
        # it get no logits (student or teacher) and no loss. Position t predicts the token at t+1.
        first = scored_from(labels)
        targets = labels[:, first + 1 :]
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
            hidden = hidden[:, first:-1]
            # Under FSDP the weight may be a shard: gathered here, its gradient flows back sharded.
            weight = gathered_weight(self.accelerator.unwrap_model(model).get_output_embeddings().weight)
            weight = weight[: self.vocab_size]

            def loss_of(teacher, labels=targets, **options):
                return distillation_loss_from_hidden(
                    hidden, weight, teacher, labels, chunk_size=self.loss_chunk_size, **options
                )

            # Cross-entropy is forward KL to a one-hot teacher: its only outcome is the label (log-prob 0).
            one_hot = TopK(targets.clamp(min=0).unsqueeze(-1), torch.zeros(targets.shape + (1,), device=targets.device))
            loss = ce_weight * loss_of(one_hot, kind="forward_kl") if ce_weight > 0 else hidden.new_zeros(())
            if self.kd_weight > 0 and cross is not None:  # align byte (uld needs whole logits: refused chunked)
                aligned = self.cross_tokenizer_targets(labels, cross, first)
                kd_labels = targets.masked_fill(~aligned.mask, -100)  # no shared boundary, no target
                loss = loss + self.kd_weight * loss_of(TopK(aligned.ids, aligned.logprobs), kd_labels, **divergence)
            elif self.kd_weight > 0:
                loss = loss + self.kd_weight * loss_of(self.teacher_distribution(inputs, stored, first), **divergence)
        else:
            outputs, skipped = forward_window(model, self.accelerator.unwrap_model(model), inputs, first)
            logits = outputs.logits[:, skipped:-1, : self.vocab_size]  # rows past the shared vocabulary are padding
            loss = ce_weight * cross_entropy(logits, targets) if ce_weight > 0 else logits.new_zeros(())
            if self.kd_weight > 0 and cross is not None:
                loss = loss + self.kd_weight * cross_tokenizer_loss(
                    logits,
                    self.cross_tokenizer_targets(labels, cross, first),
                    targets,
                    align=self.kd.align,
                    uld_exact_weight=self.kd.uld_exact_weight,
                    **divergence,
                )
            elif self.kd_weight > 0:
                loss = loss + self.kd_weight * distillation_loss(
                    logits, self.teacher_distribution(inputs, stored, first), targets, **divergence
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

    def teacher_distribution(self, inputs: dict, stored: TopK | None, first: int = 0) -> torch.Tensor | TopK:
        """The teacher at the shifted positions ``first`` .. T-2 (``[B, T-1-first, V]`` logits or ``[..., k]``
        top-k): the stored top-k, the served teacher's top-k, or the online teacher's logits / top-k.

        A stored top-k stands in for a live teacher too (an off-policy batch of on-policy training) when the
        examples carry it: `build_examples` adds it only where it is what the live teacher would give
        (`reuses_stored_top_k`), so those batches cost no teacher forward. The online teacher runs in inference
        mode and computes logits for the window alone, in its own dtype: no fp32 copy of its whole output.
        """
        if stored is not None:
            k = self.kd.online_top_k if self.teacher is not None else None  # a live teacher's k ≤ the stored k
            return TopK(stored.ids[:, first + 1 :, :k], stored.logprobs[:, first + 1 :, :k])
        if self.kd.teacher == "served":  # [B, T-1, k] from the server: position t is its guess of token t+1
            served = self.teacher.top_k(inputs["input_ids"], inputs["attention_mask"])
            device = inputs["input_ids"].device
            return TopK(
                served.ids[:, first:].to(device), served.logprobs[:, first:].to(device=device, dtype=torch.float32)
            )
        with torch.inference_mode():
            outputs, skipped = forward_window(self.teacher, self.teacher, inputs, first)
            logits = outputs.logits[:, skipped:-1, : self.vocab_size]
            if self.kd.online_top_k is None:
                return logits
            return top_k_logprobs(logits, self.kd.online_top_k)

    def cross_tokenizer_targets(self, labels: torch.Tensor, cross: dict, first: int = 0) -> CrossTargets:
        """``kd.align``: targets in the student's vocabulary for the shifted positions ``first`` .. T-2
        (``[B, T-1-first, k]``, mask ``[B, T-1-first]``), aligned with ``labels[:, first + 1 :]``.

        The stored top-k was mapped when the examples were built. A live teacher scores the response text in its
        own tokens (its chat-template prompt + the text re-tokenized, its EOS where the student's response ended)
        and its top-k is mapped here: the stored response's text, or the student's decoded rollout.
        """
        if self.teacher is None:
            ids, logprobs, mask = (cross[key] for key in ("cross_ids", "cross_logprobs", "cross_mask"))
            return CrossTargets(ids[:, first + 1 :], logprobs[:, first + 1 :], mask[:, first + 1 :])
        starts, responses = [], []
        for row in labels.tolist():  # the response is the labels' one run of counted tokens
            start = next((j for j, label in enumerate(row) if label != -100), len(row))
            starts.append(start)
            responses.append([label for label in row[start:] if label != -100])
        texts = cross.get("response_text") or [
            self.pair.student.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            for ids in responses
        ]
        ended = [bool(ids) and ids[-1] == self.eos_token_id for ids in responses]
        sequences = teacher_sequences(self.pair, cross["teacher_prompt_ids"], texts, ended)
        if self.kd.teacher == "served":  # [B, L-1, k]: position t is its guess of token t+1
            output = self.teacher.top_k(sequences.input_ids, sequences.attention_mask)
        else:
            with torch.no_grad():
                output = self.teacher(
                    input_ids=sequences.input_ids.to(labels.device),
                    attention_mask=sequences.attention_mask.to(labels.device),
                ).logits[..., : len(self.pair.teacher_spellings)]  # rows past its tokenizer are padding
        targets = online_targets(
            self.pair,
            self.kd.align,
            output,
            sequences,
            texts,
            responses,
            starts,
            labels.shape[1],
            k=self.kd.online_top_k,
        )
        return CrossTargets(*(values[:, first + 1 :].to(labels.device) for values in targets))

    def student_rollout(self, model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> tuple[dict, torch.Tensor]:
        """Sample responses from the student (`sample_rollouts`); labels cover the generated tokens up to the
        first EOS.

        Under FSDP every rank takes part in every layer's all-gather, so all ranks decode every step (none stops
        when its own rows have ended); a rank that stopped early would leave the others waiting.
        """
        student = self.accelerator.unwrap_model(model)
        student.eval()
        sequences = sample_rollouts(
            student,
            prompt_ids,
            prompt_mask,
            max_new_tokens=self.kd.rollout_max_new_tokens,
            temperature=self.kd.rollout_temperature,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            stop_when_done=not (self.is_fsdp_enabled and self.args.world_size > 1),
        )
        student.train()
        generated = sequences[:, prompt_ids.shape[1] :]
        is_eos = generated.eq(self.eos_token_id)
        after_eos = (is_eos.cumsum(-1) - is_eos.long()) > 0  # strictly after the first EOS
        attention_mask = torch.cat([prompt_mask, (~after_eos).long()], dim=1)
        labels = torch.cat([torch.full_like(prompt_ids, -100), generated.masked_fill(after_eos, -100)], dim=1)
        # Prompts are left-padded here, so positions come from the mask (as the rollout computed them).
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        return {"input_ids": sequences, "attention_mask": attention_mask, "position_ids": position_ids}, labels

    def _save_rng_state(self, output_dir):
        """Each rank writes its own RNG state; then rank 0 writes ``trainer_state.json`` (last), so a checkpoint
        holding that file holds every rank's files (`last_complete_checkpoint` relies on it)."""
        super()._save_rng_state(output_dir)
        self.accelerator.wait_for_everyone()


def scored_from(labels: torch.Tensor) -> int:
    """The first shifted position whose target counts: ``labels[:, 1:]``'s first column with a label other than
    -100 in any row (0 when none counts). Positions before it are prompt in every row and need no logits."""
    counted = labels[:, 1:].ne(-100).any(0)
    return int(counted.float().argmax()) if bool(counted.any()) else 0


def forward_window(model, base, inputs: dict, first: int) -> tuple:
    """(``model(**inputs)``, columns of its logits to skip): logits for the positions ``first`` .. T-1 alone where
    the model's forward takes ``logits_to_keep`` (transformers' models do: the LM head skips the rest), else for
    every position, the first ``first`` of them to be skipped by the caller. ``base`` is ``model`` unwrapped
    (DDP, peft), whose forward's signature says."""
    base = base.get_base_model() if hasattr(base, "get_base_model") else base
    if "logits_to_keep" in inspect.signature(base.forward).parameters:
        return model(**inputs, logits_to_keep=inputs["input_ids"].shape[1] - first), 0
    return model(**inputs), first


@torch.no_grad()  # not inference mode: FSDP2 would keep all-gather buffers made here as inference tensors
def sample_rollouts(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float,
    eos_token_id: int | None,
    pad_token_id: int,
    stop_when_done: bool = True,
) -> torch.Tensor:
    """Prompts ``[B, P]`` (left-padded, ``prompt_mask`` 1 on tokens) followed by up to ``max_new_tokens`` tokens
    sampled at ``temperature`` from the whole distribution: ``[B, P + generated]``; a row's tokens after its EOS
    are ``pad_token_id``.

    The tokens are `model.generate(do_sample=True, temperature=..., top_k=0, top_p=1.0)`'s under the same torch
    seed (tested): the same forwards (positions from the mask, a KV cache), the same softmax and
    `torch.multinomial` draw per step. It skips `generate`'s per-call set-up and per-step logits processors and
    stopping criteria, which cost more than a small student's forwards. With ``stop_when_done`` it stops once every
    row has ended; otherwise (FSDP ranks decoding in step) it decodes all ``max_new_tokens`` steps.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft model wraps it
    cache = DynamicCache(config=base.config)
    cache_name = cache_argument(base)  # the forward's name for the KV cache (it changed in transformers 5.2x)
    mask = prompt_mask
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # as generate computes them under left padding
    logits = model(
        input_ids=prompt_ids,
        attention_mask=mask,
        position_ids=positions,
        use_cache=True,
        logits_to_keep=1,
        **{cache_name: cache},
    ).logits[:, -1]
    position = positions[:, -1:]
    running = torch.ones(len(prompt_ids), dtype=torch.bool, device=prompt_ids.device)
    chosen_tokens = []
    for step in range(max_new_tokens):
        probabilities = torch.softmax(logits.float() / temperature, dim=-1)
        chosen = torch.multinomial(probabilities, num_samples=1).squeeze(1)
        chosen = torch.where(running, chosen, pad_token_id)
        chosen_tokens.append(chosen)
        if eos_token_id is not None:
            running &= chosen.ne(eos_token_id)
        if step == max_new_tokens - 1 or (stop_when_done and not bool(running.any())):
            break
        mask = torch.cat([mask, mask.new_ones(len(mask), 1)], dim=1)
        position = position + 1
        logits = model(
            input_ids=chosen[:, None],
            attention_mask=mask,
            position_ids=position,
            use_cache=True,
            **{cache_name: cache},
        ).logits[:, -1]
    return torch.cat([prompt_ids, torch.stack(chosen_tokens, dim=1)], dim=1)


def progress_every(max_steps: int) -> int:
    """Steps between two progress reports (terminal and Prefect UI): about 50 a run, in-process or under torchrun."""
    return max(1, max_steps // 50)


class ProgressCallback(TrainerCallback):
    def __init__(self, progress: Callable[[float], None]):
        self.progress = progress

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % progress_every(state.max_steps) == 0:
            self.progress(state.global_step / state.max_steps)


AGENT_STOP_S = 5.0  # how long a stopped torchrun may take to stop its workers before it is killed
STEP_FILE = "step.json"  # in the stage folder: the step global rank 0 of a torchrun launch has just finished


class StepFileCallback(TrainerCallback):
    """Global rank 0 of a torchrun launch writes each finished step to ``path``: the launching process reads it to
    show progress (terminal and Prefect UI) and to say at which step a Ctrl-C stopped the workers."""

    def __init__(self, path: Path):
        self.path = path

    def on_step_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:  # about 0.1 ms a step: a small file renamed into place
            write_json_atomic(self.path, {"step": state.global_step})


def finished_step(folder: Path) -> int | None:
    """The last step `StepFileCallback` wrote in ``folder``, or None before the first."""
    try:
        return int(json.loads((folder / STEP_FILE).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


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
    # The adapters start random: seeded, so every rank draws the same ones (FSDP shards each rank's own copy)
    # and a rerun draws them again.
    torch.manual_seed(config.seed)
    return get_peft_model(model, adapters)


def may_leave_parameters_unused(settings: PreTrainedConfig) -> bool:
    """Whether a student of this config can leave some of its parameters out of a forward: a mixture of experts
    (an expert no token was routed to) or a model with more than a text decoder (a vision tower text never runs)."""
    text = settings.get_text_config()
    expert_counts = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
    return text is not settings or any(getattr(text, name, None) for name in expert_counts)


def reuses_stored_top_k(config: TrainConfig, samples: SamplesRef, shared_vocabulary: bool) -> bool:
    """Whether a live teacher's off-policy batches (on-policy training, ``kd.lmbda`` > 0) take the stored top-k
    instead of a teacher forward: only where it is what that teacher would give them, its top-``online_top_k``
    (≤ the stored k) of the same response in the same tokens. A dense teacher (``online_top_k`` null) and a
    teacher of other tokens (``kd.align``) score every batch."""
    kd = config.kd
    return (
        config.method == "kd"
        and kd.teacher != "offline"
        and kd.lmbda > 0
        and kd.align == "none"
        and shared_vocabulary
        and kd.online_top_k is not None
        and 0 < kd.online_top_k <= samples.top_k_logprobs
    )


def build_trainer(
    config: TrainConfig,
    dataset: DatasetRef,
    samples: SamplesRef,
    folder: Path,
    progress: Callable[[float], None] | None = None,
    teacher_endpoint: OpenAIEngineConfig | None = None,
) -> tuple[DistillationTrainer, PreTrainedTokenizerBase]:
    """(trainer, the student's tokenizer): the student, its examples (``trainer.train_dataset``) and the teacher
    wired into a `DistillationTrainer` whose checkpoints go to ``folder/checkpoints``. `run_training` trains it;
    benchmarks/peer_training.py times it."""
    if config.threads:
        torch.set_num_threads(config.threads)
    check_teacher_capabilities(config, samples)
    teacher_tokenizer = load_tokenizer(samples.teacher_tokenizer) if samples.teacher_tokenizer else None
    live_teacher = config.kd.teacher if config.method == "kd" and config.kd.teacher != "offline" else None
    difference = check_vocabularies(config, teacher_tokenizer)  # tokenizers only, before any weights load
    model, tokenizer = build_student(config, samples.teacher_tokenizer)
    if config.lora is not None:
        model = with_lora(model, config)
    align = config.kd.align if config.method == "kd" else "none"
    pair = (
        pair_tokenizers(teacher_tokenizer, tokenizer, teacher_name="sample.teacher", student_name="train.student")
        if align != "none"
        else None
    )
    examples = build_examples(
        dataset,
        samples,
        tokenizer,
        split="train",
        shared_vocabulary=difference is None,
        with_top_k=config.method == "kd"
        and (live_teacher is None or reuses_stored_top_k(config, samples, difference is None)),
        max_seq_len=config.max_seq_len,
        align=align,
        pair=pair,
        with_teacher_prompts=pair is not None and live_teacher is not None,
    )
    cpu = on_cpu(config)
    world_size = config.nodes * config.num_processes
    micro_batch = config.batch_size // (world_size * config.gradient_accumulation_steps)
    checkpoints = folder / "checkpoints"
    fsdp = config.strategy == "fsdp"
    arguments = TrainingArguments(
        output_dir=str(checkpoints),
        max_steps=config.max_steps,
        per_device_train_batch_size=micro_batch,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        activation_checkpointing=config.gradient_checkpointing and not fsdp,  # FSDP checkpoints its own layers
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        lr_scheduler_kwargs={"num_decay_steps": round(config.decay_ratio * config.max_steps)}
        if config.lr_scheduler == "warmup_stable_decay"
        else {},
        warmup_steps=config.warmup_ratio,
        weight_decay=config.weight_decay,
        adam_beta2=config.adam_beta2,
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
        # On the CPU whether asked for or the only device: with `device: auto` on a CPU-only machine accelerate
        # would otherwise set up torchrun workers as undistributed, each training its own replica on its shard.
        use_cpu=cpu,
        bf16=config.bf16,
        dataloader_pin_memory=not cpu,
        dataloader_drop_last=len(examples) >= config.batch_size,
        ddp_backend="gloo" if cpu and uses_torchrun(config) else None,
        # DDP looks for parameters a forward left unused only where there can be some. Elsewhere the search is an
        # extra walk of the autograd graph every step (and a warning from every rank).
        ddp_find_unused_parameters=may_leave_parameters_unused(model.config),
        **(fsdp_settings(config, model) if fsdp else {}),
    )
    if world_size > 1 and arguments.parallel_mode != ParallelMode.DISTRIBUTED:
        # Each process would train a replica of its own on its shard of the data, and rank 0 save a student that
        # saw 1/world_size of it: refused before a teacher loads (a StillhouseError, so the launcher shows it).
        raise StillhouseError(
            f"train: {world_size} processes were started, but the Trainer set them up as "
            f"{arguments.parallel_mode.value} ({arguments.distributed_state.distributed_type}), so their "
            f"gradients would not be averaged; set train.num_processes to 1 (device {config.device})"
        )
    if fsdp and config.bf16:
        # bf16 copies of the parameters for compute, fp32 gradient reduction (accelerate's default reduces in bf16).
        arguments.fsdp_plugin_args["mixed_precision_policy"] = {
            "param_dtype": torch.bfloat16,
            "reduce_dtype": torch.float32,
            "output_dtype": torch.bfloat16,
        }
    if live_teacher == "online":
        teacher = load_causal_lm(samples.teacher, device="cpu", field="sample.teacher")
        teacher = teacher.to(arguments.device).requires_grad_(False)
    elif live_teacher == "served":
        from stillhouse.training.served_teacher import ServedTeacher

        teacher = ServedTeacher(
            served_teacher_endpoint(config, teacher_endpoint),
            config.kd.served_model or samples.teacher,
            top_k=config.kd.online_top_k,
        )
    else:
        teacher = None
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
        pair=pair,
        **weights,
    )
    return trainer, tokenizer


def run_training(
    config: TrainConfig,
    dataset: DatasetRef,
    samples: SamplesRef,
    folder: Path,
    progress: Callable[[float], None] | None = None,
    teacher_endpoint: OpenAIEngineConfig | None = None,
    step_file: Path | None = None,
) -> dict:
    """Train in this process (one rank of several under torchrun); returns the manifest's content.

    ``teacher_endpoint`` is the sample stage's ``sample.openai``, the server of ``kd.teacher: served`` when
    ``kd.served`` is null. ``step_file``: where global rank 0 writes each finished step (`StepFileCallback`).
    """
    trainer, tokenizer = build_trainer(config, dataset, samples, folder, progress, teacher_endpoint)
    if step_file is not None:
        trainer.add_callback(StepFileCallback(step_file))
    checkpoints, fsdp = folder / "checkpoints", config.strategy == "fsdp"
    world_size = config.nodes * config.num_processes
    resume = last_complete_checkpoint(checkpoints)  # a crashed run's progress, when it saved any
    if resume is not None and trainer.is_world_process_zero():
        log.info("train: resuming from %s (of %d steps)", Path(resume).name, config.max_steps)
    started = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=resume)
    except BaseException as error:
        if isinstance(error, Exception | SystemExit):
            raise
        # Ctrl-C (KeyboardInterrupt), or SIGTERM as an orchestrator turns it into a BaseException of its own.
        raise interrupted(trainer.state.global_step, config.max_steps, checkpoints) from None
    finally:
        if config.method == "kd" and config.kd.teacher == "served":
            trainer.teacher.close()
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
        "examples": len(trainer.train_dataset),
        "resumed_from": resume,
        "optimizer_steps": trainer.state.global_step,
    }
    if world_size > 1 or fsdp:
        result["processes"] = process_figures(trainer)
    # Under FSDP every rank takes part in gathering the full weights; rank 0 alone gets them.
    full_state = trainer.accelerator.get_state_dict(trainer.model) if fsdp else None
    if trainer.is_world_process_zero():
        student = trainer.accelerator.unwrap_model(trainer.model)
        if fsdp:
            student = consolidated_student(student, full_state, config)
        elif config.lora is not None:
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


def interrupted(step: int | None, max_steps: int, checkpoints: Path) -> Interrupted:
    """What a Ctrl-C or SIGTERM during training tells the user: where it stopped, and what a rerun resumes from."""
    where = f"at step {step} of {max_steps}" if step is not None else f"before step {max_steps}"
    newest = last_complete_checkpoint(checkpoints)
    resume = (
        f"rerun to resume from {Path(newest).name}"
        if newest
        else "no checkpoint was written yet, so a rerun starts training again (set train.save_steps to keep some)"
    )
    return Interrupted(f"train: interrupted {where}; {resume}")


def process_figures(trainer: Trainer) -> list[dict]:
    """Per rank, in rank order: the parameters it holds (its shards under FSDP) and its peak resident memory."""
    from torch.distributed.tensor import DTensor

    local = sum(
        (p.to_local() if isinstance(p, DTensor) else p).numel()
        for p in trainer.accelerator.unwrap_model(trainer.model).parameters()
    )
    figures = {
        "rank": trainer.args.process_index,
        "local_parameters": local,
        "parameter_checksum": parameter_checksum(trainer.accelerator.unwrap_model(trainer.model)),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),  # KiB on Linux
        "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_initialized() else None,
    }
    if trainer.args.world_size == 1:
        return [figures]
    gathered = [None] * trainer.args.world_size
    torch.distributed.all_gather_object(gathered, figures)
    return gathered


def parameter_checksum(model: torch.nn.Module) -> float:
    """The sum of this rank's parameters (its shards under FSDP), in float64: equal on every data-parallel rank when
    their gradients were averaged, different within a few steps when they were not."""
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        return sum(float((p.to_local() if isinstance(p, DTensor) else p).double().sum()) for p in model.parameters())


def consolidated_student(sharded, full_state: dict, config: TrainConfig):
    """The student as one plain model holding ``full_state`` (the FSDP ranks' gathered weights), on the CPU.

    Built on the meta device and filled with the gathered tensors themselves, so rank 0 holds the weights
    once; LoRA adapters are merged into their layers.
    """
    base = sharded.get_base_model() if config.lora is not None else sharded
    with torch.device("meta"):
        student = AutoModelForCausalLM.from_config(base.config, trust_remote_code=config.trust_remote_code)
        if config.lora is not None:
            student = with_lora(student, config)
    student.load_state_dict(full_state, assign=True)
    if config.lora is not None:
        student = student.merge_and_unload()
    student.tie_weights()
    # Non-persistent buffers (rotary frequencies) are not in a state dict: the sharded model's are the full ones.
    buffers = dict(base.named_buffers())
    for name, buffer in list(student.named_buffers()):
        if buffer.is_meta:
            owner, _, leaf = name.rpartition(".")
            student.get_submodule(owner).register_buffer(leaf, buffers[name].detach().cpu(), persistent=False)
    return student.eval()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_training(
    config: TrainConfig,
    dataset: DatasetRef,
    samples: SamplesRef,
    folder: Path,
    teacher_endpoint: OpenAIEngineConfig | None = None,
    progress: Callable[[float], None] | None = None,
) -> dict:
    """Run `run_training` in ``config.num_processes`` torchrun workers on this node; returns global rank 0's result.

    With ``nodes`` > 1 the torchrun agents of all nodes meet at ``config.rendezvous`` (c10d) and the workers of
    every node share ``folder`` (see the module docstring). ``progress(fraction)`` follows global rank 0's steps
    (`STEP_FILE`), as in-process training reports them.
    """
    spec = folder / "launch.json"
    write_json_atomic(  # atomically: on a shared folder, another node's workers may be reading it
        spec,
        {
            "config": config.model_dump(mode="json"),
            "dataset": dataset.model_dump(),
            "samples": samples.model_dump(),
            "folder": str(folder),
            "teacher_endpoint": teacher_endpoint.model_dump(mode="json") if teacher_endpoint else None,
        },
    )
    command = [sys.executable, "-m", "stillhouse.training.agent", f"--nproc-per-node={config.num_processes}"]
    if config.nodes > 1:
        command += [
            f"--nnodes={config.nodes}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={config.rendezvous}",
            f"--rdzv-id={config.rendezvous_id}",
        ]
    else:
        command += ["--master-addr=127.0.0.1", f"--master-port={free_port()}"]
    command += ["-m", "stillhouse.training.worker", str(spec)]
    for leftover in ("error.txt", "result.json", STEP_FILE):  # a failed run's
        (folder / leftover).unlink(missing_ok=True)
    environment = {**os.environ, LAUNCHER_PID_ENV: str(os.getpid())}
    if config.threads and "OMP_NUM_THREADS" not in environment:  # torchrun would set 1 and print a banner saying so
        environment["OMP_NUM_THREADS"] = str(config.threads)
    if config.device == "cpu":
        # A CPU run on a GPU machine hides the GPUs: torch FSDP2 builds its default device mesh on the machine's
        # accelerator (cuda:<local rank>) even for CPU tensors.
        environment["CUDA_VISIBLE_DEVICES"] = ""
    # In a session of its own: a Ctrl-C in the terminal reaches this process only, which passes one SIGINT on
    # (torchrun takes a second signal during its shutdown as a new error).
    agent = subprocess.Popen(command, env=environment, start_new_session=True)
    reported = 0
    try:
        while True:
            try:
                returncode = agent.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                returncode = None
            step = finished_step(folder) or 0
            # As often as in-process training reports (`ProgressCallback`), and the last step.
            due = step - reported >= progress_every(config.max_steps) or (returncode is not None and step > reported)
            if progress is not None and due:
                progress(step / config.max_steps)
                reported = step
            if returncode is not None:
                break
    except BaseException as error:
        # torchrun passes the SIGINT on to its workers, which stop where they are (a checkpoint being written is
        # skipped on resume), and waits for them. Workers that outlive a killed torchrun kill themselves once this
        # process is gone (`die_with_launcher`).
        agent.send_signal(signal.SIGINT)
        try:
            agent.wait(timeout=AGENT_STOP_S)
        except subprocess.TimeoutExpired:
            agent.kill()
        if isinstance(error, Exception | SystemExit):
            raise
        # Ctrl-C (KeyboardInterrupt), or SIGTERM as an orchestrator turns it into a BaseException of its own.
        raise interrupted(finished_step(folder), config.max_steps, folder / "checkpoints") from None
    if returncode != 0:
        if (folder / "error.txt").is_file():
            raise StillhouseError((folder / "error.txt").read_text())
        processes = config.nodes * config.num_processes
        raise RuntimeError(
            f"train: {processes}-process training failed (exit {returncode}); rerun to resume from its last checkpoint"
        )
    return json.loads((folder / "result.json").read_text())
