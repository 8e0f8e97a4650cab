"""KD loss memory and time on CPU: the fused losses from hidden states against naive dense KD.

    .venv/bin/python benchmarks/kd_memory.py [--repeats 3] [--chunk-size 256] [--vocab-sizes 32000 151936]

One forward+backward of the loss at B·T = 2048 tokens, H = 896 (Qwen2.5-0.5B's hidden size), fp32, one torch
thread, for V = 32,000 and V = 151,936 (Qwen2.5's vocabulary). Every case returns the same gradients: w.r.t. the
hidden state and the LM-head weight.

- ``naive`` (the peer): dense KD as a user writes it in plain PyTorch, and as TRL's GKD loss computes it at
  β = 0: full student logits ``hidden @ W.T``, ``F.kl_div`` of the student's and the dense teacher's
  log-softmaxes (forward KL), autograd for the backward. (`benchmarks/peer_losses.py` measures TRL's own
  function.)
- ``fused_top_k``: `distillation_loss_from_hidden` with a top-k (k = 128) teacher, forward KL, bucket tail.
  Its teacher is k ids and log-probs per position instead of dense logits: the inputs differ by design.
- ``fused_dense``: `distillation_loss_from_hidden` with the naive case's dense teacher, forward KL: the same
  inputs and loss as ``naive``.
- ``matmul_floor`` (no loss): only the three matrix products every exact full-vocabulary loss needs, chunk by chunk:
  the student's logits ``hidden @ W.T`` and, from a logits-shaped gradient, ``grad_hidden = g @ W`` and
  ``grad_W = g.T @ hidden``. No loss that scores the student's whole vocabulary (a top-k teacher still needs the
  student's log-sum-exp over all V, and its gradient reaches every logit) can take less time than this, so
  ``naive / matmul_floor`` is the largest speed-up over naive that any such loss could reach.

Each repeat of each case runs in its own process (``--case``), one at a time, the cases alternating. A
process builds its inputs (hidden state, weight, teacher, labels), resets its peak RSS
(``echo 5 > /proc/self/clear_refs``), runs the loss and reads VmHWM: ``peak_above_inputs_mb`` is VmHWM minus
the RSS at the reset. Every case must also hold the gradients it returns (``weight.grad``: V × H × 4 bytes,
545 MB at V = 151,936; ``hidden.grad`` 7 MB): ``working_memory_mb`` is the peak above inputs minus those,
the memory the loss itself needs. Times are wall and CPU (``process_time``; with one thread, the work done
whatever else the machine runs). Prints JSON: per case the medians over the repeats, and fused/naive ratios.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from stillhouse.training.losses import TopK, distillation_loss_from_hidden

TOKENS, HIDDEN, TOP_K = 2048, 896, 128
VOCAB_SIZES = (32_000, 151_936)
CASES = ("naive", "fused_top_k", "fused_dense", "matmul_floor")
TARGETS = {"peak_above_inputs": 0.05, "working_memory": 0.05, "seconds": 0.5}  # fused_top_k / naive, at most


def status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def top_k_teacher(vocab_size: int, generator: torch.Generator) -> TopK:
    """Distinct random ids and descending log-probs whose k+1-th share is the tail, built 64 rows at a time."""
    ids = torch.cat(
        [torch.rand(64, vocab_size, generator=generator).topk(TOP_K, -1).indices for _ in range(TOKENS // 64)]
    )
    logprobs = (
        (torch.randn(TOKENS, TOP_K + 1, generator=generator) * 2)
        .log_softmax(-1)[:, :TOP_K]
        .sort(-1, descending=True)
        .values
    )
    return TopK(ids.unsqueeze(0), logprobs.unsqueeze(0))


def run_case(case: str, vocab_size: int, chunk_size: int) -> dict:
    """One forward+backward in this process; returns its figures."""
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, TOKENS, HIDDEN, generator=generator).requires_grad_()
    weight = (torch.randn(vocab_size, HIDDEN, generator=generator) * 0.02).requires_grad_()
    labels = torch.randint(0, vocab_size, (1, TOKENS), generator=generator)
    if case == "fused_top_k":
        teacher = top_k_teacher(vocab_size, generator)
    elif case == "matmul_floor":
        teacher = None
    else:
        teacher = torch.randn(1, TOKENS, vocab_size, generator=generator) * 2
    ctypes.CDLL(None).malloc_trim(0)  # free heap pages back to the OS, or the loss could reuse them unseen
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # VmHWM := VmRSS, with the inputs built
    rss_inputs = status_bytes("VmRSS")

    wall, cpu = time.perf_counter(), time.process_time()
    if case == "matmul_floor":
        with torch.no_grad():
            weight.grad, hidden.grad = torch.zeros_like(weight), torch.zeros_like(hidden)
            for start in range(0, TOKENS, chunk_size):
                chunk = hidden[0, start : start + chunk_size]
                logits = chunk @ weight.T  # stands in for the gradient w.r.t. the logits: the same shape and work
                hidden.grad[0, start : start + chunk_size] = logits @ weight
                weight.grad.addmm_(logits.T, chunk)
        loss = logits.sum()
    elif case == "naive":
        student_logprobs = (hidden @ weight.T).log_softmax(-1)
        loss = F.kl_div(
            student_logprobs.flatten(0, 1),
            teacher.log_softmax(-1).flatten(0, 1),
            log_target=True,
            reduction="batchmean",
        )
    else:
        loss = distillation_loss_from_hidden(hidden, weight, teacher, labels, kind="forward_kl", chunk_size=chunk_size)
    if case != "matmul_floor":
        loss.backward()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu

    peak_above_inputs = status_bytes("VmHWM") - rss_inputs
    gradients = sum(leaf.grad.numel() * leaf.grad.element_size() for leaf in (hidden, weight))
    return {
        "case": case,
        "vocab_size": vocab_size,
        "loss": loss.item(),
        "seconds": wall,
        "cpu_seconds": cpu,
        "rss_with_inputs_mb": rss_inputs / 2**20,
        "peak_above_inputs_mb": peak_above_inputs / 2**20,
        "gradients_mb": gradients / 2**20,
        "working_memory_mb": (peak_above_inputs - gradients) / 2**20,
    }


def run_in_subprocess(case: str, vocab_size: int, chunk_size: int) -> dict:
    command = [
        sys.executable,
        __file__,
        "--case",
        case,
        "--vocab-sizes",
        str(vocab_size),
        "--chunk-size",
        str(chunk_size),
    ]
    environment = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return json.loads(subprocess.run(command, check=True, capture_output=True, text=True, env=environment).stdout)


def median_of(runs: list[dict]) -> dict:
    keys = ("seconds", "cpu_seconds", "rss_with_inputs_mb", "peak_above_inputs_mb", "gradients_mb", "working_memory_mb")
    figures = {key: round(statistics.median(run[key] for run in runs), 3 if "seconds" in key else 1) for key in keys}
    return figures | {"loss": round(runs[0]["loss"], 6), "seconds_all": [round(run["seconds"], 2) for run in runs]}


def ratios(fused: dict, naive: dict) -> dict:
    return {
        "peak_above_inputs": round(fused["peak_above_inputs_mb"] / naive["peak_above_inputs_mb"], 3),
        "working_memory": round(fused["working_memory_mb"] / naive["working_memory_mb"], 3),
        "seconds": round(fused["seconds"] / naive["seconds"], 3),
        "cpu_seconds": round(fused["cpu_seconds"] / naive["cpu_seconds"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="processes per case; figures are medians")
    parser.add_argument("--chunk-size", type=int, default=256, help="positions per chunk in the fused cases")
    parser.add_argument("--vocab-sizes", type=int, nargs="+", default=list(VOCAB_SIZES))
    parser.add_argument("--case", choices=CASES, help="internal: run one case in this process")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.vocab_sizes[0], args.chunk_size)))
        return

    report = {
        "benchmark": "kd_memory",
        "peer": "naive dense KD: full logits, F.kl_div of log-softmaxes, autograd",
        "tokens": TOKENS,
        "hidden_size": HIDDEN,
        "top_k": TOP_K,
        "chunk_size": args.chunk_size,
        "repeats": args.repeats,
        "torch_threads": 1,
        "load_average_before": [round(load, 2) for load in os.getloadavg()],
        "cases": {},
    }
    for vocab_size in args.vocab_sizes:
        runs = {case: [] for case in CASES}
        for _ in range(args.repeats):  # interleaved, so that load from other processes hits every case alike
            for case, case_runs in runs.items():
                case_runs.append(run_in_subprocess(case, vocab_size, args.chunk_size))
        medians = {case: median_of(case_runs) for case, case_runs in runs.items()}
        report["cases"][str(vocab_size)] = medians | {
            "fused_top_k_over_naive": ratios(medians["fused_top_k"], medians["naive"]),
            "fused_dense_over_naive": ratios(medians["fused_dense"], medians["naive"]),
            # The most any exact full-vocabulary loss could gain over naive: its matrix products alone take this long.
            "largest_possible_speedup_over_naive": round(
                medians["naive"]["cpu_seconds"] / medians["matmul_floor"]["cpu_seconds"], 3
            ),
            # The least peak any loss returning the same gradients could reach, as a share of naive's: the gradients.
            "smallest_possible_peak_ratio": round(
                medians["naive"]["gradients_mb"] / medians["naive"]["peak_above_inputs_mb"], 3
            ),
            "fused_top_k_over_matmul_floor": round(
                medians["fused_top_k"]["cpu_seconds"] / medians["matmul_floor"]["cpu_seconds"], 3
            ),
            "fused_dense_loss_equals_naive": abs(medians["fused_dense"]["loss"] - medians["naive"]["loss"])
            <= 1e-5 * abs(medians["naive"]["loss"]) + 1e-6,
        }
    report["load_average_after"] = [round(load, 2) for load in os.getloadavg()]
    largest = report["cases"][str(max(args.vocab_sizes))]["fused_top_k_over_naive"]
    report["targets_at_largest_vocab"] = {
        "peak_above_inputs_at_least_95pct_lower": largest["peak_above_inputs"] <= TARGETS["peak_above_inputs"],
        "working_memory_at_least_95pct_lower": largest["working_memory"] <= TARGETS["working_memory"],
        "at_least_2x_faster": max(largest["seconds"], largest["cpu_seconds"]) <= TARGETS["seconds"],
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
