"""The evaluation report: a comparison table and plots, as Markdown + PNG + HTML, and as a rich table.

Files written into ``<evaluate stage folder>/report/``:
- ``report.md`` and ``report.html``: the teacher / student (/ baseline) comparison, per-category accuracy, benchmarks;
- ``loss_curve.png`` (the training loss from `ModelRef.loss_history`), ``kl_by_position.png``,
  ``accuracy.png`` (teacher / student / baseline bars), ``categories.png`` (per-category exact match).

    from stillhouse.evaluation.report import comparison_table
    rich.console.Console().print(comparison_table(report.metrics, title="teacher vs student"))
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

ROLES = ("teacher", "student", "baseline")
PERCENT, DECIMAL, COUNT = "{:.1%}", "{:.4g}", "{:,.0f}"

# (label, metric name per role, format, the student/teacher ratio metric if there is one). Every label ends with the
# metric's name as MLflow and the gate know it (`<role>_exact_match`), so the terminal, the report and the model card
# (which all render these rows) name a metric the same way.
ROWS: list[tuple[str, dict[str, str], str, str | None]] = [
    (f"{label} ({suffix})", {role: f"{role}_{suffix}" for role in ROLES}, fmt, ratio_metric)
    for label, suffix, fmt, ratio_metric in [
        ("exact match vs references", "exact_match", PERCENT, "accuracy_ratio_to_teacher"),
        ("ROUGE-L vs references", "rouge_l_reference", "{:.3f}", None),
        ("ROUGE-L vs teacher answers", "rouge_l_teacher", "{:.3f}", None),
        ("answer agrees with teacher", "teacher_agreement", PERCENT, None),
        ("judged win rate vs teacher", "win_rate", PERCENT, None),
        ("judged win rate vs baseline", "win_rate_vs_baseline", PERCENT, None),
        ("top-1 token agrees with teacher", "top1_agreement", PERCENT, None),
        ("perplexity on teacher responses", "perplexity", "{:.3f}", None),
        ("perplexity on references", "reference_perplexity", "{:.3f}", None),
        ("generation tokens/s", "tokens_per_second", "{:,.1f}", "speed_ratio"),
        ("latency per prompt (s)", "latency_seconds", "{:.3f}", "latency_ratio"),
        ("parameters", "parameters", COUNT, "parameter_ratio"),
        ("weights on disk (MB)", "size_mb", "{:,.2f}", "size_ratio"),
    ]
]
ROWS.insert(
    5,
    (
        "KL(teacher‖model) per token (kl_teacher_*)",
        {"student": "kl_teacher_student", "baseline": "kl_teacher_baseline"},
        "{:.4f}",
        None,
    ),
)


def _format(value: float | None, fmt: str) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt.format(value)


def categories(metrics: dict[str, float]) -> list[str]:
    return sorted({name.split("/", 1)[1] for name in metrics if name.startswith("student_exact_match/")})


def roles_present(metrics: dict[str, float]) -> list[str]:
    return [role for role in ROLES if f"{role}_parameters" in metrics or any(k.startswith(f"{role}_") for k in metrics)]


def comparison_rows(metrics: dict[str, float]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the comparison: one row per metric present, a column per role, and student/teacher."""
    roles = roles_present(metrics)
    header = ["metric", *roles, "student / teacher"]
    rows = []
    for label, names, fmt, ratio_metric in ROWS:
        if not any(names.get(role) in metrics for role in roles):
            continue
        ratio = metrics.get(ratio_metric) if ratio_metric else None
        rows.append(
            [label, *(_format(metrics.get(names.get(role, "")), fmt) for role in roles), _format(ratio, "{:.1%}")]
        )
    for category in categories(metrics):
        rows.append(
            [
                f"exact match · {category} (exact_match/{category})",
                *(_format(metrics.get(f"{role}_exact_match/{category}"), PERCENT) for role in roles),
                "",
            ]
        )
    benchmarks = sorted({name.split("_lm_eval/", 1)[1] for name in metrics if "_lm_eval/" in name})
    for benchmark in benchmarks:
        rows.append(
            [
                f"lm_eval · {benchmark} (lm_eval/{benchmark})",
                *(_format(metrics.get(f"{role}_lm_eval/{benchmark}"), "{:.4g}") for role in roles),
                "",
            ]
        )
    return header, rows


