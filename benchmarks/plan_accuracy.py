"""How close `stillhouse plan`'s memory estimates come to the measured peaks, on this CPU.

    .venv/bin/python benchmarks/plan_accuracy.py [--cases NAME,NAME] [--threads 2]

Each case is a random-init model of a given shape (one of them Qwen2.5-0.5B's, V = 151,936, from
tests/model_configs) and a config for it. The case runs in a fresh process (``--case``): it imports
everything first, resets the kernel's peak-RSS counter (``echo 5 > /proc/self/clear_refs``), then builds
the model in float32 (as `load_causal_lm` loads a student) and runs what the stage runs:

- training: two optimizer steps of `DistillationTrainer` (the stage's Trainer) with the stage's
  `TrainingArguments`, on synthetic examples of ``max_seq_len`` tokens (one row of each micro-batch
  shorter, so the batch is padded and masked like real data), with stored top-k targets for `kd`;
- sampling: `stillhouse.sampling.hf_engine.generate` over ``batch_size`` prompts with top-k log-probs.

The measured peak is VmHWM minus the RSS right after the reset; the estimate is `plan_pipeline`'s for the
same config on Hardware "CPU" (which counts no CUDA reserve). glibc is told to serve every allocation over
64 KiB with mmap (``MALLOC_MMAP_THRESHOLD_``), so that a freed tensor leaves RSS the way it leaves CUDA's
allocated-memory count, instead of staying in a heap the process keeps.

Prints a table, then JSON as its last output: ``cases`` (name, estimated_bytes, measured_bytes, error_pct)
and ``max_abs_error_pct``. Peaks are deterministic enough on a shared machine; times are not measured.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL_CONFIGS = REPO / "tests" / "model_configs"

SMALL_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 512,
    "intermediate_size": 1408,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
}
SMALL_QWEN3 = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": 384,
    "intermediate_size": 1024,
    "num_hidden_layers": 6,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "vocab_size": 151936,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
}

# name -> (model config: a tests/model_configs folder or a dict, stage, config overrides)
CASES = {
    "qwen2.5-0.5b-shape full kd top-16 chunked": (
        "Qwen2.5-0.5B",
        "train",
        {"train": {"method": "kd", "loss_chunk_size": 256, "batch_size": 2, "max_seq_len": 256}},
    ),
    "qwen2.5-0.5b-shape lora sft": (
        "Qwen2.5-0.5B",
        "train",
        {"train": {"method": "sft", "lora": {"r": 16}, "batch_size": 2, "max_seq_len": 384}},
    ),
    "small-llama full sft checkpointing": (
        SMALL_LLAMA,
        "train",
        {"train": {"method": "sft", "gradient_checkpointing": True, "batch_size": 4, "max_seq_len": 512}},
    ),
    "small-llama full kd top-16": (
        SMALL_LLAMA,
        "train",
        {"train": {"method": "kd", "batch_size": 4, "max_seq_len": 512}},
    ),
    "small-qwen3 full kd top-16 chunked": (
        SMALL_QWEN3,
        "train",
        {"train": {"method": "kd", "loss_chunk_size": 512, "batch_size": 4, "max_seq_len": 512}},
    ),
    "small-llama hf sampling": (
        SMALL_LLAMA,
        "sample",
        {
            "sample": {"batch_size": 32, "max_new_tokens": 64, "top_k_logprobs": 16},
            "train": {"max_seq_len": 512},
            "curate": {"filters": {"length": {"max_tokens": 448, "tokenizer": "unused"}}},
        },
    ),
}
TOP_K = 16


def model_folder(model, root: Path) -> Path:
    """A folder with the config.json of ``model`` (a tests/model_configs name, or a config dict) and no weights."""
    if isinstance(model, str):
        return MODEL_CONFIGS / model
    folder = root / "model"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(model))
    return folder


def pipeline_config(folder: Path, overrides: dict):
    from stillhouse.config import parse_config

    raw = {
        "name": "plan-accuracy",
        "curate": {"source": "builtin:demo"},
        "sample": {"teacher": str(folder), "top_k_logprobs": TOP_K, "dtype": "float32", "device": "cpu"},
        "train": {"student": str(folder), "max_steps": 2, "device": "cpu", "learning_rate": 1e-4},
        "registry": {"model_name": "plan-accuracy"},
    }
    for section, values in overrides.items():
        raw[section] = {**raw.get(section, {}), **values}
    return parse_config(raw)


def estimate(folder: Path, stage: str, overrides: dict) -> int:
    from stillhouse.planning import Hardware, plan_pipeline

    hardware = Hardware(gpus_per_node=1, gpu_memory_bytes=24 * 2**30, cpu=True)
    return plan_pipeline(pipeline_config(folder, overrides), hardware).stage(stage).peak_bytes


def status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def synthetic_examples(count: int, length: int, vocab: int, with_top_k: bool, seed: int = 0) -> list[dict]:
    """Examples as `build_examples` makes them: the first quarter is prompt (labels -100), the rest response;
    every other example is 8 tokens shorter, so each micro-batch is padded and masked."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    examples = []
    for index in range(count):
        size = length - 8 * (index % 2)
        ids = torch.randint(0, vocab, (size,), generator=generator).tolist()
        prompt = size // 4
        example = {"input_ids": ids, "labels": [-100] * prompt + ids[prompt:], "prompt_length": prompt}
        if with_top_k:
            response = size - prompt
            top = torch.randint(0, vocab, (response, TOP_K), generator=generator)
            logprobs = torch.randn(response, TOP_K + 1, generator=generator).log_softmax(-1)[:, :TOP_K]
            example["response_top_k_ids"] = top.to(torch.int32)
            example["response_top_k_logprobs"] = logprobs.sort(-1, descending=True).values
        examples.append(example)
    return examples


