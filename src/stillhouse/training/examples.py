"""Training and evaluation examples: prompt + teacher response as token ids, the prompt masked,
and the batches they pad into.

Both the training stage (the student learns on the train split) and the evaluation stage (it scores the
held-out responses: perplexity, KL, top-1 agreement) build their examples here, so they tokenize and align
the teacher's top-k the same way.
"""

from __future__ import annotations

import json

import torch

from stillhouse.data.curate import read_split
from stillhouse.refs import DatasetRef, SamplesRef
from stillhouse.sampling.hf_engine import render_prompts
from stillhouse.sampling.teacher_outputs import read_teacher_outputs


def build_examples(
    dataset: DatasetRef,
    samples: SamplesRef,
    tokenizer,
    *,
    split: str,
    shared_vocabulary: bool,
    with_top_k: bool,
    max_seq_len: int,
    prompt_ids: set[str] | None = None,
) -> list[dict]:
    """Token ids, labels (prompt masked) and, ``with_top_k``, top-k targets aligned with the labels.

    ``prompt_ids`` keeps only those prompts' responses (all of the split when None).
    """
    prompts = read_split(dataset, split).set_index("prompt_id")
    outputs = read_teacher_outputs(samples.path, split=split)
    if prompt_ids is not None:
        outputs = outputs[outputs["prompt_id"].isin(prompt_ids)]
    rendered = render_prompts(tokenizer, [json.loads(prompts.at[pid, "messages"]) for pid in outputs["prompt_id"]])
    examples = []
    for prompt, row in zip(rendered, outputs.itertuples(index=False)):
        prompt_tokens = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if shared_vocabulary:
            response_ids = list(row.response_token_ids)
        else:
            response_ids = tokenizer(row.response_text, add_special_tokens=False)["input_ids"] + [
                tokenizer.eos_token_id
            ]
        input_ids = (prompt_tokens + response_ids)[:max_seq_len]
        example = {
            "input_ids": input_ids,
            "labels": ([-100] * len(prompt_tokens) + response_ids)[:max_seq_len],
            "prompt_length": len(prompt_tokens),
        }
        if with_top_k:
            k = samples.top_k_logprobs
            # Teacher top-k for response token j sits at label position len(prompt) + j.
            example["top_k_ids"] = ([[0] * k] * len(prompt_tokens) + [list(ids) for ids in row.top_k_ids])[:max_seq_len]
            example["top_k_logprobs"] = ([[0.0] * k] * len(prompt_tokens) + [list(lp) for lp in row.top_k_logprobs])[
                :max_seq_len
            ]
        examples.append(example)
    return examples


class PadCollator:
    """Right-pads a batch; labels with -100, top-k targets with zeros (masked by the labels).

    With ``with_prompts`` it also returns the prompts alone, left-padded, for on-policy rollouts.
    """

    def __init__(self, pad_token_id: int, with_prompts: bool = False):
        self.pad_token_id, self.with_prompts = pad_token_id, with_prompts

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(example["input_ids"]) for example in batch)
        collated = {
            "input_ids": torch.full((len(batch), width), self.pad_token_id),
            "attention_mask": torch.zeros((len(batch), width), dtype=torch.long),
            "labels": torch.full((len(batch), width), -100),
        }
        if "top_k_ids" in batch[0]:
            k = len(batch[0]["top_k_ids"][0])
            collated["top_k_ids"] = torch.zeros((len(batch), width, k), dtype=torch.long)
            collated["top_k_logprobs"] = torch.zeros((len(batch), width, k))
        for row, example in enumerate(batch):
            length = len(example["input_ids"])
            collated["input_ids"][row, :length] = torch.tensor(example["input_ids"])
            collated["attention_mask"][row, :length] = 1
            collated["labels"][row, :length] = torch.tensor(example["labels"])
            if "top_k_ids" in example:
                collated["top_k_ids"][row, :length] = torch.tensor(example["top_k_ids"])
                collated["top_k_logprobs"][row, :length] = torch.tensor(example["top_k_logprobs"])
        if self.with_prompts:
            prompt_width = max(example["prompt_length"] for example in batch)
            collated["prompt_input_ids"] = torch.full((len(batch), prompt_width), self.pad_token_id)
            collated["prompt_attention_mask"] = torch.zeros((len(batch), prompt_width), dtype=torch.long)
            for row, example in enumerate(batch):
                length = example["prompt_length"]
                collated["prompt_input_ids"][row, prompt_width - length :] = torch.tensor(example["input_ids"][:length])
                collated["prompt_attention_mask"][row, prompt_width - length :] = 1
        return collated