def comparison_table(metrics: dict[str, float], title: str = "Evaluation", verdict=None):
    """A rich `Table` comparing teacher, student (and baseline) for the terminal; with a `GateVerdict`,
    its caption says the outcome."""
    from rich.table import Table

    header, rows = comparison_rows(metrics)
    table = Table(title=title)
    for index, name in enumerate(header):
        table.add_column("" if index == 0 else name, justify="left" if index == 0 else "right")
    for row in rows:
        table.add_row(*row)
    if verdict is not None:
        table.caption = gate_summary(verdict)
        table.caption_style = "green" if verdict.passed else "bold red"
    return table


def gate_summary(verdict) -> str:
    """One or more lines: passed (and promoted or not), or every failed threshold."""
    if verdict.passed:
        where = f" → version {verdict.candidate_version} is now champion" if verdict.promoted else ""
        return f"gate passed{where}"
    return "gate FAILED (not promoted, not published):\n" + "\n".join(f"  - {failure}" for failure in verdict.failures)


def gate_markdown(verdict) -> str:
    lines = [
        f"## Promotion gate: {'passed' if verdict.passed else 'FAILED'}",
        "",
        f"- candidate version: {verdict.candidate_version or '(not registered)'}",
        f"- champion version before the gate: {verdict.champion_version or '(none)'}",
        f"- promoted to champion: {'yes' if verdict.promoted else 'no'}",
        "",
        "| check |",
        "|---|",
    ]
    lines += [f"| {check} |" for check in verdict.checks] or ["| (no thresholds set) |"]
    return "\n".join(lines) + "\n"


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def report_markdown(
    metrics: dict[str, float], title: str, images: list[str] = (), eval_prompts: int | None = None
) -> str:
    header, rows = comparison_rows(metrics)
    parts = [f"# {title}", ""]
    if eval_prompts is not None:
        parts += [f"{eval_prompts} held-out prompts, the same for every model.", ""]
    parts += [_markdown_table(header, rows), ""]
    parts += [f"![{Path(image).stem}]({image})\n" for image in images]
    return "\n".join(parts)


def report_html(
    metrics: dict[str, float],
    title: str,
    images: list[str] = (),
    eval_prompts: int | None = None,
    folder: Path | None = None,
) -> str:
    """The report as one HTML file; with ``folder``, the PNGs in it are embedded (data URIs), so the file shows them
    wherever it is opened alone: MLflow's artifact viewer serves it without its neighbours."""
    header, rows = comparison_rows(metrics)
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)

    def source(image: str) -> str:
        if folder is None:
            return html.escape(image)
        return "data:image/png;base64," + base64.b64encode((folder / image).read_bytes()).decode("ascii")

    figures = "".join(f'<figure><img src="{source(i)}" alt="{html.escape(Path(i).stem)}"></figure>' for i in images)
    note = f"<p>{eval_prompts} held-out prompts, the same for every model.</p>" if eval_prompts is not None else ""
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
        "body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:.3em .6em}td:not(:first-child){text-align:right}img{max-width:100%}"
        f"</style></head><body><h1>{html.escape(title)}</h1>{note}<table><tr>{cells}</tr>{body}</table>{figures}</body></html>\n"
    )


