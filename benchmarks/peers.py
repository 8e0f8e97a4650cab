"""Stillhouse against the peers a user would otherwise pick, in one run; the last line is the ratios.

    .venv/bin/python benchmarks/peers.py [--quick] [--only sampling losses training]

- ``sampling`` (benchmarks/peer_sampling.py): the hf engine against left-padded batched transformers `generate`,
  greedy, with and without top-16 capture, on a decode-dominated random 50M Llama and on the demo teacher.
- ``losses`` (benchmarks/peer_losses.py): dense-teacher divergences (JSD, forward and reverse KL, and the fused
  path from hidden states) against TRL's `generalized_jsd_loss`, time and peak memory above inputs, at B·T = 1024
  and V = 151,936.
- ``training`` (benchmarks/peer_training.py): SFT against TRL's `SFTTrainer`, offline top-16 KD against our own
  SFT, on-policy GKD against TRL's `GKDTrainer`, response tokens per second.

Every part uses one torch thread on both sides, alternates its repeats and reports medians; each checks that both
sides give the same answers or losses. A ratio is ours / the peer's speed (above 1: we are faster) or, for memory,
ours / the peer's peak (below 1: we use less). Each part runs in its own process, so one's memory doesn't colour
the next one's. Target: ≤ 12 minutes on 2 cores for the whole run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PARTS = {"sampling": "peer_sampling.py", "losses": "peer_losses.py", "training": "peer_training.py"}


def run_part(name: str, quick: bool) -> dict:
    """One part's JSON: the last line its script prints."""
    started = time.perf_counter()
    command = [sys.executable, str(HERE / PARTS[name]), *(["--quick"] if quick else [])]
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        return {"error": completed.stderr.strip().splitlines()[-1:] or ["exit " + str(completed.returncode)]}
    output = completed.stdout.strip()
    try:
        result = json.loads(output)  # a part that prints one (indented) JSON document
    except json.JSONDecodeError:
        result = json.loads(output.splitlines()[-1])  # a part that prints progress, then its JSON line
    result["part_seconds"] = round(time.perf_counter() - started, 1)
    return result


def ratios_of(name: str, result: dict) -> dict:
    """The headline ratios of a part, flat: ``{"sampling.decode_greedy": 1.9, ...}``."""
    if "error" in result:
        return {f"{name}.error": " ".join(result["error"])}
    if "ratios" in result:
        return {f"{name}.{key}": value for key, value in result["ratios"].items()}
    # peer_training: per pair, ours over the peer's tokens/s.
    paired = {
        key: value["ours_over_peer"]
        for key, value in result.items()
        if isinstance(value, dict) and "ours_over_peer" in value
    }
    if paired:
        return {f"{name}.{key}": value for key, value in paired.items()}
    # peer_losses: per case, TRL's time over ours (above 1: we are faster) and our peak memory over TRL's.
    return {
        f"{name}.{case}.{label}": pair[key]
        for case, pair in result.get("pairs", {}).items()
        for label, key in (("speed", "trl_over_ours_seconds"), ("memory", "memory_ours_over_trl"))
        if key in pair
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="each part's smoke run")
    parser.add_argument("--only", nargs="+", choices=list(PARTS), default=list(PARTS))
    arguments = parser.parse_args()
    started = time.perf_counter()
    results = {name: run_part(name, arguments.quick) for name in arguments.only}
    for name, result in results.items():
        print(json.dumps({name: result}))
    ratios = {key: value for name, result in results.items() for key, value in ratios_of(name, result).items()}
    print(json.dumps({"ratios": ratios, "quick": arguments.quick, "seconds": round(time.perf_counter() - started, 1)}))


if __name__ == "__main__":
    main()
