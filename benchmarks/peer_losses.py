"""Dense-teacher distillation losses against TRL's `generalized_jsd_loss`: time, peak memory, equal losses.

    .venv/bin/python benchmarks/peer_losses.py [--quick]

The peer is what a user of TRL's GKD gets: TRL 1.16's ``GKDTrainer.generalized_jsd_loss`` (the staticmethod in
``trl/experimental/gkd/gkd_trainer.py``): the generalized JSD at β = 0.5 and, at TRL's endpoints, forward
KL(p‖q) at β = 0 and reverse KL(q‖p) at β = 1 (`F.kl_div` of the two log-softmaxes). Ours are
`distillation_loss` (dense student and teacher logits) and `distillation_loss_from_hidden` (the student's
last hidden state and LM-head weight, a dense teacher; chunk_size 256).

Every case is one forward + backward in fp32 with one torch thread, at B·T = 1024 positions and V = 151,936
(Qwen2.5's vocabulary); ``hidden`` is ``[1, 1024, 896]`` (Qwen2.5-0.5B). Inputs: student logits (requiring
grad) and teacher logits; or hidden state and LM-head weight (both requiring grad) and teacher logits,
where TRL gets ``hidden @ weight.T``. Pairs:

- ``jsd``, ``forward_kl``, ``reverse_kl``: ours against TRL at β = 0.5, 0 and 1;
- ``skew_forward_kl``, ``skew_reverse_kl`` and ``tvd``, at τ = 2: ours against TRL's JSD (TRL has none of
  them) at τ = 1 (TRL divides both logits by τ at every τ, so its τ = 1 run does the same work as at τ = 2).
  Every kind's loss is checked against its formula in float64 on 16 rows; once, before the measurements,
  our JSD at τ = 2 is checked against TRL's at τ = 2 on 64 rows (ours is τ² × TRL's: ours multiplies by τ²);
- ``jsd_from_hidden``: ours fused against TRL on ``hidden @ weight.T``, both giving gradients for hidden and weight.

How it is measured. `run` starts one server process, which imports torch and stillhouse, builds the inputs
once, then runs each repeat of each case in a child it forks (the inputs are shared copy-on-write and
never written). The child resets its peak RSS (``echo 5 > /proc/self/clear_refs``), runs the case and
reads VmHWM: ``peak_above_inputs_mb`` is VmHWM minus the RSS at the reset. Times are wall and CPU
(``process_time``: with one thread, the work done whatever else the machine runs). Repeats alternate
TRL, ours, TRL, ours ...; figures are medians; ratios are TRL / ours for time and ours / TRL for memory.
TRL's function is compiled from its installed source file rather than imported: importing
``trl.experimental.gkd`` pulls in transformers' Trainer (17 s of CPU here) and only torch is needed to run it;
the report names the file, line and TRL version.
"""

from __future__ import annotations

import argparse
import ast
import ctypes
import importlib.metadata
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

TRL_SOURCE = "experimental/gkd/gkd_trainer.py"  # relative to the trl package, in TRL 1.16
VOCAB_SIZE, POSITIONS, HIDDEN_SIZE, CHUNK_SIZE = 151_936, 1024, 896, 256
QUICK = {"vocab_size": 32_000, "positions": 64, "repeats": 1}
# (case, our kind, our options, TRL's β); the TRL runs are shared by every case naming the same β.
DENSE_CASES = (
    ("jsd", "jsd", {"beta": 0.5}, 0.5),
    ("forward_kl", "forward_kl", {}, 0.0),
    ("reverse_kl", "reverse_kl", {}, 1.0),
    ("skew_forward_kl", "skew_forward_kl", {"alpha": 0.1, "temperature": 2.0}, 0.5),
    ("skew_reverse_kl", "skew_reverse_kl", {"alpha": 0.1, "temperature": 2.0}, 0.5),
    ("tvd", "tvd", {"temperature": 2.0}, 0.5),
)
TARGETS = {
    "dense_trl_over_ours_seconds": 2.5,
    "dense_memory_ours_over_trl": 0.25,
    "from_hidden_memory_ours_over_trl": 0.10,
}


