"""Bad input fails early naming the source, the line or row, and the fix; `on_error: skip` drops and counts it."""

import json

import pytest
from test_curation_formats import curated, filler, write_jsonl

from stillhouse.config import CurateConfig
from stillhouse.data.curate import curate
from stillhouse.errors import InputError
from stillhouse.store import Store


def good_lines(count=30):
    return "".join(json.dumps({"prompt": t}) + "\n" for t in filler(count))


def curate_file(tmp_path, path, **settings):
    settings.setdefault("reference_column", None)
    return curate(CurateConfig(source=str(path), eval_fraction=0.3, **settings), Store(tmp_path / "store"))


def test_malformed_jsonl_names_the_file_and_line_or_is_skipped_and_counted(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(good_lines(3) + '{"prompt": "unterminated\n' + "\n" + '["a", "list"]\n' + good_lines(30))
    with pytest.raises(
        InputError,
        match=r"bad.jsonl: line 4: not valid JSON: Invalid control character \(column 25\); "
        r"fix the data, or set curate.on_error: skip",
    ):
        curate_file(tmp_path, path)
    dataset = curate_file(tmp_path, path, on_error="skip")
    assert dataset.counts["skipped_malformed"] == 2 and dataset.counts["rows_in"] == 33
    report = json.loads((tmp_path / "store" / "curate" / dataset.fingerprint / "report" / "report.json").read_text())
    assert [e["where"].rsplit(": ", 1)[1] for e in report["examples"]["skipped_malformed"]] == ["line 4", "line 6"]
    assert "is a JSON list, not an object" in report["examples"]["skipped_malformed"][1]["reason"]


def test_invalid_utf8_in_jsonl_and_csv(tmp_path):
    jsonl = tmp_path / "latin1.jsonl"
    jsonl.write_bytes(good_lines(2).encode() + '{"prompt": "café"}\n'.encode("latin-1") + good_lines(30).encode())
    with pytest.raises(InputError, match=r"latin1.jsonl: line 3: invalid UTF-8 .*re-encode the file as UTF-8"):
        curate_file(tmp_path, jsonl)
    assert curate_file(tmp_path, jsonl, on_error="skip").counts["skipped_malformed"] == 1
    csv = tmp_path / "latin1.csv"
    csv.write_bytes(b"prompt\n" + "\n".join(filler(30)).encode() + '\n"multi\nline café"\n'.encode("latin-1"))
    with pytest.raises(InputError, match=r"latin1.csv: line 32: invalid UTF-8"):
        curate_file(tmp_path, csv)


def test_a_csv_row_with_extra_fields(tmp_path):
    csv = tmp_path / "fields.csv"
    csv.write_text("prompt,reference\n" + "\n".join(f"{t},r" for t in filler(30)) + "\nsort: c,b,a,ref\n")
    with pytest.raises(
        InputError, match=r"fields.csv: line 32: has 4 fields where the header has 2; quote fields that contain commas"
    ):
        curate_file(tmp_path, csv, reference_column="reference")


def test_a_row_missing_the_mapped_column(tmp_path):
    path = write_jsonl(
        tmp_path / "missing.jsonl", [{"prompt": t} for t in filler(30)] + [{"question": "where is the prompt?"}]
    )
    with pytest.raises(InputError, match=r"missing.jsonl: line 31: has no value in column 'prompt' \(format columns\)"):
        curate_file(tmp_path, path)
    assert curate_file(tmp_path, path, on_error="skip").counts["skipped_malformed"] == 1


@pytest.mark.parametrize(
    "messages, problem",
    [
        (
            [{"role": "system", "content": "a"}, {"role": "system", "content": "b"}, {"role": "user", "content": "q"}],
            "message 2 is a second or late system message",
        ),
        ([{"role": "system", "content": "only a system prompt"}], "has no user turn"),
        (
            [{"role": "user", "content": "q1"}, {"role": "user", "content": "q2"}],
            "turn 2 is 'user' where 'assistant' was expected",
        ),
        ([{"role": "tool", "content": "42"}, {"role": "user", "content": "q"}], "message 1 has role 'tool'"),
        ([{"speaker": "user", "content": "q"}], "message 1 of column 'messages' has no 'role' key"),
        ("not a list", None),
    ],
)
def test_role_sequences_that_are_not_conversations(tmp_path, messages, problem):
    rows = [{"messages": [{"role": "user", "content": t}]} for t in filler(30)] + [{"messages": messages}]
    if problem is None:  # a plain string in a messages column is a one-turn prompt
        assert curated(tmp_path, rows)[0].counts["skipped_malformed"] == 0
        return
    with pytest.raises(InputError, match=rf"data.jsonl: line 31: {problem}"):
        curated(tmp_path, rows)
    assert curated(tmp_path / "skip", rows, on_error="skip")[0].counts["skipped_malformed"] == 1


def test_an_unknown_sharegpt_speaker(tmp_path):
    rows = [{"conversations": [{"from": "human", "value": t}]} for t in filler(30)] + [
        {"conversations": [{"from": "narrator", "value": "x"}]}
    ]
    with pytest.raises(
        InputError, match=r"line 31: message 1 of column 'conversations' has speaker 'narrator'; expected one of"
    ):
        curated(tmp_path, rows)


def test_columns_missing_from_the_data_and_formats_that_do_not_fit(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"question": t} for t in filler(30)])
    with pytest.raises(
        InputError,
        match=r"curate.prompt_column: column 'prompt' is not in .*q.jsonl' \(columns: \['question'\]\); "
        r"name one of those, or set curate.format",
    ):
        curate_file(tmp_path, path)
    with pytest.raises(
        InputError, match=r"curate.category_column: column 'topic' is not in .* or set curate.category_column: null"
    ):
        curate_file(tmp_path, path, prompt_column="question", category_column="topic")
    with pytest.raises(InputError, match=r"curate.prompt_column: column 'instruction' is not in"):
        curate_file(tmp_path, path, format="alpaca")


