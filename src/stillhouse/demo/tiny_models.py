"""Tiny, random Hugging Face model folders and a prompts file, to try Stillhouse with "your own" models offline.

    python -m stillhouse.demo.tiny_models my-models     # my-models/teacher, my-models/student, my-models/prompts.jsonl

The teacher is a Llama and the student a Qwen2, each with its own byte-level BPE tokenizer (trained here on the
demo tasks' text, with different vocabulary sizes) and ChatML chat template: two model families that don't share
a vocabulary, as with most real pairs. Both are random: they are stand-ins for the folders you would point the
config at (anything `save_pretrained` wrote), and the walkthrough in the README runs on them in a minute.
The prompts are OpenAI `messages` rows with a `reference` answer, from the demo tasks.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from stillhouse.demo.tasks import make_examples

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def bpe_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts``, with ChatML special tokens; its answers end with <|im_end|>."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", padding_side="left"
    )
    tokenizer.chat_template = CHATML
    return tokenizer


def write_models(folder: Path, rows: int = 240, seed: int = 0) -> dict[str, Path]:
    """Write teacher/, student/ and prompts.jsonl into ``folder``; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    examples = make_examples(rows, seed)
    texts = [f"{e['prompt']}\n{e['reference']}" for e in make_examples(4000, seed + 1)]
    paths = {"teacher": folder / "teacher", "student": folder / "student", "prompts": folder / "prompts.jsonl"}
    torch.manual_seed(seed)
    for role, vocab_size, build in (
        (
            "teacher",
            600,
            lambda v: LlamaForCausalLM(
                LlamaConfig(
                    vocab_size=v,
                    hidden_size=64,
                    intermediate_size=128,
                    num_hidden_layers=2,
                    num_attention_heads=4,
                    num_key_value_heads=4,
                    max_position_embeddings=256,
                    tie_word_embeddings=True,
                )
            ),
        ),
        (
            "student",
            420,
            lambda v: Qwen2ForCausalLM(
                Qwen2Config(
                    vocab_size=v,
                    hidden_size=32,
                    intermediate_size=64,
                    num_hidden_layers=2,
                    num_attention_heads=2,
                    num_key_value_heads=1,
                    max_position_embeddings=256,
                    tie_word_embeddings=True,
                )
            ),
        ),
    ):
        tokenizer = bpe_tokenizer(texts, vocab_size)
        model = build(len(tokenizer))
        model.config.update(
            {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id, "bos_token_id": None}
        )
        model.generation_config.update(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        model.save_pretrained(paths[role])
        tokenizer.save_pretrained(paths[role])
        # Declared apache-2.0, as a model of your own would declare its license in its card.
        (paths[role] / "README.md").write_text(f"---\nlicense: apache-2.0\n---\n# A tiny random {role}\n")
    with open(paths["prompts"], "w") as handle:
        for example in examples:
            handle.write(
                json.dumps(
                    {
                        "messages": [{"role": "user", "content": example["prompt"]}],
                        "reference": example["reference"],
                        "task": example["task"],
                    }
                )
                + "\n"
            )
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="where to write teacher/, student/ and prompts.jsonl")
    parser.add_argument("--rows", type=int, default=240, help="prompts to write (default: 240)")
    arguments = parser.parse_args()
    for name, path in write_models(arguments.folder, arguments.rows).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