def plot_loss_curve(loss_history: list[dict[str, float]], path: Path) -> bool:
    points = [p for p in loss_history if "step" in p]
    series = sorted({key for point in points for key in point if key != "step"})
    if not points or not series:
        return False
    figure, axes = _figure()
    # The learning rate is orders of magnitude below a loss: on the loss axis it would lie flat on zero.
    rate_axes = axes.twinx() if "learning_rate" in series else None
    lines = []
    for key in series:
        steps = [p["step"] for p in points if key in p]
        target = rate_axes if key == "learning_rate" else axes
        style = {"linestyle": "--", "color": "grey"} if key == "learning_rate" else {"marker": "o", "markersize": 3}
        lines += target.plot(steps, [p[key] for p in points if key in p], label=key, **style)
    axes.set(xlabel="optimizer step", ylabel="loss", title="Training loss")
    if rate_axes is not None:
        rate_axes.set_ylabel("learning rate")
    axes.legend(lines, [line.get_label() for line in lines])
    return _save(figure, path)


def plot_kl_by_position(kl_by_position: dict[str, list[float]], path: Path) -> bool:
    if not any(kl_by_position.values()):
        return False
    figure, axes = _figure()
    for role, values in kl_by_position.items():
        axes.plot(range(len(values)), values, label=role)
    axes.set(xlabel="response token position", ylabel="KL(teacher‖model), nats", title="Token KL by position")
    axes.legend()
    return _save(figure, path)


def plot_bars(groups: dict[str, dict[str, float]], path: Path, title: str, ylabel: str) -> bool:
    """Grouped bars: ``groups[label][role] = value``."""
    groups = {label: values for label, values in groups.items() if values}
    if not groups:
        return False
    roles = [role for role in ROLES if any(role in values for values in groups.values())]
    figure, axes = _figure(width=max(6.0, 1.2 * len(groups) + 2))
    width = 0.8 / len(roles)
    for offset, role in enumerate(roles):
        xs = [index + offset * width for index in range(len(groups))]
        axes.bar(xs, [values.get(role, 0.0) for values in groups.values()], width, label=role)
    axes.set_xticks(
        [index + width * (len(roles) - 1) / 2 for index in range(len(groups))], list(groups), rotation=20, ha="right"
    )
    axes.set(ylabel=ylabel, title=title, ylim=(0, 1.05))
    axes.legend()
    return _save(figure, path)


def _figure(width: float = 6.0):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, 3.6), dpi=100)


def _save(figure, path: Path) -> bool:
    import matplotlib.pyplot as plt

    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return True


def write_report(
    folder: Path,
    metrics: dict[str, float],
    *,
    title: str,
    loss_history: list[dict[str, float]],
    kl_by_position: dict[str, list[float]],
    eval_prompts: int | None = None,
) -> list[Path]:
    """Write the report's Markdown, HTML and PNG files into ``folder``; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    images = []
    if plot_loss_curve(loss_history, folder / "loss_curve.png"):
        images.append("loss_curve.png")
    if plot_kl_by_position(kl_by_position, folder / "kl_by_position.png"):
        images.append("kl_by_position.png")
    share_metrics = {
        "exact match": "exact_match",
        "ROUGE-L vs references": "rouge_l_reference",
        "ROUGE-L vs teacher": "rouge_l_teacher",
        "answer agreement": "teacher_agreement",
        "top-1 token agreement": "top1_agreement",
        "judged win rate vs teacher": "win_rate",
    }
    bars = {
        label: {role: metrics[f"{role}_{key}"] for role in ROLES if f"{role}_{key}" in metrics}
        for label, key in share_metrics.items()
    }
    if plot_bars(bars, folder / "accuracy.png", "Accuracy and agreement", "share"):
        images.append("accuracy.png")
    per_category = {
        category: {
            role: metrics[f"{role}_exact_match/{category}"]
            for role in ROLES
            if f"{role}_exact_match/{category}" in metrics
        }
        for category in categories(metrics)
    }
    if plot_bars(per_category, folder / "categories.png", "Exact match by category", "exact match"):
        images.append("categories.png")
    (folder / "report.md").write_text(report_markdown(metrics, title, images, eval_prompts))
    (folder / "report.html").write_text(report_html(metrics, title, images, eval_prompts, folder=folder))
    return [folder / name for name in ("report.md", "report.html", *images)]
