"""Mixtures: weights and caps, a source column, draws that depend on the seed but not on row order."""

import random

import pytest
from pydantic import ValidationError
from test_curation_formats import all_rows, filler, write_jsonl

from stillhouse.config import CurateConfig, load_config
from stillhouse.data.curate import curate
from stillhouse.errors import InputError
from stillhouse.store import Store


@pytest.fixture
def three_sources(tmp_path):
    chat = write_jsonl(
        tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": t}]} for t in filler(900, seed=1)]
    )
    code = write_jsonl(
        tmp_path / "code.jsonl", [{"instruction": t, "input": "", "output": "x"} for t in filler(600, seed=2)]
    )
    math = write_jsonl(
        tmp_path / "math.jsonl", [{"prompt": t, "answer": str(i)} for i, t in enumerate(filler(400, seed=3))]
    )
    return chat, code, math


def mixture(chat, code, math, seed=0, **math_settings):
    return CurateConfig(
        mixture_seed=seed,
        eval_fraction=0.1,
        sources=[
            {"source": str(chat), "weight": 0.5},
            {"source": str(code), "weight": 0.3, "name": "coding"},
            {"source": str(math), "weight": 0.2, "reference_column": "answer", **math_settings},
        ],
    )


def test_proportions_follow_the_weights_and_every_row_names_its_source(tmp_path, three_sources):
    dataset = curate(mixture(*three_sources), Store(tmp_path / "store"))
    out = all_rows(dataset)
    shares = out["source"].value_counts(normalize=True)
    # chat (900) is the binding source: 900 / 0.5 = 1800 rows in all.
    assert len(out) == 1800 - dataset.counts["dropped_contaminated_eval"]
    assert shares["chat"] == pytest.approx(0.5, abs=0.01) and shares["coding"] == pytest.approx(0.3, abs=0.01)
    assert shares["math"] == pytest.approx(0.2, abs=0.01)
    assert (
        out.loc[out["source"] == "math", "reference"].notna().all()
        and out.loc[out["source"] == "chat", "reference"].isna().all()
    )
    assert (
        dataset.counts["rows_in.coding"] == 600
        and dataset.counts["rows_out.coding"] == (out["source"] == "coding").sum()
    )
    assert dataset.counts["dropped_mixture"] == 1900 - 1800


def test_caps_bound_a_source_and_shrink_the_total(tmp_path, three_sources):
    out = all_rows(curate(mixture(*three_sources, max_rows=100), Store(tmp_path / "store")))
    counts = out["source"].value_counts()
    assert (
        counts["math"] <= 100
        and counts["chat"] == pytest.approx(250, abs=3)
        and counts["coding"] == pytest.approx(150, abs=3)
    )


def test_draws_depend_on_the_seed_not_on_row_order(tmp_path, three_sources):
    chat, code, math = three_sources
    first = set(all_rows(curate(mixture(chat, code, math), Store(tmp_path / "a")))["prompt_id"])
    lines = code.read_text().splitlines(keepends=True)
    random.Random(1).shuffle(lines)
    shuffled = tmp_path / "shuffled" / "code.jsonl"
    shuffled.parent.mkdir()
    shuffled.write_text("".join(lines))
    again = set(all_rows(curate(mixture(chat, shuffled, math), Store(tmp_path / "b")))["prompt_id"])
    other_seed = set(all_rows(curate(mixture(chat, code, math, seed=1), Store(tmp_path / "c")))["prompt_id"])
    assert again == first and other_seed != first


def test_a_source_emptied_by_filters_names_itself(tmp_path, three_sources):
    chat, code, _ = three_sources
    blank = write_jsonl(tmp_path / "blank.jsonl", [{"prompt": " "}] * 5)
    config = CurateConfig(sources=[{"source": str(chat)}, {"source": str(blank)}])
    with pytest.raises(InputError, match=r"curate.sources\[1\]: no rows of .*blank.jsonl' are left after filtering"):
        curate(config, Store(tmp_path / "store"))


