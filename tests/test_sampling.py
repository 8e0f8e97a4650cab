"""Teacher sampling: batched generation, top-k capture, the sharded store and its resume."""

import json
import os

import pytest
import torch

from stillhouse.config import CurateConfig, SampleConfig
from stillhouse.data.curate import curate
from stillhouse.demo import TEACHER_DIR as DEMO_TEACHER_DIR
from stillhouse.errors import InputError
from stillhouse.models import load_causal_lm, load_tokenizer
from stillhouse.sampling.hf_engine import generate, greedy_loop_supported, render_prompts
from stillhouse.sampling.sample import sample_teacher
from stillhouse.sampling.teacher_outputs import read_teacher_outputs
from stillhouse.store import MANIFEST, Store

PROMPTS = [
    [{"role": "user", "content": text}]
    for text in ["sort letters: dcba", "reverse: hello there", "hi", "sort numbers: 31 12 77 40"]
]


@pytest.fixture(scope="module")
def teacher(tiny_teacher):
    return load_causal_lm(str(tiny_teacher), device="cpu"), load_tokenizer(str(tiny_teacher))


def generate_one(model, tokenizer, prompt: str, max_new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """`model.generate` on one prompt, greedy: its answer up to the first EOS and its logits ``[steps, vocab]``."""
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    output = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        return_dict_in_generate=True,
        output_logits=True,
    )
    answer = output.sequences[0, inputs["input_ids"].shape[1] :].tolist()
    if tokenizer.eos_token_id in answer:
        answer = answer[: answer.index(tokenizer.eos_token_id) + 1]
    return answer, torch.cat(output.logits)


def test_batched_generation_equals_one_at_a_time(teacher):
    model, tokenizer = teacher
    rendered = render_prompts(tokenizer, PROMPTS)
    assert rendered[0] == "<|user|>sort letters: dcba<|assistant|>"
    batched = generate(model, tokenizer, rendered, max_new_tokens=10, batch_size=4)
    single = [generate(model, tokenizer, [prompt], max_new_tokens=10, batch_size=1)[0] for prompt in rendered]
    assert [g.token_ids for g in batched] == [g.token_ids for g in single]
    assert all(len(g.token_ids) <= 10 for g in batched)


def test_the_greedy_loop_retiring_finished_rows_equals_model_generate():
    # The trained demo teacher answers each task with its own length, so rows retire at different steps.
    model, tokenizer = load_causal_lm(str(DEMO_TEACHER_DIR), device="cpu"), load_tokenizer(str(DEMO_TEACHER_DIR))
    rendered = render_prompts(tokenizer, PROMPTS)
    assert greedy_loop_supported(model)
    ours = generate(model, tokenizer, rendered, max_new_tokens=12, batch_size=4, top_k_logprobs=4)
    assert len({len(g.token_ids) for g in ours}) > 1, (
        "rows must finish at different steps for this test to mean anything"
    )
    for prompt, generation in zip(rendered, ours):
        expected, logits = generate_one(model, tokenizer, prompt, max_new_tokens=12)
        assert generation.token_ids == expected
        for position, ids in enumerate(generation.top_k_ids):
            assert ids == logits[position].log_softmax(-1).topk(4).indices.tolist()


def test_prompts_joining_as_rows_retire_reuse_their_shared_instruction_and_answer_as_generate_does():
    # 64 demo prompts through 16 rows: rows retire at different steps and prompts join in small groups that share
    # their task's instruction ("<|user|>sort numbers: "), whose keys and values are kept from the group before.
    from stillhouse.demo.tasks import make_examples

    model, tokenizer = load_causal_lm(str(DEMO_TEACHER_DIR), device="cpu"), load_tokenizer(str(DEMO_TEACHER_DIR))
    rendered = render_prompts(tokenizer, [[{"role": "user", "content": e["prompt"]}] for e in make_examples(64, 5)])
    inputs_seen = []
    hook = model.model.register_forward_pre_hook(
        lambda module, args, kwargs: inputs_seen.append(kwargs["input_ids"].tolist()), with_kwargs=True
    )
    try:
        ours = generate(model, tokenizer, rendered, max_new_tokens=12, batch_size=16, top_k_logprobs=4)
    finally:
        hook.remove()
    # A shared prefix runs as one row; the same prefix again right after it would be work done twice.
    prefixes = [tokenizer.decode(ids[0]) for ids in inputs_seen if len(ids) == 1 and len(ids[0]) > 1]
    assert prefixes and all(a != b for a, b in zip(prefixes, prefixes[1:])), prefixes
    for prompt, generation in zip(rendered, ours):
        expected, logits = generate_one(model, tokenizer, prompt, max_new_tokens=12)
        assert generation.token_ids == expected, prompt
        expected_top = logits[: len(expected)].log_softmax(-1).topk(4).values
        assert torch.allclose(torch.tensor(generation.top_k_logprobs), expected_top, atol=1e-4), prompt