def measure_training(config, folder: Path, output: Path) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, TrainingArguments

    from stillhouse.training.examples import PadCollator
    from stillhouse.training.train import DistillationTrainer, with_lora

    train = config.train
    model_config = AutoConfig.from_pretrained(folder)
    examples = synthetic_examples(8, train.max_seq_len, model_config.vocab_size, train.method == "kd")
    Path("/proc/self/clear_refs").write_text("5")
    baseline = status_kib("VmRSS")

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(model_config, dtype=torch.float32)
    if train.lora is not None:
        model = with_lora(model, train)
    micro_batch = train.batch_size // (train.num_processes * train.gradient_accumulation_steps)
    arguments = TrainingArguments(  # as run_training builds them for a one-process CPU run
        output_dir=str(output),
        max_steps=train.max_steps,
        per_device_train_batch_size=micro_batch,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        gradient_checkpointing=train.gradient_checkpointing,
        learning_rate=train.learning_rate,
        weight_decay=train.weight_decay,
        report_to="none",
        save_strategy="no",
        logging_nan_inf_filter=False,
        seed=train.seed,
        remove_unused_columns=False,
        use_cpu=True,
        bf16=train.bf16,
        dataloader_pin_memory=False,
        dataloader_drop_last=True,
    )
    weights = (
        {"ce_weight": 1.0, "kd_weight": 0.0}
        if train.method == "sft"
        else {"ce_weight": train.ce_weight, "kd_weight": train.kd_weight}
    )
    trainer = DistillationTrainer(
        model=model,
        args=arguments,
        train_dataset=examples,
        data_collator=PadCollator(0),
        kd=train.kd,
        vocab_size=model_config.vocab_size,
        pad_token_id=0,
        eos_token_id=1,
        loss_chunk_size=train.loss_chunk_size,
        **weights,
    )
    trainer.train()
    return (status_kib("VmHWM") - baseline) * 1024


def measure_sampling(config, folder: Path) -> int:
    import torch
    from tokenizers import Tokenizer, models
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    from stillhouse.sampling.hf_engine import generate

    sample = config.sample
    model_config = AutoConfig.from_pretrained(folder)
    vocabulary = {f"t{index}": index for index in range(model_config.vocab_size)}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocabulary, unk_token="t0")), pad_token="t0", eos_token="t1"
    )
    prompt_tokens = config.curate.filters.length.max_tokens
    generator = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(2, model_config.vocab_size, (prompt_tokens,), generator=generator).tolist()
        for _ in range(sample.batch_size)
    ]
    Path("/proc/self/clear_refs").write_text("5")
    baseline = status_kib("VmRSS")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(model_config, dtype=torch.float32).eval()
    generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=sample.max_new_tokens,
        batch_size=sample.batch_size,
        top_k_logprobs=sample.top_k_logprobs,
    )
    return (status_kib("VmHWM") - baseline) * 1024


def run_case(name: str) -> dict:
    """In this (fresh) process: the estimate, then the measurement."""
    import torch  # noqa: F401  (imports before the baseline: the same in every case)
    import transformers  # noqa: F401

    import stillhouse.training.train  # noqa: F401

    model, stage, overrides = CASES[name]
    with tempfile.TemporaryDirectory(dir="/tmp") as root:
        folder = model_folder(model, Path(root))
        config = pipeline_config(folder, overrides)
        estimated = estimate(folder, stage, overrides)
        if stage == "train":
            measured = measure_training(config, folder, Path(root) / "out")
        else:
            measured = measure_sampling(config, folder)
    return {
        "name": name,
        "estimated_bytes": estimated,
        "measured_bytes": measured,
        "error_pct": round(100 * (estimated - measured) / measured, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated case names (default: all)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in each case's process")
    parser.add_argument("--case", help="internal: run one case in this process and print its JSON")
    args = parser.parse_args()
    if args.case:
        import torch

        torch.set_num_threads(args.threads)
        print("RESULT " + json.dumps(run_case(args.case)))
        return

    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "TOKENIZERS_PARALLELISM": "false"}
    results = []
    for name in args.cases.split(","):
        completed = subprocess.run(
            [sys.executable, __file__, "--case", name, "--threads", str(args.threads)],
            capture_output=True,
            text=True,
            env=environment,
        )
        lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
        if completed.returncode != 0 or not lines:
            sys.stderr.write(completed.stdout[-4000:] + completed.stderr[-4000:])
            raise SystemExit(f"case {name!r} failed (exit {completed.returncode})")
        results.append(json.loads(lines[-1].removeprefix("RESULT ")))
        row = results[-1]
        print(
            f"{row['name']:<45} estimated {row['estimated_bytes'] / 2**30:7.2f} GiB   "
            f"measured {row['measured_bytes'] / 2**30:7.2f} GiB   error {row['error_pct']:+6.1f}%",
            flush=True,
        )
    print(
        json.dumps(
            {
                "benchmark": "plan_accuracy",
                "cases": results,
                "max_abs_error_pct": max(abs(row["error_pct"]) for row in results),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
