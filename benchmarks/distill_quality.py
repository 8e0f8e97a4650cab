"""What white-box distillation buys over SFT, at equal wall-clock training budgets.

    python benchmarks/distill_quality.py --out benchmarks/results/distill_quality-cpu-DATE.json
                                                          # 3 seeds x budgets 30, 60, 120 s: ~45 min on 2 cores
    python benchmarks/distill_quality.py --quick          # 1 seed, 60 s per method: a first look
    python benchmarks/distill_quality.py --budgets 60 --methods sft,top_k_kd --seeds 3

The table (and `best_white_box_minus_sft`) is the largest budget's; every budget's means go to ``by_budget`` and to
the plot (held-out exact match against training seconds, one line per method, written beside ``--out``). The JSON
and the plot are logged to MLflow (``--tracking-uri``, experiment ``benchmark-distill_quality``), with each method's
means as metrics whose step is the budget in seconds, so MLflow's chart view draws the same curves. Runs go
``--jobs`` at a time (default: one per core), each on one torch thread.

Methods, each the Stillhouse train stage with one config (`METHODS`): SFT on the teacher's sampled answers; top-k
KD (forward KL to the stored top-16); on-policy GKD with forward and with reverse KL (half the batches are the
student's own samples, scored by the teacher in memory), from scratch and, as the GKD and MiniLLM papers run it,
from an SFT student (`sft_then_gkd`: half the budget SFT, then forward-KL GKD from that student); cross-tokenizer KD
(`kd.align: uld` and `byte`) into a student with a byte-level BPE tokenizer of its own.

Finished pilots and runs are appended to ``runs-rows<R>-teacher<S>.jsonl`` in ``--cache``; a rerun with the same
settings reuses them, so adding a method or a seed runs only what is new, and an interrupted run resumes.

The bundled demo tasks have one right answer each, and the demo teacher is nearly one-hot on them, so its logits
say little more than its greedy answers. This benchmark uses its own task mix where they do, and its own teacher:

    pick a letter: qdmxk        ->  any one of q, d, m, x, k       (several valid answers, teacher uniform over them)
    a number from 23 to 29      ->  any of 23 ... 29                (same)
    sort letters: qdmx          ->  dmqx                            (one answer)
    reverse: kfpa               ->  apfk                            (one answer)

The teacher (the demo teacher's shape, 1.06 M parameters, 4.2 MB) is trained here on answers drawn uniformly from
the valid ones, so its distribution spreads over them; it is sampled at temperature 1 for the students' data.
It is trained from `TEACHER_SEED` on the first run (about 10 minutes on one CPU thread) and cached under
``--cache``: a second teacher file is not committed, and anyone can rebuild it byte for byte from this script.

Budget: every method gets the same training time. A short pilot run measures each method's seconds per optimizer
step (on-policy steps generate, so they are slower), and the method then trains for ``budget / seconds_per_step``
steps with a full warmup + cosine schedule. Seconds are the process's CPU time: training runs on one thread, so that
is the wall clock of an idle machine, and other jobs on a shared machine don't skew the pilots. Both the wall-clock
``train_seconds`` and ``train_cpu_seconds`` are reported. Figures, over the held-out split (prompts
the curate stage kept out of training):

- exact match: the student's greedy answer is one of the valid answers (the one answer, for one-answer tasks);
- KL: KL(teacher || student) over whole answers, on the several-answer prompts: each model's probability of every
  valid answer plus one bucket for everything else. It is tokenizer-free, so it compares cross-tokenizer students too.

Means with 95% intervals (Student t) over the seeds. The last line printed is the JSON result.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import statistics
import string
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

TEACHER_SEED = 0
TASK_NAMES = ("pick_letter", "number_range", "sort_letters", "reverse")
SEVERAL_ANSWERS = ("pick_letter", "number_range")
STUDENT_SHAPE = {"hidden_size": 64, "num_layers": 4, "intermediate_size": 240, "num_heads": 4}

# name -> train config changes over `base_train`; "student: bpe" marks the cross-tokenizer students.
METHODS: dict[str, dict] = {
    "sft": {"method": "sft"},
    "top_k_kd": {"method": "kd", "kd_weight": 1.0, "ce_weight": 0.0, "kd": {"kind": "forward_kl"}},
    "gkd_forward_kl": {
        "method": "kd",
        "kd_weight": 1.0,
        "ce_weight": 0.0,
        "kd": {"kind": "forward_kl", "teacher": "online", "lmbda": 0.5, "rollout_max_new_tokens": 10},
    },
    "gkd_reverse_kl": {
        "method": "kd",
        "kd_weight": 1.0,
        "ce_weight": 0.0,
        "kd": {"kind": "reverse_kl", "teacher": "online", "lmbda": 0.5, "rollout_max_new_tokens": 10},
    },
    # The GKD and MiniLLM papers start on-policy training from an SFT student: half the budget SFT, half GKD from it.
    "sft_then_gkd": {"then": "gkd_forward_kl", "first": "sft"},
    "cross_tokenizer_uld": {"method": "kd", "kd_weight": 1.0, "ce_weight": 0.5, "kd": {"align": "uld"}, "bpe": True},
    "cross_tokenizer_byte": {"method": "kd", "kd_weight": 1.0, "ce_weight": 0.5, "kd": {"align": "byte"}, "bpe": True},
}
WHITE_BOX = [name for name in METHODS if name != "sft"]
CHAINED = {name: (method["first"], method["then"]) for name, method in METHODS.items() if "then" in method}


# ---------------------------------------------------------------------------------------------------------- tasks
def _letters(rng: random.Random, low: int = 3, high: int = 6) -> str:
    return "".join(rng.sample(string.ascii_lowercase, rng.randint(low, high)))


def make_prompt(rng: random.Random) -> dict:
    """One row: prompt, task, and every valid answer (a one-element list for one-answer tasks)."""
    task = rng.choice(TASK_NAMES)
    if task == "pick_letter":
        word = _letters(rng)
        return {"prompt": f"pick a letter: {word}", "task": task, "answers": list(word)}
    if task == "number_range":
        low = rng.randint(10, 90)
        high = min(99, low + rng.randint(2, 8))
        return {
            "prompt": f"a number from {low} to {high}",
            "task": task,
            "answers": [str(n) for n in range(low, high + 1)],
        }
    word = _letters(rng)
    answer = "".join(sorted(word)) if task == "sort_letters" else word[::-1]
    return {
        "prompt": f"{'sort letters' if task == 'sort_letters' else 'reverse'}: {word}",
        "task": task,
        "answers": [answer],
    }


def valid_answers(prompt: str) -> list[str]:
    """The valid answers of a prompt, recomputed from its text."""
    head, _, rest = prompt.partition(": ")
    if head == "pick a letter":
        return list(rest)
    if prompt.startswith("a number from "):
        low, high = (int(part) for part in prompt.removeprefix("a number from ").split(" to "))
        return [str(n) for n in range(low, high + 1)]
    return ["".join(sorted(rest)) if head == "sort letters" else rest[::-1]]


# -------------------------------------------------------------------------------------------------------- teacher
def train_teacher(folder: Path, steps: int, seed: int = TEACHER_SEED) -> dict:
    """The demo teacher's shape and loop, on this task mix; answers of several-answer prompts drawn uniformly."""
    from transformers import GenerationConfig, LlamaForCausalLM

    from stillhouse.demo.tokenizer import build_char_tokenizer
    from stillhouse.demo.train_teacher import teacher_config, train_loop

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    tokenizer = build_char_tokenizer()
    model = LlamaForCausalLM(teacher_config(len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id))
    stream = random.Random(seed)

    def draw_rows() -> list[dict]:  # answers of several-answer prompts drawn uniformly
        rows = [make_prompt(stream) for _ in range(64)]
        return [{"prompt": row["prompt"], "reference": stream.choice(row["answers"])} for row in rows]

    started = time.perf_counter()
    train_loop(
        model,
        tokenizer,
        draw_rows,
        steps=steps,
        lr=3e-3,
        log_every=250,
        log=lambda line: print(f"teacher {line}", file=sys.stderr),
    )
    model.generation_config = GenerationConfig(
        max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id
    )
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# distill_quality benchmark teacher\n")
    record = {"steps": steps, "seed": seed, "train_seconds": round(time.perf_counter() - started, 1)}
    (folder / "training_record.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def bpe_student(folder: Path, seed: int) -> Path:
    """A random Llama student (the same shape) with a byte-level BPE tokenizer and ChatML: another vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from stillhouse.demo.tiny_models import bpe_tokenizer

    if (folder / "config.json").is_file():
        return folder
    rng = random.Random(99)
    texts = [f"{row['prompt']}\n{' '.join(row['answers'])}" for row in (make_prompt(rng) for _ in range(3000))]
    tokenizer = bpe_tokenizer(texts, vocab_size=300)
    torch.manual_seed(seed)
    shape = STUDENT_SHAPE
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=shape["hidden_size"],
            intermediate_size=shape["intermediate_size"],
            num_hidden_layers=shape["num_layers"],
            num_attention_heads=shape["num_heads"],
            num_key_value_heads=shape["num_heads"],
            max_position_embeddings=128,
            tie_word_embeddings=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=None,
        )
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# random BPE student\n")
    return folder


# ------------------------------------------------------------------------------------------------------- measures
def answer_logprobs(model, tokenizer, prompts: list[str], answers: list[list[str]]) -> list[list[float]]:
    """log p(answer + EOS | chat prompt) of every candidate answer, in the model's own tokens."""
    from stillhouse.sampling.hf_engine import render_prompts

    rendered = render_prompts(tokenizer, [[{"role": "user", "content": prompt}] for prompt in prompts])
    pairs = []
    for index, (prompt, candidates) in enumerate(zip(rendered, answers)):
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        for candidate in candidates:
            answer_ids = tokenizer(candidate, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            pairs.append((index, prompt_ids, answer_ids))
    scores: list[list[float]] = [[] for _ in prompts]
    with torch.inference_mode():
        for start in range(0, len(pairs), 256):
            chunk = pairs[start : start + 256]
            width = max(len(p) + len(a) for _, p, a in chunk)
            ids = torch.full((len(chunk), width), tokenizer.pad_token_id)
            mask = torch.zeros_like(ids)
            for row, (_, prompt_ids, answer_ids) in enumerate(chunk):
                sequence = prompt_ids + answer_ids
                ids[row, : len(sequence)] = torch.tensor(sequence)
                mask[row, : len(sequence)] = 1
            logprobs = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
            for row, (index, prompt_ids, answer_ids) in enumerate(chunk):
                positions = torch.arange(len(prompt_ids) - 1, len(prompt_ids) + len(answer_ids) - 1)
                scores[index].append(float(logprobs[row, positions, torch.tensor(answer_ids)].sum()))
    return scores


def answer_kl(teacher_scores: list[list[float]], student_scores: list[list[float]]) -> float:
    """Mean KL(teacher || student) over {each valid answer, everything else}, per prompt."""
    total = 0.0
    for teacher_row, student_row in zip(teacher_scores, student_scores):
        p = [math.exp(value) for value in teacher_row]
        q = [math.exp(value) for value in student_row]
        p.append(max(0.0, 1.0 - sum(p)))
        q.append(max(0.0, 1.0 - sum(q)))
        total += sum(pi * (math.log(pi) - math.log(max(qi, 1e-12))) for pi, qi in zip(p, q) if pi > 0)
    return total / max(1, len(teacher_scores))


def exact_match(model, tokenizer, rows) -> dict[str, float]:
    """Share of held-out prompts whose greedy answer is valid, overall and per task."""
    from stillhouse.sampling.hf_engine import generate, render_prompts

    prompts = render_prompts(tokenizer, [[{"role": "user", "content": row.prompt}] for row in rows])
    generations = generate(model, tokenizer, prompts, max_new_tokens=12, batch_size=128)
    hits: dict[str, list[bool]] = {task: [] for task in TASK_NAMES}
    for row, generation in zip(rows, generations):
        hits[row.category].append(generation.text.strip() in valid_answers(row.prompt))
    scores = {task: sum(values) / len(values) for task, values in hits.items() if values}
    scores["overall"] = sum(sum(values) for values in hits.values()) / len(rows)
    return scores


def held_out_rows(frame) -> list[SimpleNamespace]:
    """(prompt text, category) of a curated split's rows."""
    return [
        SimpleNamespace(prompt=json.loads(messages)[-1]["content"], category=category)
        for messages, category in zip(frame["messages"], frame["category"])
    ]


def mean_ci95(values: list[float]) -> tuple[float, float | None]:
    """Mean and the half-width of its 95% Student-t interval (None from one value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None
    t = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776}.get(len(values), 1.96)
    return mean, t * statistics.stdev(values) / math.sqrt(len(values))


# ------------------------------------------------------------------------------------------------------ the runs
def timed_training(config, dataset, samples, run_store):
    """The student, the (CPU seconds, fraction done) marks of its progress, and the stage's CPU seconds.

    CPU time of this process, not wall clock: the runs are single-threaded, so it is what the wall clock would read on
    an idle machine, and a machine shared with other jobs doesn't hand one method more steps than another (measured
    wall-clock pilots did, by up to 1.7x)."""
    from stillhouse.training.stage import train_student

    marks: list[tuple[float, float]] = []
    started = time.process_time()
    student = train_student(
        config, dataset, samples, run_store, progress=lambda f: marks.append((time.process_time(), f))
    )
    return student, marks, time.process_time() - started


def run_job(job: dict) -> dict:
    """One training run in a worker process: a pilot (``steps`` only) or a full run evaluated on the held-out split."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stillhouse.config import TrainConfig
    from stillhouse.store import Store

    torch.set_num_threads(job["threads"])
    config = TrainConfig.model_validate(job["train"])
    with tempfile.TemporaryDirectory(dir=job["cache"]) as scratch:
        student, marks, cpu_seconds = timed_training(config, job["dataset"], job["samples"], Store(Path(scratch)))
        if job.get("then"):  # the second phase of a chained method starts from the first one's student
            first_seconds, first_steps = student.train_seconds, config.max_steps
            second = {key: value for key, value in job["then"].items() if key != "architecture"}
            config = TrainConfig.model_validate({**second, "student": student.model_path})
            student, _, more_cpu_seconds = timed_training(config, job["dataset"], job["samples"], Store(Path(scratch)))
            cpu_seconds += more_cpu_seconds
            student = student.model_copy(update={"train_seconds": round(first_seconds + student.train_seconds, 2)})
            config = config.model_copy(update={"max_steps": first_steps + config.max_steps})
        if job["kind"] == "pilot":
            # Seconds per optimizer step in steady state (from the progress marks, startup excluded).
            (t0, f0), (t1, f1) = marks[len(marks) // 4], marks[-1]
            return {
                **job["key"],
                "kind": "pilot",
                "seconds_per_step": (t1 - t0) / max(1e-9, (f1 - f0) * config.max_steps),
            }
        model = AutoModelForCausalLM.from_pretrained(student.model_path).eval()
        tokenizer = AutoTokenizer.from_pretrained(student.model_path)
        em = exact_match(model, tokenizer, job["held_out"])
        scores = answer_logprobs(model, tokenizer, [row.prompt for row in job["several"]], job["candidates"])
    return {
        **job["key"],
        "kind": "run",
        "exact_match": em,
        "kl": answer_kl(job["teacher_scores"], scores),
        "optimizer_steps": config.max_steps,
        "train_seconds": student.train_seconds,
        "train_cpu_seconds": round(cpu_seconds, 1),
    }


def run_jobs(jobs: list[dict], workers: int) -> list[dict]:
    """Run ``jobs`` on ``workers`` processes (one torch thread each), printing each result as it arrives."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    if workers == 1:
        results = []
        for job in jobs:
            results.append(run_job(job))
            print(f"  {json.dumps(results[-1])}", file=sys.stderr)
        return results
    results = []
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for future in as_completed([pool.submit(run_job, job) for job in jobs]):
            results.append(future.result())
            print(f"  {json.dumps(results[-1])}", file=sys.stderr)
    return results


def summarize(runs: list[dict]) -> dict:
    """Means and 95% intervals of one method's runs at one budget."""
    em_mean, em_ci = mean_ci95([run["exact_match"]["overall"] for run in runs])
    kl_mean, kl_ci = mean_ci95([run["kl"] for run in runs])
    return {
        "exact_match_mean": round(100 * em_mean, 2),
        "exact_match_ci95": None if em_ci is None else round(100 * em_ci, 2),
        "kl_mean": round(kl_mean, 4),
        "kl_ci95": None if kl_ci is None else round(kl_ci, 4),
        "train_seconds": round(statistics.fmean(run["train_seconds"] for run in runs), 1),
        "train_cpu_seconds": round(statistics.fmean(run["train_cpu_seconds"] for run in runs), 1),
        "optimizer_steps": runs[0]["optimizer_steps"],
        "exact_match_by_task": {
            task: round(100 * statistics.fmean(run["exact_match"][task] for run in runs), 2)
            for task in TASK_NAMES
            if task in runs[0]["exact_match"]
        },
        "runs": sorted(runs, key=lambda run: run["seed"]),
    }


def plot_curves(by_budget: dict[str, dict[str, dict]], path: Path) -> None:
    """Held-out exact match against training seconds, one line per method, 95% intervals as bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.2))
    methods = list(next(iter(by_budget.values())))
    for name in methods:
        # x: the CPU seconds the runs actually trained (the pilots' estimate of a step sets the steps of a budget)
        points = [summary[name] for summary in by_budget.values() if name in summary]
        axes.errorbar(
            [point["train_cpu_seconds"] for point in points],
            [point["exact_match_mean"] for point in points],
            yerr=[point["exact_match_ci95"] or 0 for point in points],
            marker="o",
            capsize=3,
            label=name,
            linestyle="--" if name == "sft" else "-",
        )
    axes.set_xlabel("training CPU seconds per run (one thread), mean of seeds")
    axes.set_ylabel("held-out exact match (%)")
    axes.set_ylim(0, 100)
    axes.set_title("distill_quality: equal training budgets, mean of seeds, 95% intervals")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def log_to_mlflow(output: dict, files: list[Path], uri: str) -> str:
    """One MLflow run holding the table (metrics per method and budget, step = budget seconds) and the files."""
    import mlflow

    from stillhouse.registry.tracking import ensure_experiment

    experiment_id = ensure_experiment("benchmark-distill_quality", uri)
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"distill_quality · {output['date']}") as run:
        mlflow.log_params(
            {
                "seeds": output["seeds"],
                "budgets_seconds": ",".join(output["by_budget"]),
                "methods": ",".join(output["methods"]),
                "machine": output["machine"],
            }
        )
        for budget, summary in output["by_budget"].items():
            for name, figures in summary.items():
                step = int(float(budget))
                mlflow.log_metric(f"{name}.exact_match_mean", figures["exact_match_mean"], step=step)
                mlflow.log_metric(f"{name}.kl_mean", figures["kl_mean"], step=step)
        if output["best_white_box_minus_sft"] is not None:
            mlflow.log_metric("best_white_box_minus_sft", output["best_white_box_minus_sft"])
        for file in files:
            mlflow.log_artifact(str(file))
        return run.info.run_id


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, one 60 s budget")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--budgets",
        default="30,60,120",
        help="training seconds (one-thread CPU time) per run, comma-separated; the table is the largest",
    )
    parser.add_argument("--rows", type=int, default=3000, help="prompts generated (10%% held out)")
    parser.add_argument("--teacher-steps", type=int, default=1200)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS))
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="training runs at once, one thread each")
    parser.add_argument("--cache", type=Path, default=Path(".stillhouse/benchmarks/distill_quality"))
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here, and the plot beside it")
    parser.add_argument(
        "--tracking-uri",
        default="sqlite:///.stillhouse/mlflow.db",
        help="MLflow to log the table and plot to (experiment benchmark-distill_quality); 'none' skips it",
    )
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.budgets = 1, "60"
    budgets = sorted(float(budget) for budget in args.budgets.split(","))

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stillhouse.config import CurateConfig, SampleConfig
    from stillhouse.data.curate import curate, read_split
    from stillhouse.sampling.sample import sample_teacher
    from stillhouse.store import Store

    torch.set_num_threads(1)
    args.cache.mkdir(parents=True, exist_ok=True)
    teacher_dir = args.cache / f"teacher-seed{TEACHER_SEED}-steps{args.teacher_steps}"
    if not (teacher_dir / "config.json").is_file():
        print(f"training the benchmark teacher into {teacher_dir} (first run only)", file=sys.stderr)
        train_teacher(teacher_dir, args.teacher_steps)
    prompts_file = args.cache / f"prompts-{args.rows}.jsonl"
    if not prompts_file.is_file():
        rng = random.Random(12345)  # not the teacher's stream
        rows = [make_prompt(rng) for _ in range(args.rows)]
        prompts_file.write_text(
            "".join(
                json.dumps({"prompt": r["prompt"], "reference": r["answers"][0], "task": r["task"]}) + "\n"
                for r in rows
            )
        )

    store = Store(args.cache / "store")
    dataset = curate(CurateConfig(source=str(prompts_file), category_column="task", eval_fraction=0.1), store)
    samples = sample_teacher(
        SampleConfig(teacher=str(teacher_dir), max_new_tokens=12, temperature=1.0, top_k_logprobs=16, batch_size=128),
        dataset,
        store,
    )
    held_out = held_out_rows(read_split(dataset, "eval"))
    train_prompts = {row.prompt for row in held_out_rows(read_split(dataset, "train"))}
    assert not train_prompts & {row.prompt for row in held_out}, "a held-out prompt is in the training split"
    several = [row for row in held_out if row.category in SEVERAL_ANSWERS]
    candidates = [valid_answers(row.prompt) for row in several]

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    teacher_tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    teacher_scores = answer_logprobs(teacher, teacher_tokenizer, [row.prompt for row in several], candidates)
    teacher_figures = {
        "exact_match": exact_match(teacher, teacher_tokenizer, held_out),
        "parameters": sum(p.numel() for p in teacher.parameters()),
        "size_mb": round((teacher_dir / "model.safetensors").stat().st_size / 1e6, 2),
        # How spread the teacher is on several-answer prompts: its probability of its own top answer.
        "top_answer_probability": statistics.fmean(math.exp(max(row)) for row in teacher_scores),
        "valid_answer_mass": statistics.fmean(sum(math.exp(v) for v in row) for row in teacher_scores),
    }
    print(f"teacher: {json.dumps(teacher_figures)}", file=sys.stderr)

    base_train = {
        "architecture": STUDENT_SHAPE,
        "batch_size": 64,
        "learning_rate": 3e-3,
        "lr_scheduler": "cosine",
        "warmup_ratio": 0.05,
        "threads": 1,
        "device": "cpu",
        "logging_steps": 50,
    }
    names = [name for name in args.methods.split(",") if name]
    for seed in range(args.seeds):  # made here, before the workers could race to write them
        if any(METHODS[name].get("bpe") for name in names):
            bpe_student(args.cache / f"bpe-student-seed{seed}", seed)

    def train_config(name: str, seed: int, steps: int) -> dict:
        changes = dict(METHODS[name])
        changes.pop("bpe", None)
        raw = {**base_train, **changes, "max_steps": steps, "seed": seed}
        if METHODS[name].get("bpe"):
            raw.pop("architecture")
            raw["student"] = str(args.cache / f"bpe-student-seed{seed}")
        return raw

    shared = {"cache": str(args.cache), "threads": 1, "dataset": dataset, "samples": samples}
    pilot_steps = 40
    # Finished pilots and runs are kept in runs.jsonl and reused by a rerun with the same settings (one that adds a
    # method or a seed runs only what is new): the whole benchmark is most of an hour on two cores.
    record = args.cache / f"runs-rows{args.rows}-teacher{args.teacher_steps}.jsonl"
    done = [json.loads(line) for line in record.read_text().splitlines() if line.strip()] if record.is_file() else []

    def identity(kind: str, key: dict) -> str:
        return json.dumps({"kind": kind, **{name: key.get(name) for name in ("method", "budget", "seed", "steps")}})

    def run_new(jobs: list[dict]) -> list[dict]:
        known = {identity(result["kind"], result): result for result in done}
        results = [
            known[identity(job["kind"], job["key"])] for job in jobs if identity(job["kind"], job["key"]) in known
        ]
        if results:
            print(f"reusing {len(results)} finished {jobs[0]['kind']}s from {record}", file=sys.stderr)
        for result in run_jobs([job for job in jobs if identity(job["kind"], job["key"]) not in known], args.jobs):
            results.append(result)
            with record.open("a") as file:
                file.write(json.dumps(result) + "\n")
        return results

    piloted = sorted({part for name in names for part in CHAINED.get(name, (name,))})
    pilots = run_new(
        [
            {
                **shared,
                "kind": "pilot",
                "key": {"method": name, "steps": pilot_steps},
                "train": train_config(name, 0, pilot_steps),
            }
            for name in piloted
        ]
    )
    seconds_per_step = {pilot["method"]: pilot["seconds_per_step"] for pilot in pilots}

    def steps_for(name: str, budget: float) -> int:
        return max(20, int(budget / seconds_per_step[name]))

    def run_job_of(name: str, budget: float, seed: int) -> dict:
        if name in CHAINED:
            first, then = CHAINED[name]
            steps = (steps_for(first, budget / 2), steps_for(then, budget / 2))
            return {
                "train": train_config(first, seed, steps[0]),
                "then": train_config(then, seed, steps[1]),
                "steps": sum(steps),
            }
        return {"train": train_config(name, seed, steps_for(name, budget)), "steps": steps_for(name, budget)}

    evaluation = {"held_out": held_out, "several": several, "candidates": candidates, "teacher_scores": teacher_scores}
    jobs = []
    # Longest first: the pool's last minutes aren't one long run on one core while the other idles.
    for budget in sorted(budgets, reverse=True):
        for name in names:
            for seed in range(args.seeds):
                planned = run_job_of(name, budget, seed)
                jobs.append(
                    {
                        **shared,
                        **evaluation,
                        "kind": "run",
                        "key": {"method": name, "budget": budget, "seed": seed, "steps": planned.pop("steps")},
                        **planned,
                    }
                )
    runs = run_new(jobs)
    for name in CHAINED:
        if name in names:
            first, then = CHAINED[name]
            seconds_per_step[name] = (seconds_per_step[first] + seconds_per_step[then]) / 2
    by_budget = {
        f"{budget:g}": {
            name: {
                **summarize([run for run in runs if run["method"] == name and run["budget"] == budget]),
                "pilot_seconds_per_step": round(seconds_per_step[name], 4),
            }
            for name in names
        }
        for budget in budgets
    }
    table = by_budget[f"{budgets[-1]:g}"]
    white_box = [name for name in names if name in WHITE_BOX]
    best = max(white_box, key=lambda name: table[name]["exact_match_mean"]) if white_box else None
    output = {
        "benchmark": "distill_quality",
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {args.jobs} runs at once, one torch thread each",
        "load_average_at_end": round(os.getloadavg()[0], 2),
        "seeds": args.seeds,
        "budget_seconds": budgets[-1],
        "exact_match_unit": "percent of held-out prompts whose greedy answer is valid",
        "kl_unit": "nats, KL(teacher||student) over whole answers of the several-answer prompts",
        "held_out_prompts": len(held_out),
        "train_prompts": len(train_prompts),
        "teacher": teacher_figures,
        "methods": table,
        "by_budget": {
            budget: {name: {k: v for k, v in figures.items() if k != "runs"} for name, figures in summary.items()}
            for budget, summary in by_budget.items()
        },
        "best_white_box": best,
        "best_white_box_minus_sft": round(table[best]["exact_match_mean"] - table["sft"]["exact_match_mean"], 2)
        if best and "sft" in table
        else None,
        "best_white_box_minus_sft_by_budget": {
            budget: round(
                max(summary[name]["exact_match_mean"] for name in white_box) - summary["sft"]["exact_match_mean"], 2
            )
            for budget, summary in by_budget.items()
        }
        if white_box and "sft" in names
        else None,
    }
    files = []
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(output, indent=2) + "\n")
        plot = args.out.with_suffix(".png")
        plot_curves(by_budget, plot)
        files = [args.out, plot]
    else:
        plot = args.cache / "distill_quality.png"
        plot_curves(by_budget, plot)
        files = [plot]
    if args.tracking_uri != "none":
        output["mlflow_run_id"] = log_to_mlflow(output, files, args.tracking_uri)
    print(f"plot: {plot}", file=sys.stderr)
    print(json.dumps(output))


if __name__ == "__main__":
    main()
