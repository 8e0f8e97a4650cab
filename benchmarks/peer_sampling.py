"""Teacher sampling against the peer a user would otherwise write: left-padded batched `model.generate`.

    .venv/bin/python benchmarks/peer_sampling.py [--quick]

Two shapes, greedy decoding, one torch thread for both sides, repeats alternating peer / ours, medians:

- ``decode``: a decode-dominated shape. A random-init Llama of about 50M parameters (hidden 512, 10 layers,
  vocabulary 32,000, tied embeddings), 32 prompts of 48-80 random tokens, up to 128 new tokens. A random model
  never says its end-of-sequence token on its own, so its end token's embedding is scaled until answers end at
  scattered steps (1-128 tokens, about half the maximum on average), as real answers of mixed length do. Both
  sides run the same model with the same end token.
- ``demo``: the bundled demo teacher on 256 demo prompts (about 19 prompt tokens, answers of about 6), up to 32
  new tokens, batches of 64 prompts on both sides.

Each shape is measured without and with top-k capture (k = 16). The peer captures top-k the way a user of
`generate` would: ``output_logits=True``, then a log-softmax and ``topk`` over each step's logits.

The peer: ``tokenizer.padding_side = "left"``, the whole batch through ``model.generate(do_sample=False,
max_new_tokens=..., eos_token_id=..., pad_token_id=...)``, answers cut at their first end token. Ours:
`stillhouse.sampling.hf_engine.generate`. Every repeat checks that both give token-identical answers.
Throughput is generated answer tokens (up to and including the end token) per second of wall time.

The last line printed is the JSON result.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from tokenizers import Tokenizer, models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from stillhouse.demo import TEACHER_DIR as DEMO_TEACHER_DIR
from stillhouse.demo.tasks import make_examples
from stillhouse.models import load_causal_lm, load_tokenizer
from stillhouse.sampling.hf_engine import generate, render_prompts

TOP_K = 16
DECODE_VOCAB = 32_000
END_TOKEN, END_TOKEN_SCALE = 2, 2.0
DECODE_BATCH = 16  # rows decoded at once, both sides; a sampling job has many more prompts than that


def cut_at_end(tokens: list[int], eos_id: int) -> list[int]:
    return tokens[: tokens.index(eos_id) + 1] if eos_id in tokens else tokens


@torch.inference_mode()
def peer_generate(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int, batch_size: int, top_k: int):
    """Left-padded batched `generate`, what a user writes; (answers, top-k log-prob tensors per answer or None)."""
    tokenizer.padding_side = "left"
    answers, captured = [], []
    for start in range(0, len(prompt_ids), batch_size):
        batch = tokenizer.pad({"input_ids": prompt_ids[start : start + batch_size]}, padding=True, return_tensors="pt")
        output = model.generate(
            **batch,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            return_dict_in_generate=True,
            output_logits=top_k > 0,
        )
        new = output.sequences[:, batch["input_ids"].shape[1] :].tolist()
        rows = [cut_at_end(tokens, tokenizer.eos_token_id) for tokens in new]
        answers += rows
        if top_k:
            logits = torch.stack(output.logits, dim=1)  # [rows, steps, vocab]
            values, ids = torch.log_softmax(logits.float(), dim=-1).topk(top_k, dim=-1)
            captured += [(values[i, : len(row)], ids[i, : len(row)]) for i, row in enumerate(rows)]
    return answers, (captured if top_k else None)


def ours(model, tokenizer, prompt_ids, max_new_tokens: int, batch_size: int, top_k: int):
    generations = generate(
        model, tokenizer, prompt_ids, max_new_tokens=max_new_tokens, batch_size=batch_size, top_k_logprobs=top_k
    )
    return [g.token_ids for g in generations], generations


def word_level_tokenizer(vocab: int, eos_id: int) -> PreTrainedTokenizerFast:
    """A tokenizer over ids only (``t0`` ... ``t{vocab-1}``): the random model has no text."""
    backend = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=f"t{eos_id}", pad_token="t0")


def decode_shape(quick: bool) -> tuple:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=DECODE_VOCAB,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=10,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        initializer_range=0.1,  # at 0.02 a random Llama repeats one token forever; at 0.1 its answers vary
    )
    model = LlamaForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(1)
    count = 2 * DECODE_BATCH if quick else 3 * DECODE_BATCH
    lengths = torch.randint(48, 81, (count,), generator=generator).tolist()
    prompt_ids = [torch.randint(1, DECODE_VOCAB, (n,), generator=generator).tolist() for n in lengths]
    max_new_tokens = 128
    # A random model's greedy answers never end on their own. Its end token's (tied) embedding row, scaled by 2,
    # wins the argmax at scattered steps: with this seed the answers end after 1 to 128 tokens, 61 on average
    # (measured), as real answers of mixed length do.
    eos_id = END_TOKEN
    with torch.no_grad():
        model.model.embed_tokens.weight[eos_id] *= END_TOKEN_SCALE
    tokenizer = word_level_tokenizer(DECODE_VOCAB, eos_id)
    parameters = sum(p.numel() for p in model.parameters())
    return model, tokenizer, prompt_ids, max_new_tokens, DECODE_BATCH, {"parameters": parameters, "end_token": eos_id}


def demo_shape(quick: bool) -> tuple:
    model, tokenizer = load_causal_lm(str(DEMO_TEACHER_DIR), device="cpu"), load_tokenizer(str(DEMO_TEACHER_DIR))
    examples = make_examples(128 if quick else 256, seed=11)
    prompts = render_prompts(tokenizer, [[{"role": "user", "content": e["prompt"]}] for e in examples])
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    parameters = sum(p.numel() for p in model.parameters())
    return model, tokenizer, prompt_ids, 32, 64, {"parameters": parameters}


def measure(shape: str, quick: bool, repeats: int) -> dict:
    model, tokenizer, prompt_ids, max_new_tokens, batch_size, about = (
        decode_shape(quick) if shape == "decode" else demo_shape(quick)
    )
    ours(model, tokenizer, prompt_ids[:4], 4, batch_size, 0)  # warm-up: first-call allocations on both paths
    peer_generate(model, tokenizer, prompt_ids[:4], 4, batch_size, 0)
    result: dict = {"prompts": len(prompt_ids), "max_new_tokens": max_new_tokens, "batch_size": batch_size, **about}
    for label, k in (("greedy", 0), ("top16", TOP_K)):
        seconds: dict[str, list[float]] = {"peer": [], "ours": []}
        identical, max_logprob_gap, tokens = True, 0.0, 0
        for _ in range(repeats):
            started = time.perf_counter()
            peer_answers, peer_captured = peer_generate(model, tokenizer, prompt_ids, max_new_tokens, batch_size, k)
            seconds["peer"].append(time.perf_counter() - started)
            started = time.perf_counter()
            our_answers, generations = ours(model, tokenizer, prompt_ids, max_new_tokens, batch_size, k)
            seconds["ours"].append(time.perf_counter() - started)
            identical &= our_answers == peer_answers
            tokens = sum(map(len, peer_answers))
            if k and identical:
                for (values, _ids), generation in zip(peer_captured, generations):
                    ours_values = torch.as_tensor(generation.top_k_logprobs, dtype=torch.float32)
                    # Top-k sets can differ in the order of exact ties; compare the values, which can't.
                    max_logprob_gap = max(max_logprob_gap, float((ours_values - values).abs().max()))
        peer_s, ours_s = statistics.median(seconds["peer"]), statistics.median(seconds["ours"])
        result[label] = {
            "answer_tokens": tokens,
            "mean_answer_tokens": round(tokens / len(prompt_ids), 1),
            "peer_tokens_per_s": round(tokens / peer_s, 1),
            "ours_tokens_per_s": round(tokens / ours_s, 1),
            "ours_over_peer": round(peer_s / ours_s, 2),
            "identical_answers": identical,
            **({"max_top_k_logprob_difference": round(max_logprob_gap, 5)} if k else {}),
        }
    return result


def run(quick: bool = False) -> dict:
    torch.set_num_threads(1)
    repeats = 3
    started = time.perf_counter()
    shapes = {shape: measure(shape, quick, repeats) for shape in ("decode", "demo")}
    return {
        "benchmark": "peer_sampling",
        "peer": "left-padded batched transformers generate (greedy), same batch size, same end token",
        "threads": 1,
        "repeats": repeats,
        "quick": quick,
        **shapes,
        "ratios": {
            f"{shape}_{mode}": shapes[shape][mode]["ours_over_peer"] for shape in shapes for mode in ("greedy", "top16")
        },
        "seconds": round(time.perf_counter() - started, 1),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer prompts (a smoke run, about a minute)")
    print(json.dumps(run(parser.parse_args().quick)))
