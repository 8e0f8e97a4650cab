"""The report: Markdown, HTML and PNG files with the metrics' numbers, and the terminal table."""

import base64
import re

from rich.console import Console

from stillhouse.evaluation.gate import GateVerdict
from stillhouse.evaluation.report import (
    comparison_rows,
    comparison_table,
    gate_summary,
    write_report,
)

METRICS = {
    "teacher_exact_match": 0.8,
    "student_exact_match": 0.6,
    "baseline_exact_match": 0.1,
    "accuracy_ratio_to_teacher": 0.75,
    "teacher_exact_match/reverse": 1.0,
    "student_exact_match/reverse": 0.5,
    "baseline_exact_match/reverse": 0.0,
    "teacher_perplexity": 1.5,
    "student_perplexity": 2.25,
    "kl_teacher_student": 0.1234,
    "student_teacher_agreement": 0.7,
    "teacher_parameters": 1000.0,
    "student_parameters": 250.0,
    "baseline_parameters": 250.0,
    "parameter_ratio": 0.25,
    "teacher_tokens_per_second": 100.0,
    "student_tokens_per_second": 300.0,
    "speed_ratio": 3.0,
    "student_lm_eval/tiny/acc": 0.5,
    "teacher_lm_eval/tiny/acc": 0.75,
}


def test_comparison_rows_put_each_role_in_its_column():
    header, rows = comparison_rows(METRICS)
    assert header == ["metric", "teacher", "student", "baseline", "student / teacher"]
    by_label = {row[0]: row[1:] for row in rows}
    assert by_label["exact match vs references (exact_match)"] == ["80.0%", "60.0%", "10.0%", "75.0%"]
    assert by_label["KL(teacher‖model) per token (kl_teacher_*)"] == ["", "0.1234", "", ""]
    assert by_label["parameters (parameters)"] == ["1,000", "250", "250", "25.0%"]
    assert by_label["generation tokens/s (tokens_per_second)"][-1] == "300.0%"
    assert by_label["exact match · reverse (exact_match/reverse)"] == ["100.0%", "50.0%", "0.0%", ""]
    assert by_label["lm_eval · tiny/acc (lm_eval/tiny/acc)"] == ["0.75", "0.5", "", ""]
    assert "ROUGE-L vs references" not in by_label  # not computed, not shown


def test_write_report_writes_markdown_html_and_plots(tmp_path):
    files = write_report(
        tmp_path / "report",
        METRICS,
        title="tiny",
        loss_history=[{"step": 2, "loss": 3.0}, {"step": 4, "loss": 2.0}],
        kl_by_position={"student": [0.3, 0.2, 0.1]},
        eval_prompts=12,
    )
    assert {p.name for p in files} == {
        "report.md",
        "report.html",
        "loss_curve.png",
        "kl_by_position.png",
        "accuracy.png",
        "categories.png",
    }
    assert all(p.stat().st_size > 0 for p in files)
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in files if p.suffix == ".png")
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert (
        "| exact match vs references (exact_match) | 80.0% | 60.0% | 10.0% | 75.0% |" in markdown
        and "![loss_curve](loss_curve.png)" in markdown
    )
    assert "12 held-out prompts" in markdown
    page = (tmp_path / "report" / "report.html").read_text()
    assert "<td>0.1234</td>" in page
    # The images travel inside the page (MLflow's artifact viewer serves report.html alone).
    embedded = re.findall(r'<img src="data:image/png;base64,([^"]+)"', page)
    assert len(embedded) == 4 and 'src="loss_curve.png"' not in page
    assert base64.b64decode(embedded[0]) == (tmp_path / "report" / "loss_curve.png").read_bytes()


def test_the_learning_rate_has_its_own_axis_in_the_loss_curve(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from stillhouse.evaluation import report

    history = [{"step": s, "loss": 4.0 - s / 10, "learning_rate": 3e-3 * (1 - s / 20)} for s in range(1, 20)]
    created = []
    original = report._save

    def keep_axes(figure, path):
        created.append([(axes.get_ylabel(), [line.get_label() for line in axes.get_lines()]) for axes in figure.axes])
        return original(figure, path)

    report._save = keep_axes
    try:
        assert report.plot_loss_curve(history, tmp_path / "loss.png")
    finally:
        report._save = original
    plt.close("all")
    assert created == [[("loss", ["loss"]), ("learning rate", ["learning_rate"])]]


def test_a_report_without_training_history_or_kl_skips_those_plots(tmp_path):
    files = write_report(
        tmp_path,
        {"teacher_perplexity": 2.0, "student_perplexity": 3.0, "teacher_parameters": 2.0, "student_parameters": 1.0},
        title="t",
        loss_history=[],
        kl_by_position={},
    )
    assert {p.name for p in files} == {"report.md", "report.html"}


def test_the_terminal_table_shows_the_numbers_and_the_gate_outcome():
    failed = GateVerdict(
        passed=False, failures=["max_kl 0.1: kl_teacher_student is 0.1234"], candidate_version="2", champion_version="1"
    )
    console = Console(width=160, record=True)
    console.print(comparison_table(METRICS, title="tiny", verdict=failed))
    text = console.export_text()
    assert "60.0%" in text and "0.1234" in text and "gate FAILED" in text and "max_kl 0.1" in text
    passed = GateVerdict(passed=True, failures=[], candidate_version="2", promoted=True)
    assert gate_summary(passed) == "gate passed → version 2 is now champion"