def test_a_generation_config_that_changes_greedy_decoding_goes_through_generate(teacher):
    model, tokenizer = teacher
    rendered = render_prompts(tokenizer, PROMPTS[:2])
    model.generation_config.repetition_penalty = 3.0
    try:
        assert not greedy_loop_supported(model)
        ours = generate(model, tokenizer, rendered, max_new_tokens=10, batch_size=2)
        for prompt, generation in zip(rendered, ours):
            inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
            expected = model.generate(
                **inputs, max_new_tokens=10, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )[0, inputs["input_ids"].shape[1] :].tolist()
            assert generation.token_ids == expected[: len(generation.token_ids)]
    finally:
        model.generation_config.repetition_penalty = 1.0


def test_top_k_logprobs_are_the_teachers_full_distribution_at_each_generated_position(teacher):
    model, tokenizer = teacher
    rendered = render_prompts(tokenizer, PROMPTS[:2])
    # Sampling at a high temperature must not change the captured log-probs (taken at temperature 1).
    generations = generate(
        model, tokenizer, rendered, max_new_tokens=6, batch_size=2, top_k_logprobs=5, temperature=1.7, seed=3
    )
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
    assert manifest["teacher_outputs_format"] == 2 and {shard["format"] for shard in manifest["shards"]} == {2}
    assert manifest["logprob_precision"]["max_error"] < 1e-3
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

    with pytest.raises(
        InputError, match=r"sample.top_k_logprobs: k=500 is larger than the teacher's vocabulary \(\d+\)"
    ):
        check_teacher(SampleConfig(teacher=str(tiny_teacher), top_k_logprobs=500))
    with pytest.raises(InputError, match=r"sample.teacher: model path '.*no-such-teacher' does not exist"):
        check_teacher(SampleConfig(teacher=str(tmp_path / "no-such-teacher")))


def test_token_budget_batches_hold_the_budget_and_give_the_same_greedy_outputs(teacher):
    from stillhouse.sampling.hf_engine import plan_batches

    batches = plan_batches([5, 30, 10, 12, 7], batch_size=4, batch_tokens=100, max_new_tokens=10, n=1)
    assert sorted(i for batch in batches for i in batch) == [0, 1, 2, 3, 4]
    assert all(len(b) * (max([5, 30, 10, 12, 7][i] for i in b) + 10) <= 100 or len(b) == 1 for b in batches)
    assert batches[0] == [0, 4, 2, 3][: len(batches[0])]  # shortest first
    model, tokenizer = teacher
    rendered = render_prompts(tokenizer, PROMPTS)
    budgeted = generate(model, tokenizer, rendered, max_new_tokens=10, batch_size=64, batch_tokens=70)
    single = generate(model, tokenizer, rendered, max_new_tokens=10, batch_size=1)
    assert [g.token_ids for g in budgeted] == [g.token_ids for g in single]


def test_tail_mass_completes_the_top_k_to_one(teacher):
    model, tokenizer = teacher
    (generation,) = generate(
        model, tokenizer, render_prompts(tokenizer, PROMPTS[:1]), max_new_tokens=5, top_k_logprobs=3
    )
    total = torch.tensor(generation.top_k_logprobs).exp().sum(-1) + torch.tensor(generation.tail_logprobs).exp()
    torch.testing.assert_close(total, torch.ones(len(generation.token_ids)), atol=1e-5, rtol=0)


def test_n_samples_per_prompt_are_seeded_and_top_k_1_sampling_is_greedy(teacher):
    model, tokenizer = teacher
    rendered = render_prompts(tokenizer, PROMPTS[:2])
    sampled = generate(model, tokenizer, rendered, max_new_tokens=8, temperature=1.0, n=3, seed=7)
    assert [g.sample_index for g in sampled] == [0, 1, 2, 0, 1, 2]
    assert [
        g.token_ids for g in generate(model, tokenizer, rendered, max_new_tokens=8, temperature=1.0, n=3, seed=7)
    ] == [g.token_ids for g in sampled]
    assert len({tuple(g.token_ids) for g in sampled[:3]}) > 1  # a random 2-layer model samples different answers
    greedy = generate(model, tokenizer, rendered, max_new_tokens=8)
    top_1 = generate(model, tokenizer, rendered, max_new_tokens=8, temperature=1.3, top_k=1, n=2, seed=1)
    assert [g.token_ids for g in top_1] == [g.token_ids for g in greedy for _ in range(2)]


