"""Curation: file formats, normalization to chat messages, empty/duplicate drops, stable splits, bad input."""

import json

import pandas as pd
import pytest

from stillhouse.config import CurateConfig
from stillhouse.data.curate import curate, curate_frame, read_split
from stillhouse.errors import InputError
from stillhouse.store import Store


def test_jsonl_is_normalized_deduplicated_and_split(tmp_path, prompts_jsonl):
    dataset = curate(
        CurateConfig(source=str(prompts_jsonl), category_column="task", eval_fraction=0.2), Store(tmp_path)
    )
    assert dataset.counts["rows_in"] == 122
    assert dataset.counts["dropped_empty"] == 1 and dataset.counts["dropped_duplicate"] >= 1
    assert (
        dataset.train_rows + dataset.eval_rows
        == 122 - dataset.counts["dropped_empty"] - dataset.counts["dropped_duplicate"]
    )
    train, evaluation = read_split(dataset, "train"), read_split(dataset, "eval")
    assert set(train["prompt_id"]).isdisjoint(evaluation["prompt_id"])
    messages = json.loads(train["messages"][0])
    assert messages[-1]["role"] == "user" and messages[-1]["content"]
    assert train["reference"].notna().all() and set(train["category"]) <= {"sort_letters", "reverse", "sort_numbers"}


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_csv_and_parquet_give_the_same_split_as_jsonl(tmp_path, prompts_jsonl, suffix):
    frame = pd.read_json(prompts_jsonl, lines=True)
    path = tmp_path / f"prompts{suffix}"
    frame.to_csv(path, index=False) if suffix == ".csv" else frame.to_parquet(path)
    from_jsonl = curate_frame(frame, CurateConfig(source=str(prompts_jsonl)))
    from_other = curate(CurateConfig(source=str(path)), Store(tmp_path / "store"))
    assert sorted(read_split(from_other, "eval")["prompt_id"]) == sorted(from_jsonl[1]["prompt_id"])


def test_split_is_stable_under_row_order_and_changes_with_the_salt(prompts_jsonl):
    frame = pd.read_json(prompts_jsonl, lines=True)
    config = CurateConfig(source="x", eval_fraction=0.3)
    _, eval_a, _ = curate_frame(frame, config)
    _, eval_b, _ = curate_frame(frame.sample(frac=1.0, random_state=3), config)
    assert set(eval_a["prompt_id"]) == set(eval_b["prompt_id"])
    _, eval_c, _ = curate_frame(frame, config.model_copy(update={"split_salt": "other"}))
    assert set(eval_c["prompt_id"]) != set(eval_a["prompt_id"])


def test_chat_message_prompts_are_kept_and_normalized_duplicates_dropped():
    frame = pd.DataFrame(
        {
            "prompt": [
                [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Hello  there"}],
                [
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": "hello there"},
                ],  # same, normalized
                [
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": "a"},
                ],  # answered: cut to the user turn
                [{"role": "assistant", "content": "no user turn"}],
                "  ",
            ]
            * 3
            + [f"plain prompt {i}" for i in range(20)]
        }
    )
    train, evaluation, counts = curate_frame(frame, CurateConfig(source="x", reference_column=None, eval_fraction=0.5))
    assert counts["dropped_empty"] == 6 and counts["dropped_duplicate"] == 7
    kept = [json.loads(m) for m in pd.concat([train, evaluation])["messages"]]
    assert sorted(len(m) for m in kept) == [1] * 21 + [2]
    assert [{"role": "user", "content": "q"}] in kept


def test_missing_file_empty_file_and_missing_column_name_the_fix(tmp_path):
    with pytest.raises(InputError, match=r"curate.source: dataset file .*missing.jsonl' does not exist"):
        curate(CurateConfig(source=str(tmp_path / "missing.jsonl")), Store(tmp_path))
    empty = tmp_path / "empty.csv"
    empty.write_text("prompt,reference\n")
    with pytest.raises(InputError, match="has no rows"):
        curate(CurateConfig(source=str(empty)), Store(tmp_path))
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"question": "hi", "reference": "x"}\n')
    with pytest.raises(
        InputError, match=r"curate.prompt_column: column 'prompt' is not in .*columns: \['question', 'reference'\]"
    ):
        curate(CurateConfig(source=str(wrong)), Store(tmp_path))
    with pytest.raises(InputError, match=r"set curate.reference_column: null"):
        curate(CurateConfig(source=str(wrong), prompt_column="question", reference_column="answer"), Store(tmp_path))
    assert not list((tmp_path / "curate").glob("*/manifest.json"))


def test_a_local_datasets_folder_is_read(tmp_path, prompts_jsonl):
    import datasets

    folder = tmp_path / "ds"
    datasets.Dataset.from_pandas(pd.read_json(prompts_jsonl, lines=True)).save_to_disk(str(folder))
    dataset = curate(CurateConfig(source=str(folder)), Store(tmp_path / "store"))
    assert dataset.train_rows + dataset.eval_rows > 100


def test_split_is_stable_when_the_file_is_shuffled_and_rows_name_their_source(tmp_path, prompts_jsonl):
    import random

    lines = prompts_jsonl.read_text().splitlines(keepends=True)
    random.Random(5).shuffle(lines)
    shuffled = tmp_path / "prompts.jsonl"
    shuffled.write_text("".join(lines))
    first = curate(CurateConfig(source=str(prompts_jsonl)), Store(tmp_path / "a"))
    second = curate(CurateConfig(source=str(shuffled)), Store(tmp_path / "b"))
    for split in ("train", "eval"):
        assert sorted(read_split(first, split)["prompt_id"]) == sorted(read_split(second, split)["prompt_id"])
    assert set(read_split(first, "train")["source"]) == {"prompts"}
