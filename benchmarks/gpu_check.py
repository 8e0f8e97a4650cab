"""GPU figures of the core, on random-init models of real shapes (no downloads): memory of the fused KD loss,
one FSDP training step, and the hf engine's sampling speed. Run on a CUDA machine:

    PYTHONPATH=src python benchmarks/gpu_check.py            # JSON to $OUT/gpu_check.json when $OUT is set, else stdout
    .venv/bin/python benchmarks/gpu_check.py --smoke         # the same code at tiny sizes, on the CPU

(a) ``loss``: one forward+backward of the KD loss at V = 151,936 (Qwen2.5's vocabulary) in bf16, N tokens of
    hidden size 896: `distillation_loss_from_hidden` (fused, top-32 teacher) against the unfused top-k loss on
    materialized logits and a naive dense KL (`F.kl_div` on both full log-softmaxes, a dense teacher). Peak CUDA
    memory above the inputs, and milliseconds.
(b) ``fsdp_step``: two bf16 KD optimizer steps of the Qwen2.5-0.5B shape sharded with FSDP2 on one rank (each
    decoder layer and the root `fully_shard`-ed, bf16 parameters, fp32 gradient reduction, fused AdamW, the
    fused top-k loss plus cross-entropy, as `train.strategy: fsdp` with `train.bf16` and `loss_chunk_size`
    runs it), peak CUDA memory against `stillhouse plan`'s estimate for the same config.
(c) ``sampling``: greedy decoding of 64 prompts by `stillhouse.sampling.hf_engine.generate` against one batched
    `model.generate`, tokens per second (bf16, the 0.5B shape), and the engine with top-16 log-probs.
(b') ``amp_step``: the same two steps unsharded, fp32 weights under bf16 autocast (`train.bf16` with `ddp`).

Imports only the Prefect-free core (no prefect, mlflow, vllm, datasets, trl); the JSON's ``forbidden_imports``
lists any that got in. Without CUDA (and without --smoke) it writes ``{"cuda": false}`` and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
QWEN_SHAPE = REPO / "tests" / "model_configs" / "Qwen2.5-0.5B" / "config.json"
FORBIDDEN = ("prefect", "mlflow", "vllm", "datasets", "trl")

FULL = {"tokens": 8192, "hidden": 896, "vocab": 151_936, "top_k": 32, "chunk": 1024, "micro_batch": 4, "seq": 1024}
FULL |= {"prompts": 64, "new_tokens": 128, "repeats": 3}
SMOKE = {"tokens": 256, "hidden": 64, "vocab": 1000, "top_k": 8, "chunk": 64, "micro_batch": 2, "seq": 32}
SMOKE |= {"prompts": 8, "new_tokens": 8, "repeats": 1}
SMOKE_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
SMOKE_SHAPE |= {"num_key_value_heads": 2, "vocab_size": 1000}


class Meter:
    """Peak memory above a starting point, and elapsed milliseconds, on CUDA (or just time on the CPU)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start_bytes = torch.cuda.memory_allocated()
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak_above_start = torch.cuda.max_memory_allocated() - self.start_bytes
        else:
            self.peak_above_start = None
        self.ms = 1000 * (time.perf_counter() - self.started)


def model_config(smoke: bool):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(QWEN_SHAPE.parent)
    if smoke:
        for key, value in SMOKE_SHAPE.items():
            setattr(config, key, value)
    return config