def test_everything_filtered_out_and_non_hub_streaming(tmp_path):
    path = write_jsonl(tmp_path / "blank.jsonl", [{"prompt": "  "}] * 5)
    with pytest.raises(InputError, match=r"every row of .*blank.jsonl' was empty, malformed or filtered out"):
        curate_file(tmp_path, path)
    with pytest.raises(InputError, match=r"curate.streaming: only Hub datasets stream"):
        curate_file(tmp_path, path, streaming=True)


def test_an_overlong_line_is_refused_or_skipped_without_being_read_whole(tmp_path):
    path = tmp_path / "long.jsonl"
    huge = json.dumps({"prompt": "x" * 3_000_000})
    path.write_text(good_lines(10) + huge + "\n" + good_lines(30))
    with pytest.raises(
        InputError,
        match=r"long.jsonl: line 11: is 3,000,015 bytes long, over curate.max_line_bytes "
        r"\(1,048,576\); raise that limit if such rows are real data; fix the data, or set curate.on_error",
    ):
        curate_file(tmp_path, path, max_line_bytes=1 << 20)
    dataset = curate_file(tmp_path, path, max_line_bytes=1 << 20, on_error="skip")
    assert dataset.counts["skipped_malformed"] == 1 and dataset.counts["rows_in"] == 40
    csv_path = tmp_path / "long.csv"
    csv_path.write_text("prompt\n" + "".join(f"{t}\n" for t in filler(20)) + "y" * 2_000_000 + "\n")
    with pytest.raises(InputError, match=r"long.csv: line 22: is 2,000,001 bytes long, over curate.max_line_bytes"):
        curate_file(tmp_path, csv_path, max_line_bytes=1 << 20)


@pytest.mark.slow
def test_a_line_far_over_the_limit_costs_no_more_memory_than_a_short_one(tmp_path):
    """A 200 MB line, read in a fresh process: refused by the default limit with the process's peak memory ~flat."""
    import subprocess
    import sys

    path = tmp_path / "huge.jsonl"
    with open(path, "w") as handle:
        handle.write(good_lines(5) + '{"prompt": "')
        for _ in range(200):
            handle.write("z" * 1_000_000)
        handle.write('"}\n')
    script = (
        "import resource, sys\n"
        "from stillhouse.config import CurateConfig\nfrom stillhouse.data.curate import curate\n"
        "from stillhouse.errors import InputError\nfrom stillhouse.store import Store\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n    curate(CurateConfig(source=sys.argv[1], reference_column=None), Store(sys.argv[2]))\n"
        "except InputError as error:\n    print(error)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", script, str(path), str(tmp_path / "store")], capture_output=True, text=True, timeout=300
    )
    message, grown_mb = completed.stdout.strip().splitlines()
    assert "line 6: is 200,000,015 bytes long, over curate.max_line_bytes (33,554,432)" in message, completed.stderr
    assert int(grown_mb) < 64, f"peak memory grew {grown_mb} MB reading a 200 MB line"
