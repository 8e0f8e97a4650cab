"""KD loss memory and time on CPU: naive dense KL against the chunked top-k loss from hidden states.

    .venv/bin/python benchmarks/kd_memory.py [--repeats 3] [--chunk-size 256]

One forward+backward of the loss at B·T = 2048 tokens, H = 896 (Qwen2.5-0.5B's hidden size), for
V = 32,000 and V = 151,936 (Qwen2.5's vocabulary):

- ``naive``: dense teacher logits, full student logits ``hidden @ W.T``, ``F.kl_div`` on both log-softmaxes;
- ``fused``: `distillation_loss_from_hidden` with a top-k (k = 128) teacher, forward KL, bucket tail.

Each repeat of each case runs in its own process (``--case``), one at a time and alternating
between the cases, so that its peak RSS (``ru_maxrss``) is its own. A process reports the RSS with its inputs
built (hidden state, weight, teacher, labels) and the peak; the loss's own peak is the difference. The inputs
differ by design: the naive case's dense teacher logits are an input, the fused case's teacher is k = 128 ids
and log-probs. Prints JSON: per case the medians over the repeats, and fused/naive ratios.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from stillhouse.training.losses import TopK, distillation_loss_from_hidden

TOKENS, HIDDEN, TOP_K = 2048, 896, 128
VOCAB_SIZES = (32_000, 151_936)


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


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
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, TOKENS, HIDDEN, generator=generator).requires_grad_()
    weight = (torch.randn(vocab_size, HIDDEN, generator=generator) * 0.02).requires_grad_()
    labels = torch.randint(0, vocab_size, (1, TOKENS), generator=generator)
    if case == "naive":
        teacher = torch.randn(1, TOKENS, vocab_size, generator=generator) * 2
    else:
        teacher = top_k_teacher(vocab_size, generator)
    rss_inputs, peak_before = current_rss_bytes(), peak_rss_bytes()

    started = time.perf_counter()
    if case == "naive":
        student_logprobs = (hidden @ weight.T).log_softmax(-1)
        loss = F.kl_div(
            student_logprobs.flatten(0, 1),
            teacher.log_softmax(-1).flatten(0, 1),
            log_target=True,
            reduction="batchmean",
        )
    else:
        loss = distillation_loss_from_hidden(hidden, weight, teacher, labels, kind="forward_kl", chunk_size=chunk_size)
    loss.backward()
    seconds = time.perf_counter() - started

    peak = peak_rss_bytes()
    return {
        "case": case,
        "vocab_size": vocab_size,
        "loss": loss.item(),
        "seconds": seconds,
        "rss_with_inputs_mb": rss_inputs / 2**20,
        "peak_rss_mb": peak / 2**20,
        "peak_above_inputs_mb": (peak - rss_inputs) / 2**20,
        # If building the inputs peaked higher than the loss did, the loss's peak is hidden: say so.
        "setup_peak_mb": peak_before / 2**20,
        "loss_set_the_peak": peak > peak_before,
    }


def run_in_subprocess(case: str, vocab_size: int, chunk_size: int) -> dict:
    command = [
        sys.executable,
        __file__,
        "--case",
        case,
        "--vocab-size",
        str(vocab_size),
        "--chunk-size",
        str(chunk_size),
    ]
    return json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)


def median_of(runs: list[dict]) -> dict:
    keys = ("seconds", "rss_with_inputs_mb", "peak_rss_mb", "peak_above_inputs_mb")
    figures = {key: round(statistics.median(run[key] for run in runs), 3 if key == "seconds" else 1) for key in keys}
    return figures | {
        "loss": round(runs[0]["loss"], 6),
        "loss_set_the_peak": all(run["loss_set_the_peak"] for run in runs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="processes per case; figures are medians")
    parser.add_argument("--chunk-size", type=int, default=256, help="positions per chunk in the fused case")
    parser.add_argument("--case", choices=("naive", "fused"), help="internal: run one case in this process")
    parser.add_argument("--vocab-size", type=int, help="internal: with --case")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.vocab_size, args.chunk_size)))
        return

    report = {
        "benchmark": "kd_memory",
        "tokens": TOKENS,
        "hidden_size": HIDDEN,
        "top_k": TOP_K,
        "chunk_size": args.chunk_size,
        "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
        "cases": {},
    }
    for vocab_size in VOCAB_SIZES:
        runs = {"naive": [], "fused": []}
        for _ in range(args.repeats):  # interleaved, so that load from other processes hits both cases alike
            for case, case_runs in runs.items():
                case_runs.append(run_in_subprocess(case, vocab_size, args.chunk_size))
        medians = {
            case: median_of(case_runs) | {"seconds_all": [round(run["seconds"], 3) for run in case_runs]}
            for case, case_runs in runs.items()
        }
        naive, fused = medians["naive"], medians["fused"]
        report["cases"][str(vocab_size)] = medians | {
            "fused_over_naive": {
                "peak_above_inputs": round(fused["peak_above_inputs_mb"] / naive["peak_above_inputs_mb"], 3),
                "peak_rss": round(fused["peak_rss_mb"] / naive["peak_rss_mb"], 3),
                "seconds": round(fused["seconds"] / naive["seconds"], 3),
            }
        }
    largest = report["cases"][str(VOCAB_SIZES[-1])]["fused_over_naive"]
    report["target_at_largest_vocab"] = {
        "peak_above_inputs_at_least_85pct_lower": largest["peak_above_inputs"] <= 0.15,
        "not_slower": largest["seconds"] <= 1.0,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