def run(quick: bool = False) -> dict:
    """Every case, each repeat in a fresh process; returns the report (see the module docstring)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--server"] + (["--quick"] if quick else [])
    environment = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run(command, check=True, capture_output=True, text=True, env=environment)
    return json.loads(done.stdout)


# --- the server: inputs once, one forked child per measurement ------------------------------------


def trl_generalized_jsd_loss():
    """TRL's ``GKDTrainer.generalized_jsd_loss``, compiled from the installed TRL's source; and where it is."""
    spec = importlib.util.find_spec("trl")  # finds the package without importing it
    path = Path(spec.origin).parent / TRL_SOURCE
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == "GKDTrainer":
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == "generalized_jsd_loss":
                    item.decorator_list = []  # a @staticmethod: a plain function here
                    import torch
                    import torch.nn.functional as F

                    namespace = {"torch": torch, "F": F}
                    exec(compile(ast.Module([item], []), str(path), "exec"), namespace)
                    where = {"file": str(path), "line": item.lineno, "trl_version": importlib.metadata.version("trl")}
                    return namespace["generalized_jsd_loss"], where
    raise RuntimeError(f"GKDTrainer.generalized_jsd_loss not found in {path}: is TRL 1.16 installed?")


def serve(quick: bool) -> dict:
    import torch

    torch.set_num_threads(1)
    from stillhouse.training.losses import distillation_loss, distillation_loss_from_hidden

    trl_loss, trl_where = trl_generalized_jsd_loss()
    vocab_size = QUICK["vocab_size"] if quick else VOCAB_SIZE
    positions = QUICK["positions"] if quick else POSITIONS
    repeats = QUICK["repeats"] if quick else 3
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "student": torch.randn(1, positions, vocab_size, generator=generator),
        "teacher": torch.randn(1, positions, vocab_size, generator=generator) * 2,
        "labels": torch.zeros(1, positions, dtype=torch.long),  # every position counts
        "hidden": torch.randn(1, positions, HIDDEN_SIZE, generator=generator),
        "weight": torch.randn(vocab_size, HIDDEN_SIZE, generator=generator) * 0.05,
    }
    inputs_mb = sum(tensor.numel() * tensor.element_size() for tensor in inputs.values()) / 2**20

    def dense_ours(kind, options):
        def case():
            student = inputs["student"].requires_grad_()
            return student, distillation_loss(student, inputs["teacher"], inputs["labels"], kind=kind, **options)

        return case

    def dense_trl(beta, temperature=1.0):
        def case():
            student = inputs["student"].requires_grad_()
            return student, trl_loss(student, inputs["teacher"], inputs["labels"], beta=beta, temperature=temperature)

        return case

    def from_hidden(ours):
        def case():
            hidden, weight = inputs["hidden"].requires_grad_(), inputs["weight"].requires_grad_()
            if ours:
                loss = distillation_loss_from_hidden(
                    hidden, weight, inputs["teacher"], inputs["labels"], kind="jsd", beta=0.5, chunk_size=CHUNK_SIZE
                )
            else:
                loss = trl_loss(hidden @ weight.T, inputs["teacher"], inputs["labels"], beta=0.5)
            return hidden, loss

        return case

    runs = {}  # name -> list of child results
    schedule = []  # (name, case, check) in the order they run: TRL, ours, TRL, ours ...
    for _ in range(repeats):
        for beta in (0.5, 0.0, 1.0):
            schedule.append((f"trl_beta_{beta}", dense_trl(beta), None))
            for name, kind, options, trl_beta in DENSE_CASES:
                if trl_beta == beta:
                    schedule.append((f"ours_{name}", dense_ours(kind, options), (kind, options)))
        schedule.append(("trl_jsd_from_hidden", from_hidden(ours=False), None))
        schedule.append(("ours_jsd_from_hidden", from_hidden(ours=True), None))

    temperature_check = check_temperature(inputs, trl_loss)  # in this process, before any child: not measured
    load_before = os.getloadavg()
    started = time.perf_counter()
    for name, case, check in schedule:
        runs.setdefault(name, []).append(in_child(measure, case, check, inputs))
    report = {
        "benchmark": "peer_losses",
        "peer": "TRL generalized_jsd_loss",
        "trl": trl_where,
        "torch": torch.__version__,
        "torch_threads": 1,
        "positions": positions,
        "vocab_size": vocab_size,
        "hidden_size": HIDDEN_SIZE,
        "chunk_size": CHUNK_SIZE,
        "repeats": repeats,
        "inputs_mb": round(inputs_mb, 1),
        "load_average_before": [round(load, 2) for load in load_before],
        "load_average_after": [round(load, 2) for load in os.getloadavg()],
        "seconds_total": round(time.perf_counter() - started, 1),
        "runs": {name: medians(results) for name, results in runs.items()},
        "pairs": {},
        "jsd_temperature_check": temperature_check,
    }
    for name, _, _, trl_beta in DENSE_CASES:
        report["pairs"][name] = pair(runs[f"ours_{name}"], runs[f"trl_beta_{trl_beta}"], f"trl_beta_{trl_beta}")
    report["pairs"]["jsd_from_hidden"] = pair(
        runs["ours_jsd_from_hidden"], runs["trl_jsd_from_hidden"], "trl_jsd_from_hidden"
    )
    # Equal losses: ours and TRL computed the same quantity on the same inputs.
    for name, trl_name in (
        ("jsd", "trl_beta_0.5"),
        ("forward_kl", "trl_beta_0.0"),
        ("reverse_kl", "trl_beta_1.0"),
        ("jsd_from_hidden", "trl_jsd_from_hidden"),
    ):
        ours, trl = runs[f"ours_{name}"][0]["loss"], runs[trl_name][0]["loss"]
        report["pairs"][name]["equals_trl"] = math.isclose(ours, trl, rel_tol=1e-5, abs_tol=1e-6)
    equal = [value for pair in report["pairs"].values() for key, value in pair.items() if key.startswith("equals")]
    report["losses_equal"] = temperature_check["equal"] and all(equal)
    report["targets_met"] = targets_met(report["pairs"]) if not quick else "not checked with --quick"
    return report


def in_child(function, *args) -> dict:
    """``function(*args)``'s dict, computed in a child forked from this process (fresh memory figures, same inputs)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(read_end)
        try:
            payload = json.dumps(function(*args))
        except BaseException as error:  # reported to the parent, which raises
            payload = json.dumps({"error": repr(error)})
        with os.fdopen(write_end, "w") as pipe:
            pipe.write(payload)
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        result = json.loads(pipe.read())
    os.waitpid(pid, 0)
    if "error" in result:
        raise RuntimeError(f"a measured case failed: {result['error']}")
    return result


