"""Each row filter on crafted rows: removed, counted, and shown as an example in the report."""

import json

import pytest
from pydantic import ValidationError
from test_curation_formats import conversations, curated, filler, padded

from stillhouse.config import CurateConfig
from stillhouse.data.filters import TokenCounter, mask_pii, repeated_ngram_share


def report_of(tmp_path, dataset):
    return json.loads((tmp_path / "store" / "curate" / dataset.fingerprint / "report" / "report.json").read_text())


def test_empty_and_whitespace_prompts_are_dropped_and_counted(tmp_path):
    rows = padded([{"prompt": ""}, {"prompt": " \n\t "}, {"prompt": [{"role": "user", "content": "  "}]}])
    dataset, out = curated(tmp_path, rows)
    assert dataset.counts["dropped_empty"] == 3 and len(out) == 30
    assert len(report_of(tmp_path, dataset)["examples"]["dropped_empty"]) == 3


def test_character_bounds(tmp_path):
    rows = padded([{"prompt": "hi"}, {"prompt": "x" * 500}])
    dataset, out = curated(tmp_path, rows, filters={"length": {"min_chars": 10, "max_chars": 200}})
    assert dataset.counts["dropped_too_short_chars"] == 1 and dataset.counts["dropped_too_long_chars"] == 1
    assert len(out) == 30
    assert report_of(tmp_path, dataset)["examples"]["dropped_too_long_chars"][0]["chars"] == "500"


def test_teacher_token_bounds_use_the_teachers_tokenizer_and_chat_template(tmp_path, tiny_teacher):
    counter = TokenCounter(str(tiny_teacher))
    short, long = counter.count([[{"role": "user", "content": "ab"}], [{"role": "user", "content": "ab" * 200}]])
    assert long - short == 398  # the demo tokenizer is one token per character; the template adds the same to both
    rows = padded([{"prompt": "ab"}, {"prompt": "ab" * 200}])
    bounds = {"min_tokens": short + 1, "max_tokens": long - 1, "tokenizer": str(tiny_teacher)}
    dataset, out = curated(tmp_path, rows, filters={"length": bounds})
    assert dataset.counts["dropped_too_short_tokens"] == 1 and dataset.counts["dropped_too_long_tokens"] == 1
    assert len(out) == 30
    assert (tmp_path / "store" / "curate" / dataset.fingerprint / "report" / "length_tokens.png").read_bytes()[
        :4
    ] == b"\x89PNG"


def test_the_tokenizer_is_only_loaded_when_a_token_bound_is_set(tmp_path, monkeypatch):
    import stillhouse.data.filters as filters

    monkeypatch.setattr(filters.TokenCounter, "__init__", lambda self, model: pytest.fail("tokenizer loaded"))
    curated(tmp_path, padded([]), filters={"length": {"min_chars": 1, "tokenizer": "/nowhere"}})


def test_repetition_filter(tmp_path):
    assert repeated_ngram_share("buy now buy now buy now buy now", 2) == pytest.approx(5 / 7)
    assert repeated_ngram_share("a perfectly ordinary question about cats", 3) == 0
    rows = padded([{"prompt": "click here " * 20}])
    dataset, out = curated(tmp_path, rows, filters={"repetition": {"max_repeated_share": 0.3, "ngram": 3}})
    assert dataset.counts["dropped_repetitive"] == 1 and len(out) == 30


def test_exact_duplicates_are_found_after_normalizing_case_and_spacing(tmp_path):
    rows = padded(
        [
            {"prompt": "What is  the Capital of France?"},
            {"prompt": "what is the capital of france?"},
            {"prompt": "What is the capital of France?\n"},
        ]
    )
    dataset, out = curated(tmp_path, rows)
    assert dataset.counts["dropped_duplicate"] == 2 and len(out) == 31
    example = report_of(tmp_path, dataset)["examples"]["dropped_duplicate"][0]
    assert example["duplicate_of"] == "What is  the Capital of France?" and example["duplicate_of_where"].endswith(
        "line 1"
    )
    _, kept = curated(tmp_path / "off", rows, filters={"exact_duplicates": False})
    assert len(kept) == 33


def test_pii_masking_keeps_the_row_and_counts_it(tmp_path):
    messages, changed = mask_pii(
        [
            {
                "role": "user",
                "content": "Mail ann@example.com, call +1 (555) 123-4567, key sk-abcdefghijklmnopqrstuvwx12",
            }
        ],
        ["email", "phone", "api_key"],
    )
    assert changed and messages[0]["content"] == "Mail <EMAIL>, call <PHONE>, key <API_KEY>"
    assert mask_pii([{"role": "user", "content": "sort numbers: 52 17 88"}], ["phone"]) == (
        [{"role": "user", "content": "sort numbers: 52 17 88"}],
        False,
    )
    assert (
        mask_pii([{"role": "user", "content": 'api_key = "0123456789abcdefXYZ"'}], ["api_key"])[0][0]["content"]
        == 'api_key = "<API_KEY>"'
    )
    rows = padded([{"prompt": "Contact bob@corp.io about GHP token ghp_abcdefghijklmnopqrstuvwxyz0123456789"}])
    dataset, out = curated(tmp_path, rows, filters={"mask_pii": ["email", "api_key"]})
    assert dataset.counts["masked_pii"] == 1 and len(out) == 31
    assert "Contact <EMAIL> about GHP token <API_KEY>" in [m[0]["content"] for m in conversations(out)]


def test_filter_config_is_validated():
    with pytest.raises(ValidationError, match="min_chars .* is larger than max_chars"):
        CurateConfig(source="x", filters={"length": {"min_chars": 10, "max_chars": 5}})
    with pytest.raises(ValidationError, match="min_tokens/max_tokens need `tokenizer`"):
        CurateConfig(source="x", filters={"length": {"max_tokens": 5}})
    with pytest.raises(ValidationError, match="less than 1"):
        CurateConfig(source="x", filters={"near_duplicates": {"threshold": 1.5}})
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        CurateConfig(source="x", filters={"near_dupes": {}})
    with pytest.raises(ValidationError):
        CurateConfig(source="x", filters={"mask_pii": ["passport"]})


def test_unconfigured_filters_are_not_counted(tmp_path):
    dataset, _ = curated(tmp_path, [{"prompt": t} for t in filler(20)])
    assert {k for k in dataset.counts if k.startswith(("dropped", "skipped", "masked"))} == {
        "skipped_malformed",
        "dropped_empty",
        "dropped_duplicate",
        "dropped_contaminated_eval",
    }