def test_a_stop_string_ends_the_response_at_the_token_that_completes_it(teacher):
    model, tokenizer = teacher
    rendered = render_prompts(tokenizer, PROMPTS[:1])
    (full,) = generate(model, tokenizer, rendered, max_new_tokens=12)
    stop = full.text[3:5]
    (stopped,) = generate(model, tokenizer, rendered, max_new_tokens=12, stop=[stop, "never-there"], top_k_logprobs=2)
    cut = full.text.index(stop) + len(stop)
    assert stopped.text == full.text[:cut] and stopped.token_ids == full.token_ids[: len(stopped.token_ids)]
    assert len(stopped.top_k_ids) == len(stopped.tail_logprobs) == len(stopped.token_ids)


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory, prompts_jsonl):
    return curate(CurateConfig(source=str(prompts_jsonl)), Store(tmp_path_factory.mktemp("curated")))


def test_overlong_prompts_fail_before_sampling_or_are_truncated_or_skipped_and_counted(
    tmp_path, tiny_teacher, small_dataset
):
    from stillhouse.sampling.sample import plan_shards

    settings = {
        "teacher": str(tiny_teacher),
        "max_new_tokens": 4,
        "top_k_logprobs": 2,
        "context_length": 24,
        "shard_rows": 50,
    }
    with pytest.raises(
        InputError,
        match=r"prompt '\w+' \((train|eval) split\): \d+ tokens \+ max_new_tokens 4 exceed the teacher's context "
        r"of 24; set sample.overlong_prompts",
    ):
        plan_shards(SampleConfig(**settings), small_dataset, Store(tmp_path))
    assert not list(tmp_path.rglob("shard-*"))

    skipped = sample_teacher(SampleConfig(**settings, overlong_prompts="skip"), small_dataset, Store(tmp_path))
    counts = json.loads((tmp_path / "sample" / skipped.fingerprint / MANIFEST).read_text())["counts"]
    assert counts["skipped"] > 0 and counts["truncated"] == 0
    assert skipped.rows == small_dataset.train_rows + small_dataset.eval_rows - counts["skipped"]

    truncated = sample_teacher(
        SampleConfig(**settings, overlong_prompts="truncate_left"), small_dataset, Store(tmp_path)
    )
    counts = json.loads((tmp_path / "sample" / truncated.fingerprint / MANIFEST).read_text())["counts"]
    assert counts == {"truncated": skipped_count(skipped, small_dataset), "skipped": 0}
    assert truncated.rows == small_dataset.train_rows + small_dataset.eval_rows


def skipped_count(samples, dataset) -> int:
    return dataset.train_rows + dataset.eval_rows - samples.rows


def test_n_samples_land_in_the_store_as_rows_with_a_sample_index(tmp_path, tiny_teacher, small_dataset):
    config = SampleConfig(teacher=str(tiny_teacher), max_new_tokens=4, top_k_logprobs=2, temperature=0.8, n=2, seed=3)
    samples = sample_teacher(config, small_dataset, Store(tmp_path))
    rows = read_teacher_outputs(samples.path)
    assert samples.rows == 2 * (small_dataset.train_rows + small_dataset.eval_rows) == len(rows)
    assert all(sorted(indices) == [0, 1] for indices in rows.groupby("prompt_id")["sample_index"].apply(list))
    assert list(rows.columns) == [
        "prompt_id",
        "split",
        "sample_index",
        "response_text",
        "response_token_ids",
        "top_k_ids",
        "top_k_logprobs",
        "tail_logprobs",
    ]
    assert (
        str(rows["top_k_ids"].iloc[0][0].dtype) == "int32" and str(rows["top_k_logprobs"].iloc[0][0].dtype) == "float32"
    )


def test_teacher_without_chat_template_and_bad_revision_and_vllm_without_gpu_fail_before_sampling(
    tmp_path, tiny_teacher, monkeypatch
):
    import shutil

    from stillhouse.sampling.sample import check_teacher

    plain = tmp_path / "plain-teacher"
    shutil.copytree(tiny_teacher, plain)
    (plain / "chat_template.jinja").unlink()
    tokenizer_config = json.loads((plain / "tokenizer_config.json").read_text())
    tokenizer_config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    with pytest.raises(
        InputError, match=r"sample.teacher: '.*plain-teacher' has no chat template, and the prompts are chat messages"
    ):
        check_teacher(SampleConfig(teacher=str(plain)))

    from huggingface_hub import constants

    monkeypatch.setattr(
        constants, "HF_HUB_OFFLINE", True
    )  # no network: the lookup fails at once, as a missing repo would
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    with pytest.raises(
        InputError, match=r"sample.teacher/sample.revision: cannot read 'no-org/no-model' at revision 'v9'"
    ):
        check_teacher(SampleConfig(teacher="no-org/no-model", revision="v9"))

    if not torch.cuda.is_available():
        with pytest.raises(
            InputError,
            match=r"sample.engine: `vllm` needs vLLM and a CUDA GPU; install it with `pip install stillhouse\[vllm\]`",
        ):
            check_teacher(SampleConfig(teacher=str(tiny_teacher), engine="vllm"))