def status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(case, check, inputs) -> dict:
    """One forward + backward of ``case``: times, the peak RSS above the inputs, the loss, and the loss checks."""
    import torch

    ctypes.CDLL(None).malloc_trim(0)  # free heap pages back to the OS, or the loss could reuse them unseen
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # VmHWM := VmRSS
    rss_at_start = status_bytes("VmRSS")
    wall, cpu = time.perf_counter(), time.process_time()
    leaf, loss = case()
    loss.backward()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    result = {
        "seconds": wall,
        "cpu_seconds": cpu,
        "peak_above_inputs_mb": (status_bytes("VmHWM") - rss_at_start) / 2**20,
        "loss": loss.item(),
        "gradient_finite": bool(torch.isfinite(leaf.grad[0, :8]).all()),  # a few rows: the tests check them all
    }
    if check is not None:  # after the figures: checks of our loss's value on a few rows
        result |= check_loss(*check, inputs)
    return result


def rows_of(inputs: dict, count: int) -> tuple:
    return inputs["student"][:, :count].detach(), inputs["teacher"][:, :count], inputs["labels"][:, :count]


def check_loss(kind: str, options: dict, inputs: dict) -> dict:
    """Ours on 16 rows against the kind's formula in float64."""
    from stillhouse.training.losses import distillation_loss

    student, teacher, labels = rows_of(inputs, 16)
    ours = distillation_loss(student, teacher, labels, kind=kind, **options).item()
    tau, beta, alpha = options.get("temperature", 1.0), options.get("beta", 0.5), options.get("alpha", 0.1)
    p, q = (teacher.double() / tau).softmax(-1), (student.double() / tau).softmax(-1)

    def kl(a, b):
        return (a * (a.log() - b.log())).sum(-1)

    per_position = {
        "forward_kl": lambda: kl(p, q),
        "reverse_kl": lambda: kl(q, p),
        "jsd": lambda: beta * kl(p, beta * p + (1 - beta) * q) + (1 - beta) * kl(q, beta * p + (1 - beta) * q),
        "skew_forward_kl": lambda: kl(p, alpha * p + (1 - alpha) * q),
        "skew_reverse_kl": lambda: kl(q, alpha * q + (1 - alpha) * p),
        "tvd": lambda: 0.5 * (p - q).abs().sum(-1),
    }[kind]()
    formula = tau**2 * per_position.mean().item()
    equal = math.isclose(ours, formula, rel_tol=1e-4, abs_tol=1e-6)
    return {"loss_16_rows": ours, "formula_float64_16_rows": formula, "equals_formula": equal}


