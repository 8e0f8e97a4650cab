"""lm-evaluation-harness on a custom task over a local file, with a tiny model: no downloads."""

import json

import pytest

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install 'stillhouse[eval]')")
pytestmark = pytest.mark.slow  # lm_eval's own start-up costs ~6 s a test

TASK_YAML = """\
task: stillhouse_tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture
def local_task(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    rows = [
        {"question": "reverse: ab", "choices": ["ba", "ab"], "answer": 0},
        {"question": "upper: a", "choices": ["A", "b"], "answer": 0},
        {"question": "sort: ba", "choices": ["ab", "ba"], "answer": 1},
        {"question": "add: 1 2", "choices": ["3", "4"], "answer": 0},
    ]
    data = tmp_path / "tiny.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "tiny.yaml").write_text(TASK_YAML.format(data=data))
    return folder


def test_lm_eval_runs_a_local_task_on_a_tiny_model(local_task, tiny_teacher):
    from stillhouse.config import LmEvalConfig
    from stillhouse.evaluation.lm_eval_adapter import run_lm_eval
    from stillhouse.models import load_causal_lm, load_tokenizer

    model, tokenizer = load_causal_lm(str(tiny_teacher), device="cpu"), load_tokenizer(str(tiny_teacher))
    results = run_lm_eval(
        model, tokenizer, LmEvalConfig(tasks=["stillhouse_tiny_choice"], include_path=str(local_task), batch_size=4)
    )
    assert set(results) == {"stillhouse_tiny_choice/acc"}
    assert results["stillhouse_tiny_choice/acc"] in {0.0, 0.25, 0.5, 0.75, 1.0}  # 4 documents


def test_an_unknown_lm_eval_task_names_the_fix(local_task, tiny_teacher):
    from stillhouse.config import LmEvalConfig
    from stillhouse.errors import InputError
    from stillhouse.evaluation.lm_eval_adapter import run_lm_eval

    with pytest.raises(InputError, match="not lm_eval tasks"):
        run_lm_eval(None, None, LmEvalConfig(tasks=["no_such_task"], include_path=str(local_task)))