def word_level_tokenizer(vocab_size: int):
    """A tokenizer of ``vocab_size`` made-up tokens, so a random model of a real shape can be prompted offline."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocabulary = {f"t{index}": index for index in range(vocab_size)}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocabulary, unk_token="t0")), pad_token="t0", eos_token="t1"
    )


# --- (a) the loss --------------------------------------------------------------------------------------------


def loss_check(sizes: dict, device: torch.device) -> dict:
    from stillhouse.training.losses import TopK, distillation_loss, distillation_loss_from_hidden

    tokens, hidden_size, vocab, k = sizes["tokens"], sizes["hidden"], sizes["vocab"], sizes["top_k"]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    generator = torch.Generator(device=device).manual_seed(0)

    def inputs(dense_teacher: bool):
        hidden = torch.randn(1, tokens, hidden_size, device=device, dtype=dtype, generator=generator)
        weight = torch.randn(vocab, hidden_size, device=device, dtype=dtype, generator=generator) * 0.02
        labels = torch.randint(0, vocab, (1, tokens), device=device, generator=generator)
        if dense_teacher:
            teacher = torch.randn(1, tokens, vocab, device=device, dtype=dtype, generator=generator)
        else:
            ids = torch.stack([torch.randperm(vocab, device=device)[:k] for _ in range(min(tokens, 64))])
            ids = ids.repeat(tokens // len(ids) + 1, 1)[:tokens].unsqueeze(0)
            logprobs = torch.randn(1, tokens, k + 1, device=device, generator=generator).log_softmax(-1)[..., :k]
            teacher = TopK(ids, logprobs.sort(-1, descending=True).values)
        return hidden.requires_grad_(), weight.requires_grad_(), teacher, labels

    def naive_dense(hidden, weight, teacher, labels):
        logits = hidden @ weight.T
        return F.kl_div(
            logits.float().log_softmax(-1).flatten(0, 1),
            teacher.float().log_softmax(-1).flatten(0, 1),
            log_target=True,
            reduction="batchmean",
        )

    def unfused_top_k(hidden, weight, teacher, labels):
        return distillation_loss(hidden @ weight.T, teacher, labels, kind="forward_kl")

    def fused_top_k(hidden, weight, teacher, labels):
        return distillation_loss_from_hidden(
            hidden, weight, teacher, labels, kind="forward_kl", chunk_size=sizes["chunk"]
        )

    results = {}
    for name, loss_of, dense in (
        ("naive_dense_kl", naive_dense, True),
        ("unfused_top_k", unfused_top_k, False),
        ("fused_top_k", fused_top_k, False),
    ):
        peaks, times = [], []
        for _ in range(sizes["repeats"] + 1):  # the first is a warm-up
            hidden, weight, teacher, labels = inputs(dense)
            with Meter(device) as meter:
                loss_of(hidden, weight, teacher, labels).backward()
            peaks.append(meter.peak_above_start)
            times.append(meter.ms)
            del hidden, weight, teacher, labels
        results[name] = {
            "peak_above_inputs_mib": None if peaks[-1] is None else round(peaks[-1] / 2**20, 1),
            "ms": round(statistics.median(times[1:] or times), 2),
        }
    naive, fused = results["naive_dense_kl"], results["fused_top_k"]
    if naive["peak_above_inputs_mib"]:
        results["fused_over_naive_peak"] = round(fused["peak_above_inputs_mib"] / naive["peak_above_inputs_mib"], 4)
    results["sizes"] = {"tokens": tokens, "hidden": hidden_size, "vocab": vocab, "top_k": k, "chunk": sizes["chunk"]}
    return results


# --- (b) one FSDP step ---------------------------------------------------------------------------------------


def training_step_check(sizes: dict, device: torch.device, smoke: bool, strategy: str) -> dict:
    """Two KD optimizer steps of the 0.5B shape: ``fsdp`` (FSDP2, bf16 parameters) or ``ddp`` (one process:
    fp32 weights under bf16 autocast, as the Trainer runs `bf16` without FSDP)."""
    import contextlib

    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import AutoModelForCausalLM

    from stillhouse.training.losses import TopK, distillation_loss_from_hidden

    fsdp = strategy == "fsdp"
    if fsdp:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    try:
        config = model_config(smoke)
        vocab = config.vocab_size
        micro_batch, seq, k, chunk = sizes["micro_batch"], sizes["seq"], sizes["top_k"], sizes["chunk"]
        bf16 = device.type == "cuda"
        torch.manual_seed(0)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated() if device.type == "cuda" else 0
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(device)  # fp32 masters
        if fsdp:
            policy = MixedPrecisionPolicy(
                param_dtype=torch.bfloat16 if bf16 else torch.float32, reduce_dtype=torch.float32
            )
            for layer in model.model.layers:
                fully_shard(layer, mp_policy=policy, reshard_after_forward=True)
            fully_shard(model, mp_policy=policy)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 and not fsdp else contextlib.nullcontext()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
        generator = torch.Generator(device=device).manual_seed(0)
        input_ids = torch.randint(0, vocab, (micro_batch, seq), device=device, generator=generator)
        attention_mask = torch.ones_like(input_ids)
        attention_mask[-1, -8:] = 0  # one padded row, as a collated batch has
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        labels[:, : seq // 4] = -100  # the prompt
        teacher = TopK(
            torch.randint(0, vocab, (micro_batch, seq, k), device=device, generator=generator),
            torch.randn(micro_batch, seq, k + 1, device=device, generator=generator).log_softmax(-1)[..., :k],
        )
        seconds, captured = [], {}
        for _ in range(2):  # the second step has AdamW's states
            started = time.perf_counter()
            handle = model.model.register_forward_hook(lambda m, a, out: captured.update(hidden=out.last_hidden_state))
            with autocast:
                model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1)
                handle.remove()
                hidden, weight = captured["hidden"][:, :-1], full_weight(model.get_output_embeddings().weight)
                targets = labels[:, 1:]
                one_hot = TopK(targets.clamp(min=0).unsqueeze(-1), torch.zeros(targets.shape + (1,), device=device))
                shifted = TopK(teacher.ids[:, 1:], teacher.logprobs[:, 1:])
                loss = 0.5 * distillation_loss_from_hidden(
                    hidden, weight, one_hot, targets, kind="forward_kl", chunk_size=chunk
                ) + distillation_loss_from_hidden(hidden, weight, shifted, targets, kind="forward_kl", chunk_size=chunk)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - started)
        peak = torch.cuda.max_memory_allocated() - start if device.type == "cuda" else None
        result = {
            "strategy": strategy,
            "peak_allocated_gib": None if peak is None else round(peak / 2**30, 3),
            "step_seconds": [round(s, 3) for s in seconds],
            "loss": round(float(loss.detach()), 4),
            "micro_batch": micro_batch,
            "seq": seq,
            "parameters": sum(p.numel() for p in model.parameters()),
        }
        result |= plan_estimate(strategy, micro_batch, seq, chunk, peak, smoke)
        return result
    finally:
        if fsdp:
            dist.destroy_process_group()


def full_weight(weight: torch.Tensor) -> torch.Tensor:
    """A sharded (DTensor) weight all-gathered with autograd, as train.py's `gathered_weight` does; the root
    module's weights are usually already unsharded after its forward."""
    from torch.distributed.tensor import DTensor, Partial

    if not isinstance(weight, DTensor):
        return weight
    return weight.full_tensor(grad_placements=[Partial("avg")] * weight.device_mesh.ndim)