def check_temperature(inputs: dict, trl_loss, tau: float = 2.0) -> dict:
    """Our JSD at τ against TRL's at τ on 64 rows: ours is τ² × TRL's."""
    from stillhouse.training.losses import distillation_loss

    student, teacher, labels = rows_of(inputs, 64)
    ours = distillation_loss(student, teacher, labels, kind="jsd", beta=0.5, temperature=tau).item()
    trl = tau**2 * trl_loss(student, teacher, labels, beta=0.5, temperature=tau).item()
    equal = math.isclose(ours, trl, rel_tol=1e-5, abs_tol=1e-6)
    return {"temperature": tau, "ours_64_rows": ours, "trl_times_tau_squared_64_rows": trl, "equal": equal}


def medians(results: list[dict]) -> dict:
    figures = {
        key: round(statistics.median(result[key] for result in results), 3)
        for key in ("seconds", "cpu_seconds", "peak_above_inputs_mb")
    }
    return (
        figures
        | {
            "seconds_all": [round(result["seconds"], 2) for result in results],
            "loss": results[0]["loss"],
            "gradient_finite": all(result["gradient_finite"] for result in results),
        }
        | {key: value for key, value in results[0].items() if key.startswith(("equals", "loss_", "formula"))}
    )


def pair(ours: list[dict], trl: list[dict], trl_name: str) -> dict:
    ours, trl = medians(ours), medians(trl)
    return {
        "against": trl_name,
        "trl_over_ours_seconds": round(trl["seconds"] / ours["seconds"], 2),
        "trl_over_ours_cpu_seconds": round(trl["cpu_seconds"] / ours["cpu_seconds"], 2),
        "memory_ours_over_trl": round(ours["peak_above_inputs_mb"] / trl["peak_above_inputs_mb"], 3),
    } | {key: value for key, value in ours.items() if key.startswith("equals")}


def targets_met(pairs: dict) -> dict:
    dense = [name for name, *_ in DENSE_CASES]
    return {
        "dense_at_least_2.5x_faster": all(
            min(pairs[name]["trl_over_ours_seconds"], pairs[name]["trl_over_ours_cpu_seconds"])
            >= TARGETS["dense_trl_over_ours_seconds"]
            for name in dense
        ),
        "dense_memory_at_most_25pct_of_trl": all(
            pairs[name]["memory_ours_over_trl"] <= TARGETS["dense_memory_ours_over_trl"] for name in dense
        ),
        "from_hidden_memory_at_most_10pct_of_trl": pairs["jsd_from_hidden"]["memory_ours_over_trl"]
        <= TARGETS["from_hidden_memory_ours_over_trl"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"a smoke run: {QUICK}")
    parser.add_argument("--server", action="store_true", help="internal: measure in this process and its children")
    args = parser.parse_args()
    report = serve(args.quick) if args.server else run(args.quick)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