def test_config_refuses_meaningless_sampling_settings():
    with pytest.raises(ValueError, match="n=2 greedy responses would all be the same"):
        SampleConfig(teacher="x", n=2)
    with pytest.raises(ValueError, match="top_k only applies when temperature > 0"):
        SampleConfig(teacher="x", top_k=5)
    with pytest.raises(ValueError, match="greater than 0"):
        SampleConfig(teacher="x", batch_tokens=0)


def qwen25_05b_shaped_teacher(folder, prompt_words: list[str]):
    """A random-init teacher of Qwen2.5-0.5B's shape, and a WordLevel tokenizer of its 151,936-token vocabulary.

    Qwen2 with hidden 896, 24 layers, 14 heads (2 KV heads), MLP 4864, tied embeddings, saved in bfloat16
    as the real checkpoint is. The tokenizer is built offline: ChatML specials, the prompts' words, then
    filler words up to the model's vocabulary, split on whitespace, with a ChatML chat template.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    vocab_size = 151_936
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
    words = list(dict.fromkeys(specials + prompt_words))
    words += [f"w{i}" for i in range(vocab_size - len(words))]
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<|endoftext|>", eos_token="<|im_end|>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tokenizer.chat_template = (
        "{% for message in messages %}{{ '<|im_start|> ' + message['role'] + ' ' + message['content'] + "
        "' <|im_end|> ' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|> assistant ' }}{% endif %}"
    )
    assert len(tokenizer) == vocab_size
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=vocab_size,
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            max_position_embeddings=32768,
            rope_theta=1_000_000.0,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=None,
        )
    ).to(torch.bfloat16)
    parameters = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return parameters


def peak_rss_reset() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS; False where the kernel doesn't allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        return True
    except OSError:
        return False


def rss_mb(field: str) -> float:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


@pytest.mark.slow
def test_a_teacher_of_qwen25_05b_shape_samples_with_top_k_through_the_hf_engine(tmp_path):
    """Real shape, random weights: a 494M-parameter Qwen2 teacher with a 151,936-token vocabulary, top-16 capture.

    Prints the sampling stage's wall time and the process's peak memory while it ran (and writes both to
    tmp_path / "figures.json"); asserts only what must hold at this vocabulary size.
    """
    import time

    texts = [
        "sort letters : d c b a",
        "reverse : hello there",
        "name a word that starts with b",
        "hi",
        "give any number between 10 and 20",
        "sort numbers : 31 12 77 40",
        "what is two plus two",
        "say something kind",
    ]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": text}) + "\n" for text in texts))
    teacher = tmp_path / "qwen2.5-0.5b-shaped"
    words = sorted({word for text in texts for word in text.split()} | {"user", "assistant"})
    parameters = qwen25_05b_shaped_teacher(teacher, words)
    assert 490e6 < parameters < 500e6  # Qwen2.5-0.5B has 494M

    dataset = curate(CurateConfig(source=str(prompts), eval_fraction=0.5), Store(tmp_path / "curated"))
    config = SampleConfig(teacher=str(teacher), max_new_tokens=6, top_k_logprobs=16, batch_size=8, device="cpu")
    import gc

    gc.collect()
    measured = peak_rss_reset()
    before = rss_mb("VmRSS")
    started = time.perf_counter()
    samples = sample_teacher(config, dataset, Store(tmp_path / "samples"))
    seconds = time.perf_counter() - started
    figures = {
        "parameters": parameters,
        "sample_seconds": round(seconds, 2),
        "rss_before_mb": round(before),
        "peak_rss_mb": round(rss_mb("VmHWM")) if measured else None,
        "generated_tokens": samples.generated_tokens,
    }
    (tmp_path / "figures.json").write_text(json.dumps(figures))
    print("qwen2.5-0.5b-shaped sampling:", json.dumps(figures))

    rows = read_teacher_outputs(samples.path)
    assert len(rows) == len(texts) and samples.generated_tokens > 0
    for row in rows.itertuples():
        assert 0 < len(row.response_token_ids) <= 6 and len(row.top_k_ids) == len(row.response_token_ids)
        for ids, logprobs, token in zip(row.top_k_ids, row.top_k_logprobs, row.response_token_ids):
            assert len(ids) == 16 and len(set(ids)) == 16 and all(0 <= i < 151_936 for i in ids)
            assert ids[0] == token  # greedy: the response token is the most likely one
            assert all(a >= b for a, b in zip(logprobs, logprobs[1:]))  # best first
