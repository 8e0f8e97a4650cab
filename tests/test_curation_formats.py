"""Curation sources and schema mapping: every file format and chat shape becomes validated messages.

Also holds the small helpers the other test_curation_* files import.
"""

import json
import random
import string

import pandas as pd
import pytest

from stillhouse.config import CurateConfig
from stillhouse.data import sources as sources_module
from stillhouse.data.curate import curate, read_split
from stillhouse.store import Store


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def filler(count, seed=0, words=12):
    """Distinct prompts of random pseudo-words: no two are near duplicates or share an n-gram."""
    rng = random.Random(seed)
    return [
        " ".join("".join(rng.choices(string.ascii_lowercase, k=rng.randint(4, 8))) for _ in range(words))
        for _ in range(count)
    ]


def all_rows(dataset):
    return pd.concat([read_split(dataset, "train"), read_split(dataset, "eval")], ignore_index=True)


def curated(tmp_path, rows, name="data.jsonl", **settings):
    """Curate ``rows`` written as JSONL (no reference column unless given); returns (DatasetRef, all output rows)."""
    settings.setdefault("reference_column", None)
    settings.setdefault("eval_fraction", 0.3)
    dataset = curate(
        CurateConfig(source=str(write_jsonl(tmp_path / name, rows)), **settings), Store(tmp_path / "store")
    )
    return dataset, all_rows(dataset)


def conversations(frame):
    return [json.loads(m) for m in frame["messages"]]


def padded(rows, count=30):
    return rows + [{"prompt": text} for text in filler(count, seed=99)]


def test_openai_messages_keep_every_turn_and_cut_the_final_answer(tmp_path):
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Sort: cba"},
        {"role": "assistant", "content": "abc"},
    ]
    rows = [{"messages": chat, "id": 1}] + [{"messages": [{"role": "user", "content": t}], "id": 2} for t in filler(30)]
    dataset, out = curated(tmp_path, rows)
    assert dataset.counts["rows_in"] == 31 and dataset.counts["rows_out.data"] == 31
    kept = [m for m in conversations(out) if len(m) > 1]
    assert kept == [chat[:4]]  # every turn kept; the teacher answers the last user turn
    assert set(out["source"]) == {"data"}


def test_sharegpt_conversations_map_speakers_to_roles(tmp_path):
    rows = [
        {
            "conversations": [
                {"from": "system", "value": "sys"},
                {"from": "human", "value": "q1"},
                {"from": "gpt", "value": "a1"},
                {"from": "human", "value": "q2"},
            ]
        }
    ]
    rows += [{"conversations": [{"from": "human", "value": t}, {"from": "gpt", "value": "x"}]} for t in filler(30)]
    dataset, out = curated(tmp_path, rows)
    assert [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"},
    ] in conversations(out)
    assert (
        json.loads((tmp_path / "store" / "curate" / dataset.fingerprint / "report" / "report.json").read_text())[
            "sources"
        ]["data"]["format"]
        == "sharegpt"
    )


def test_alpaca_joins_instruction_and_input_and_can_use_output_as_reference(tmp_path):
    rows = [
        {"instruction": "Translate to French", "input": "cat", "output": "chat"},
        {"instruction": "Name a color", "input": "", "output": "red"},
    ]
    rows += [{"instruction": t, "input": "", "output": "o"} for t in filler(30)]
    _, out = curated(tmp_path, rows, reference_column="output")
    by_prompt = {m[-1]["content"]: ref for m, ref in zip(conversations(out), out["reference"])}
    assert by_prompt["Translate to French\n\ncat"] == "chat" and by_prompt["Name a color"] == "red"


def test_explicit_columns_with_a_system_column_from_csv(tmp_path):
    frame = pd.DataFrame(
        {
            "question": ["What is 2+2?"] + filler(30),
            "persona": ["You are terse."] + [""] * 30,
            "answer": ["4"] + ["x"] * 30,
            "topic": ["math"] + ["misc"] * 30,
        }
    )
    path = tmp_path / "qa.csv"
    frame.to_csv(path, index=False)
    config = CurateConfig(
        source=str(path),
        format="columns",
        prompt_column="question",
        system_column="persona",
        reference_column="answer",
        category_column="topic",
        eval_fraction=0.3,
    )
    out = all_rows(curate(config, Store(tmp_path / "store")))
    row = out[out["category"] == "math"].iloc[0]
    assert json.loads(row["messages"]) == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
    ]
    assert row["reference"] == "4" and row["source"] == "qa"
    assert all(
        len(m) == 1 for m in conversations(out[out["category"] == "misc"])
    )  # an empty system cell adds no message


def test_parquet_with_message_lists_and_format_auto_prefers_prompt_column(tmp_path):
    frame = pd.DataFrame(
        {"prompt": [[{"role": "user", "content": t}] for t in filler(30)], "messages": ["ignored"] * 30}
    )
    path = tmp_path / "chat.parquet"
    frame.to_parquet(path)
    out = all_rows(curate(CurateConfig(source=str(path), reference_column=None), Store(tmp_path / "store")))
    assert sorted(m[0]["content"] for m in conversations(out)) == sorted(filler(30))


def test_datasets_dict_folder_reads_the_configured_split(tmp_path):
    import datasets

    folder = tmp_path / "dd"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"prompt": filler(30, seed=1)}),
            "test": datasets.Dataset.from_dict({"prompt": filler(20, seed=2)}),
        }
    ).save_to_disk(str(folder))
    dataset = curate(CurateConfig(source=str(folder), split="test", reference_column=None), Store(tmp_path / "store"))
    assert dataset.counts["rows_in"] == 20
    with pytest.raises(Exception, match=r"curate.split: .* has splits \['train', 'test'\], not 'validation'"):
        curate(CurateConfig(source=str(folder), split="validation", reference_column=None), Store(tmp_path / "store"))


def test_a_streamed_hub_dataset_is_read_in_batches(tmp_path, monkeypatch):
    """The Hub path (no network here): `load_dataset(..., streaming=True)` answered by a local IterableDataset."""
    import datasets

    calls = {}

    def fake_load_dataset(name, split, streaming):
        calls.update(name=name, split=split, streaming=streaming)
        return datasets.Dataset.from_dict({"prompt": filler(250, seed=3)}).to_iterable_dataset()

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    config = CurateConfig(
        source="someone/prompts", split="train_sft", streaming=True, reference_column=None, batch_rows=100
    )
    dataset = curate(config, Store(tmp_path / "store"))
    assert calls == {"name": "someone/prompts", "split": "train_sft", "streaming": True}
    assert dataset.counts["rows_in"] == 250 and dataset.counts["rows_out.someone/prompts"] == 250


def test_batches_are_bounded_by_batch_rows(tmp_path):
    path = write_jsonl(tmp_path / "many.jsonl", [{"prompt": t} for t in filler(450)])
    config = CurateConfig(source=str(path), reference_column=None, batch_rows=100)
    source = sources_module.resolve_sources(config)[0]
    sizes = [len(b.records) for b in sources_module.read_batches(source, config, sources_module.Problems("fail"))]
    assert sizes == [100, 100, 100, 100, 50]


def test_demo_source_keeps_working(tmp_path):
    dataset = curate(CurateConfig(source="builtin:demo", demo_rows=300, category_column="task"), Store(tmp_path))
    train = read_split(dataset, "train")
    assert {"prompt_id", "messages", "reference", "category", "source"} <= set(train.columns)
    assert train["reference"].notna().all() and set(train["source"]) == {"demo"}
    assert dataset.counts["dropped_contaminated_eval"] == 0  # short templated prompts are not flagged