def plan_estimate(strategy: str, micro_batch: int, seq: int, chunk: int, measured: int | None, smoke: bool) -> dict:
    """`stillhouse plan`'s train estimate of the 0.5B step (without its CUDA context share, which
    max_memory_allocated doesn't see), or why there is none. A smoke run checks that it runs; its tiny model
    is not the shape estimated, so no error is given."""
    try:
        from stillhouse.config import parse_config
        from stillhouse.planning import CUDA_RESERVE_BYTES, Hardware, plan_pipeline
    except ImportError as error:  # pydantic missing on a bare GPU image
        return {"plan_estimate_gib": None, "plan_note": f"planner not importable: {error}"}
    folder = str(QWEN_SHAPE.parent)
    config = parse_config(
        {
            "name": "gpu-check",
            "curate": {"source": "builtin:demo"},
            "sample": {"teacher": folder, "top_k_logprobs": FULL["top_k"]},
            "train": {
                "student": folder,
                "method": "kd",
                "strategy": strategy,
                "bf16": True,
                "loss_chunk_size": chunk,
                "batch_size": micro_batch,
                "max_seq_len": seq,
            },
            "registry": {"model_name": "gpu-check"},
        }
    )
    stage = plan_pipeline(config, Hardware(gpus_per_node=1, gpu_memory_bytes=140 * 2**30)).stage("train")
    reserve = next(part.bytes for part in stage.parts if part.name.startswith("CUDA context"))
    # The reserve part is the context plus a slack share of the rest; allocated memory sees neither.
    estimate = stage.peak_bytes - reserve
    return {
        "plan_estimate_gib": round(estimate / 2**30, 3),
        "plan_error_pct": None if not measured or smoke else round(100 * (estimate - measured) / measured, 1),
        "plan_parts_gib": {part.name: round(part.bytes / 2**30, 3) for part in stage.parts},
        "plan_cuda_reserve_gib": round(reserve / 2**30, 3),
        "plan_note": f"estimate without the CUDA reserve ({CUDA_RESERVE_BYTES / 2**30:.1f} GiB + allocator slack)",
    }


