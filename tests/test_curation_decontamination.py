"""Decontamination: a planted benchmark item is caught, the eval split is protected, boilerplate is not a leak."""

import json

import pandas as pd
import pytest
from test_curation_formats import conversations, curated, filler, write_jsonl

from stillhouse.config import CurateConfig, DecontaminateConfig
from stillhouse.data.curate import curate
from stillhouse.data.decontaminate import ReferenceNgrams, ngrams
from stillhouse.data.schema import prompt_hash
from stillhouse.errors import InputError
from stillhouse.store import Store

QUESTION = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?"
)


def test_ngrams_are_normalized_words_and_short_texts_are_one_gram():
    assert ngrams("Hello, World!  Again", 2) == ["hello world", "world again"]
    assert ngrams("Too short.", 13) == ["too short"]


def test_a_planted_benchmark_item_is_caught_with_evidence(tmp_path):
    benchmark = write_jsonl(
        tmp_path / "gsm8k.jsonl",
        [{"question": QUESTION, "answer": "72"}, {"question": "Unrelated item text", "answer": "1"}],
    )
    leaked = "Solve step by step. " + QUESTION.upper().replace(",", " ,") + " Show your work."
    rows = [{"prompt": leaked}, {"prompt": "unrelated item text"}] + [{"prompt": t} for t in filler(30)]
    dataset, out = curated(tmp_path, rows, decontaminate={"benchmarks": [str(benchmark)]})
    assert dataset.counts["dropped_contaminated_benchmark"] == 2 and len(out) == 30
    report = json.loads((tmp_path / "store" / "curate" / dataset.fingerprint / "report" / "report.json").read_text())
    examples = report["examples"]["dropped_contaminated_benchmark"]
    assert examples[0]["matches"] == f"benchmark {benchmark}" and examples[0]["ngram"] in QUESTION.lower().replace(
        ",", ""
    )
    assert {e["ngram"] for e in examples} >= {"unrelated item text"}  # a short item matches as a whole


def test_short_benchmark_items_only_match_whole_prompts(tmp_path):
    benchmark = write_jsonl(tmp_path / "bench.jsonl", [{"answer": "Paris"}])
    rows = [{"prompt": "What is the capital of France? Paris, of course."}, {"prompt": "paris"}] + [
        {"prompt": t} for t in filler(30)
    ]
    dataset, out = curated(tmp_path, rows, decontaminate={"benchmarks": [str(benchmark)]})
    assert dataset.counts["dropped_contaminated_benchmark"] == 1 and len(out) == 31


def split_position(text, salt="stillhouse"):
    return int(prompt_hash([{"role": "user", "content": text}], salt)[:15], 16) / 16**15


def test_training_prompts_sharing_an_ngram_with_the_eval_split_are_dropped(tmp_path):
    texts = filler(200, seed=4, words=20)
    frame = pd.DataFrame({"prompt": texts})
    config = CurateConfig(source="x", reference_column=None, eval_fraction=0.2)
    from stillhouse.data.curate import curate_frame

    _, evaluation, _ = curate_frame(frame, config)
    eval_text = json.loads(evaluation["messages"][0])[0]["content"]
    leaks = (f"Consider this {i}: " + " ".join(eval_text.split()[2:15]) + " and explain." for i in range(100))
    leak = next(text for text in leaks if split_position(text) >= config.eval_fraction)  # one the split puts in train
    leaked_frame = pd.concat([frame, pd.DataFrame({"prompt": [leak]})], ignore_index=True)
    train, _, counts = curate_frame(leaked_frame, config)
    assert counts["dropped_contaminated_eval"] == 1
    assert leak not in [m[0]["content"] for m in conversations(train)]
    _, _, off = curate_frame(
        leaked_frame, config.model_copy(update={"decontaminate": DecontaminateConfig(eval_split=False)})
    )
    assert "dropped_contaminated_eval" not in off


def test_shared_boilerplate_is_not_a_leak():
    boilerplate = (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    )
    rows = [(0, [f"{boilerplate} {text}"]) for text in filler(20, words=3)]
    strict = ReferenceNgrams.build(iter(rows), ["eval"], 13, ignore_common=None)
    lenient = ReferenceNgrams.build(iter(rows), ["eval"], 13, ignore_common=10)
    probe = [f"{boilerplate} something new entirely"]
    assert strict.match(probe)[0] >= 0 and lenient.match(probe)[0] == -1 and lenient.ignored_common > 0


def test_a_missing_benchmark_file_fails_before_reading_data(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": t} for t in filler(10)])
    config = CurateConfig(
        source=str(data), reference_column=None, decontaminate={"benchmarks": [str(tmp_path / "nope.jsonl")]}
    )
    with pytest.raises(
        InputError,
        match=r"curate.decontaminate.benchmarks\[0\]: benchmark file .*nope.jsonl' does not exist; check the path",
    ):
        curate(config, Store(tmp_path / "store"))
    assert not list((tmp_path / "store").glob("curate/*/manifest.json"))
