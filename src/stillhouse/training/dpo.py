"""Learning from judged pairs on TRL: DPO (`DPOTrainer`) or best-of-n SFT (`SFTTrainer` on the chosen responses).

    dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta=0.1)

The sigmoid DPO loss (Rafailov et al., 2023) with the pre-DPO student as the reference model; the
reference log-probs are computed once, before training (``precompute_ref_log_probs``). `dpo_loss`
is the formula as a tensor function, which the tests hold TRL's trainer to.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float = 0.1,
) -> torch.Tensor:
    """Mean of -log σ(β·[(π_c − ref_c) − (π_r − ref_r)]); each input ``[N]`` holds summed response log-probs."""
    margins = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
    return -F.logsigmoid(beta * margins.float()).mean()


def train_dpo(
    model_path: str,
    pairs: list[dict],
    output_dir: Path,
    *,
    beta: float = 0.1,
    learning_rate: float = 5e-4,
    max_steps: int = 50,
    batch_size: int = 8,
    seed: int = 0,
    logging_steps: int = 5,
    threads: int | None = None,
    sft_weight: float = 0.0,
    warmup_ratio: float = 0.0,
) -> dict:
    """Train the model at ``model_path`` on ``pairs`` (``{"prompt": messages, "chosen": text, "rejected": text}``).

    ``sft_weight`` > 0 adds that much negative log-likelihood of the chosen response (RPO), which keeps
    DPO from lowering the chosen responses' likelihood along with the rejected ones'.
    Saves the trained policy and its tokenizer to ``output_dir/model``; returns the logged history
    (loss, reward margins and accuracies per logging step).
    """
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from stillhouse.models import load_causal_lm, load_tokenizer

    if threads:
        torch.set_num_threads(threads)
    tokenizer = load_tokenizer(model_path)
    model = load_causal_lm(model_path, device="cpu")
    rows = [
        {
            "prompt": pair["prompt"],
            "chosen": [{"role": "assistant", "content": pair["chosen"]}],
            "rejected": [{"role": "assistant", "content": pair["rejected"]}],
        }
        for pair in pairs
    ]
    arguments = DPOConfig(
        output_dir=str(output_dir / "trainer"),
        beta=beta,
        precompute_ref_log_probs=True,
        loss_type=["sigmoid", "sft"] if sft_weight > 0 else ["sigmoid"],
        loss_weights=[1.0, sft_weight] if sft_weight > 0 else None,
        learning_rate=learning_rate,
        warmup_steps=warmup_ratio,
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        logging_steps=logging_steps,
        save_strategy="no",
        report_to="none",
        seed=seed,
        use_cpu=not torch.cuda.is_available(),
        dataloader_pin_memory=torch.cuda.is_available(),
    )
    trainer = DPOTrainer(model=model, args=arguments, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    return train_and_save(
        trainer, tokenizer, output_dir, ("rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected")
    )


def train_best_of_n(
    model_path: str,
    pairs: list[dict],
    output_dir: Path,
    *,
    learning_rate: float = 5e-4,
    max_steps: int = 50,
    batch_size: int = 8,
    seed: int = 0,
    logging_steps: int = 5,
    beta: float | None = None,
    sft_weight: float = 0.0,
    warmup_ratio: float = 0.0,
) -> dict:
    """Rejection-sampling SFT: supervised fine-tuning on each pair's chosen response only
    (``beta``, ``sft_weight`` unused)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from stillhouse.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(model_path)
    model = load_causal_lm(model_path, device="cpu")
    rows = [
        {"prompt": pair["prompt"], "completion": [{"role": "assistant", "content": pair["chosen"]}]} for pair in pairs
    ]
    arguments = SFTConfig(
        output_dir=str(output_dir / "trainer"),
        learning_rate=learning_rate,
        warmup_steps=warmup_ratio,
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        logging_steps=logging_steps,
        save_strategy="no",
        report_to="none",
        seed=seed,
        use_cpu=not torch.cuda.is_available(),
        dataloader_pin_memory=torch.cuda.is_available(),  # prompt-completion rows: the loss covers the completion only
    )
    trainer = SFTTrainer(model=model, args=arguments, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    return train_and_save(trainer, tokenizer, output_dir, ())


def train_and_save(trainer, tokenizer, output_dir: Path, logged: tuple[str, ...]) -> dict:
    """Train, save the model and tokenizer to ``output_dir/model``; the history keeps step, loss and ``logged``."""
    started = time.perf_counter()
    trainer.train()
    seconds = round(time.perf_counter() - started, 2)
    trainer.save_model(str(output_dir / "model"))
    tokenizer.save_pretrained(output_dir / "model")
    keep = ("step", "loss", *logged)
    return {
        "history": [
            {k: v for k, v in entry.items() if k in keep} for entry in trainer.state.log_history if "loss" in entry
        ],
        "seconds": seconds,
    }
