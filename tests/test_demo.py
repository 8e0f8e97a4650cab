"""The bundled demo: deterministic tasks, the character tokenizer, and the committed teacher's quality."""

from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from stillhouse.config import load_config
from stillhouse.demo import TEACHER_DIR as DEMO_TEACHER_DIR
from stillhouse.demo.tasks import is_correct, make_examples
from stillhouse.demo.tokenizer import build_char_tokenizer
from stillhouse.demo.train_teacher import HELD_OUT_SEED, held_out_accuracy
from stillhouse.models import count_parameters
from stillhouse.training.train import build_student

DEMO_CONFIG = Path(__file__).parents[1] / "configs" / "demo.yaml"


def test_demo_rows_are_deterministic_and_their_references_right():
    rows = make_examples(300, seed=5)
    assert rows == make_examples(300, seed=5) and rows != make_examples(300, seed=6)
    for row in rows:
        argument = row["prompt"].split(": ", 1)[1]
        if row["task"] == "sort_letters":
            assert row["reference"] == "".join(sorted(argument))
        elif row["task"] == "reverse":
            assert row["reference"] == argument[::-1]
        else:
            assert row["reference"].split() == sorted(argument.split(), key=int)
    assert {row["task"] for row in rows} == {"sort_letters", "reverse", "sort_numbers"}
    assert is_correct(" abc ", "abc") and not is_correct("abd", "abc")


def test_character_tokenizer_round_trips_through_save_pretrained(tmp_path):
    build_char_tokenizer().save_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "sort numbers: 52 17"}, {"role": "assistant", "content": "17 52"}], tokenize=False
    )
    assert text == "<|user|>sort numbers: 52 17<|assistant|>17 52<eos>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len("sort numbers: 52 17") + len("17 52") + 3  # one token per character + 3 specials
    assert tokenizer.decode(ids, skip_special_tokens=True) == "sort numbers: 52 1717 52"


def test_committed_teacher_is_small_and_scores_at_least_90_percent_on_held_out_prompts():
    weights = DEMO_TEACHER_DIR / "model.safetensors"
    assert weights.is_file(), "run `python -m stillhouse.demo.train_teacher` to rebuild the teacher"
    assert weights.stat().st_size <= 10 * 2**20
    model, tokenizer = (
        AutoModelForCausalLM.from_pretrained(DEMO_TEACHER_DIR),
        AutoTokenizer.from_pretrained(DEMO_TEACHER_DIR),
    )
    scores = held_out_accuracy(model.eval(), tokenizer, make_examples(300, seed=HELD_OUT_SEED + 1))
    assert scores["overall"] >= 0.9, scores


def test_demo_student_has_at_most_a_quarter_of_the_teachers_parameters():
    config = load_config(DEMO_CONFIG)
    student, _ = build_student(config.train, str(DEMO_TEACHER_DIR))
    teacher = AutoModelForCausalLM.from_pretrained(DEMO_TEACHER_DIR)
    assert count_parameters(student) <= count_parameters(teacher) / 4


@pytest.mark.slow
def test_train_teacher_script_runs_and_writes_a_loadable_model(tmp_path):
    import subprocess
    import sys

    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "stillhouse.demo.train_teacher",
            "--steps",
            "3",
            "--held-out",
            "9",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    assert "held-out exact match" in completed.stdout
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config.hidden_size == 128
