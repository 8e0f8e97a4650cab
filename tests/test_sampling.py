"""Teacher sampling: batched generation, top-k capture, the sharded store and its resume."""

import json
import os

import pytest
import torch

from stillhouse.config import CurateConfig, SampleConfig
from stillhouse.data.curate import curate
from stillhouse.errors import InputError
from stillhouse.models import load_causal_lm, load_tokenizer
from stillhouse.sampling.hf_engine import generate, render_prompts
from stillhouse.sampling.sample import sample_teacher
from stillhouse.sampling.teacher_outputs import read_teacher_outputs
from stillhouse.store import MANIFEST, Store

PROMPTS = [[{"role": "user", "content": text}] for text in ["sort letters: dcba", "reverse: hello there", "hi", "sort numbers: 31 12 77 40"]]


@pytest.fixture(scope="module")
def teacher(tiny_teacher):
    return load_causal_lm(str(tiny_teacher), device="cpu"), load_tokenizer(str(tiny_teacher))


def test_batched_generation_equals_one_at_a_time(teacher):
    model, tokenizer = teacher
    rendered = render_prompts(tokenizer, PROMPTS)
    assert rendered[0] == "<|user|>sort letters: dcba<|assistant|>"
    batched = generate(model, tokenizer, rendered, max_new_tokens=10, batch_size=4)
    single = [generate(model, tokenizer, [prompt], max_new_tokens=10, batch_size=1)[0] for prompt in rendered]
    assert [g.token_ids for g in batched] == [g.token_ids for g in single]
    assert all(len(g.token_ids) <= 10 for g in batched)


def test_top_k_logprobs_are_the_teachers_full_distribution_at_each_generated_position(teacher):
    model, tokenizer = teacher
    rendered = render_prompts(tokenizer, PROMPTS[:2])
    # Sampling at a high temperature must not change the captured log-probs (taken at temperature 1).
    generations = generate(model, tokenizer, rendered, max_new_tokens=6, batch_size=2, top_k_logprobs=5, temperature=1.7, seed=3)
    for prompt, generation in zip(rendered, generations):
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        sequence = torch.tensor([prompt_ids + generation.token_ids])
        with torch.no_grad():
            logprobs = model(sequence).logits[0].log_softmax(-1)
        for j, (ids, values) in enumerate(zip(generation.top_k_ids, generation.top_k_logprobs)):
            expected_values, expected_ids = logprobs[len(prompt_ids) + j - 1].topk(5)
            assert ids == expected_ids.tolist()
            torch.testing.assert_close(torch.tensor(values), expected_values, atol=1e-4, rtol=1e-4)


def test_store_holds_rows_and_manifest_and_resumes_at_shard_level(tmp_path, tiny_teacher, prompts_jsonl):
    store = Store(tmp_path)
    dataset = curate(CurateConfig(source=str(prompts_jsonl)), store)
    config = SampleConfig(teacher=str(tiny_teacher), max_new_tokens=6, top_k_logprobs=3, shard_rows=30, batch_size=16)
    samples = sample_teacher(config, dataset, store)
    folder = tmp_path / "sample" / samples.fingerprint
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["teacher_revision"].startswith("local-sha256:") and manifest["top_k_logprobs"] == 3
    assert manifest["chat_template"] and manifest["engine"] == "hf" and len(manifest["shards"]) == 4
    rows = read_teacher_outputs(folder)
    assert len(rows) == samples.rows == dataset.train_rows + dataset.eval_rows
    assert set(rows["split"]) == {"train", "eval"}
    first = rows.iloc[0]
    assert len(first["top_k_ids"]) == len(first["response_token_ids"]) and len(first["top_k_ids"][0]) == 3

    # A killed run: the manifest never got written and the last shard is missing.
    kept_shard = folder / "shard-00000.parquet"
    kept_mtime = os.stat(kept_shard).st_mtime_ns
    (folder / MANIFEST).unlink()
    (folder / "shard-00003.parquet").unlink()
    resumed = sample_teacher(config, dataset, store)
    assert not resumed.cached and os.stat(kept_shard).st_mtime_ns == kept_mtime
    assert read_teacher_outputs(folder).drop(columns=["top_k_logprobs"]).equals(rows.drop(columns=["top_k_logprobs"]))
    assert sample_teacher(config, dataset, store).cached


def test_k_larger_than_vocabulary_and_missing_teacher_fail_before_loading(tmp_path, tiny_teacher):
    from stillhouse.sampling.sample import check_teacher

    with pytest.raises(InputError, match=r"sample.top_k_logprobs: k=500 is larger than the teacher's vocabulary \(\d+\)"):
        check_teacher(SampleConfig(teacher=str(tiny_teacher), top_k_logprobs=500))
    with pytest.raises(InputError, match=r"sample.teacher: model path '.*no-such-teacher' does not exist"):
        check_teacher(SampleConfig(teacher=str(tmp_path / "no-such-teacher")))