def test_mixture_config_rules(tmp_path, three_sources):
    chat, code, _ = three_sources
    with pytest.raises(ValidationError, match="set exactly one of `source`"):
        CurateConfig(source=str(chat), sources=[{"source": str(code)}])
    with pytest.raises(ValidationError, match="prompt_column apply to `source` only"):
        CurateConfig(prompt_column="q", sources=[{"source": str(code)}])
    with pytest.raises(ValidationError, match="greater than 0"):
        CurateConfig(sources=[{"source": str(code), "weight": 0}])
    with pytest.raises(InputError, match=r"curate.sources\[1\].name: two sources are named 'chat'"):
        curate(CurateConfig(sources=[{"source": str(chat)}, {"source": str(code), "name": "chat"}]), Store(tmp_path))
    with pytest.raises(InputError, match=r"curate.sources\[1\].source: dataset file .*missing.jsonl' does not exist"):
        curate(
            CurateConfig(sources=[{"source": str(chat)}, {"source": str(tmp_path / "missing.jsonl")}]), Store(tmp_path)
        )


def test_a_yaml_mixture_loads(tmp_path, three_sources):
    chat, code, _ = three_sources
    path = tmp_path / "mix.yaml"
    path.write_text(f"""
name: mix
curate:
  sources:
    - {{source: {chat}, weight: 2}}
    - {{source: {code}, weight: 1, max_rows: 50, format: alpaca}}
  filters: {{near_duplicates: {{enabled: true, threshold: 0.8}}, mask_pii: [email]}}
  decontaminate: {{ngram: 8}}
sample: {{teacher: builtin:demo-teacher}}
train: {{architecture: {{hidden_size: 16, num_layers: 1, intermediate_size: 32, num_heads: 2}}}}
registry: {{model_name: m}}
""")
    config = load_config(path)
    assert [s.weight for s in config.curate.source_list()] == [
        2,
        1,
    ] and config.curate.filters.near_duplicates.threshold == 0.8


def test_a_mixture_without_weights_keeps_every_row_and_finds_each_sources_references(tmp_path, caplog):
    """Two sources at their defaults: nothing is dropped; the default `reference` column is read where it exists."""
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": t}]} for t in filler(400)])
    shared = write_jsonl(
        tmp_path / "shared.jsonl",
        [{"conversations": [{"from": "human", "value": t}], "reference": "ok"} for t in filler(200, seed=5)],
    )
    with caplog.at_level("WARNING", logger="stillhouse"):
        dataset = curate(CurateConfig(sources=[{"source": str(chat)}, {"source": str(shared)}]), Store(tmp_path / "s"))
    out = all_rows(dataset)
    assert dataset.counts.get("dropped_mixture", 0) == 0
    assert len(out) + dataset.counts["dropped_contaminated_eval"] == 600
    assert out.loc[out["source"] == "shared", "reference"].eq("ok").all()
    assert out.loc[out["source"] == "chat", "reference"].isna().all()
    assert "mixture" not in caplog.text


def test_weights_that_drop_rows_say_so_with_the_counts(tmp_path, caplog):
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": t} for t in filler(400)])
    other = write_jsonl(tmp_path / "other.jsonl", [{"prompt": t} for t in filler(200, seed=5)])
    config = CurateConfig(sources=[{"source": str(chat), "weight": 1}, {"source": str(other), "weight": 1}])
    with caplog.at_level("WARNING", logger="stillhouse"):
        dataset = curate(config, Store(tmp_path / "s"))
    assert dataset.counts["dropped_mixture"] == 200
    assert "kept 400 of 600 rows (chat: 200 of 400, other: 200 of 200)" in caplog.text


def test_weights_are_set_on_every_entry_or_none(tmp_path):
    with pytest.raises(ValidationError, match=r"sources\[1\] have no weight while others do"):
        CurateConfig(sources=[{"source": "a.jsonl", "weight": 2}, {"source": "b.jsonl"}])
    explicit = CurateConfig(sources=[{"source": "a.jsonl", "reference_column": "answer"}])
    assert (
        explicit.sources[0].reference_column == "answer"
        and CurateConfig(source="a.jsonl").reference_column == "reference"
    )