# --- (c) sampling --------------------------------------------------------------------------------------------


def sampling_check(sizes: dict, device: torch.device, smoke: bool) -> dict:
    from transformers import AutoModelForCausalLM

    from stillhouse.sampling.hf_engine import generate

    config = model_config(smoke)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).eval()
    tokenizer = word_level_tokenizer(config.vocab_size)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(16 if smoke else 64, 32 if smoke else 256, (sizes["prompts"],), generator=generator)
    prompts = [torch.randint(2, config.vocab_size, (int(n),), generator=generator).tolist() for n in lengths]
    new_tokens = sizes["new_tokens"]

    def engine(top_k: int) -> int:
        outputs = generate(
            model, tokenizer, prompts, max_new_tokens=new_tokens, batch_size=len(prompts), top_k_logprobs=top_k
        )
        return sum(len(output.token_ids) for output in outputs)

    @torch.inference_mode()
    def batched_generate() -> int:
        tokenizer.padding_side = "left"
        batch = tokenizer.pad({"input_ids": prompts}, padding=True, return_tensors="pt").to(device)
        output = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False)
        generated = output[:, batch["input_ids"].shape[1] :]
        finished = generated.eq(tokenizer.eos_token_id).cumsum(-1)
        return int(((finished == 0) | (generated.eq(tokenizer.eos_token_id) & (finished == 1))).sum())

    results = {}
    for name, run in (
        ("hf_engine", lambda: engine(0)),
        ("hf_engine_top16", lambda: engine(16)),
        ("batched_generate", batched_generate),
    ):
        rates = []
        for repeat in range(sizes["repeats"] + 1):  # the first is a warm-up
            with Meter(device) as meter:
                tokens = run()
            if repeat or sizes["repeats"] == 0:
                rates.append(tokens / (meter.ms / 1000))
        results[name] = {"tokens": tokens, "tokens_per_second": round(statistics.median(rates), 1)}
    results["engine_over_generate"] = round(
        results["hf_engine"]["tokens_per_second"] / results["batched_generate"]["tokens_per_second"], 3
    )
    results["prompts"], results["max_new_tokens"] = len(prompts), new_tokens
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, on the CPU when there is no GPU")
    parser.add_argument(
        "--checks",
        default="loss,fsdp_step,amp_step,sampling",
        help="comma-separated: loss, fsdp_step, amp_step, sampling",
    )
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    report: dict = {"cuda": cuda}
    if cuda or args.smoke:
        device = torch.device("cuda" if cuda else "cpu")
        sizes = SMOKE if args.smoke else FULL
        report |= {"smoke": args.smoke, "device": torch.cuda.get_device_name() if cuda else "cpu"}
        report |= {"torch": torch.__version__}
        checks = {
            "loss": lambda: loss_check(sizes, device),
            "fsdp_step": lambda: training_step_check(sizes, device, args.smoke, "fsdp"),
            "amp_step": lambda: training_step_check(sizes, device, args.smoke, "ddp"),
            "sampling": lambda: sampling_check(sizes, device, args.smoke),
        }
        for name in args.checks.split(","):
            try:
                report[name] = checks[name]()
            except Exception as error:  # one failed check still leaves the others' figures
                report[name] = {"error": f"{type(error).__name__}: {error}"}
            if cuda:
                torch.cuda.empty_cache()
    report["forbidden_imports"] = sorted({name.split(".")[0] for name in sys.modules} & set(FORBIDDEN))
    text = json.dumps(report, indent=2)
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / "gpu_check.json").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
