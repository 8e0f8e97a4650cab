"""Training and evaluation examples: prompt + teacher response as token ids, the prompt masked,
and the batches they pad into.

Both the training stage (the student learns on the train split) and the evaluation stage (it scores the
held-out responses: perplexity, KL, top-1 agreement) build their examples here, so they tokenize and align
the teacher's top-k the same way.

Across tokenizers (``train.kd.align: uld | byte``) the stored top-k is in the teacher's vocabulary and its
positions are the teacher's tokens: `build_examples` maps it onto the student's tokens once, here, into
``cross_ids`` / ``cross_logprobs`` / ``cross_mask`` (`cross_tokenizer.offline_targets`), so no training step
repeats that work. For a live teacher (online or served) it keeps what the teacher needs to score the response
in its own tokenization: the prompt rendered with the teacher's chat template and the response text.
"""

from __future__ import annotations

import json

import torch

from stillhouse.data.curate import read_split
from stillhouse.refs import DatasetRef, SamplesRef
from stillhouse.sampling.hf_engine import render_prompts
from stillhouse.sampling.teacher_outputs import read_teacher_outputs
from stillhouse.training.cross_tokenizer import TokenizerPair, offline_targets


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
    align: str = "none",
    pair: TokenizerPair | None = None,
    with_teacher_prompts: bool = False,
) -> list[dict]:
    """Token ids, labels (prompt masked) and, ``with_top_k``, the stored top-k of the response positions.

    ``with_top_k`` (shared tokenizer) adds ``response_top_k_ids`` (int32) / ``response_top_k_logprobs`` (fp32)
    ``[response positions kept, k]`` tensors: row j is the teacher's top-k for response token j, i.e. for label
    position ``prompt_length + j``; `PadCollator` places them there.

    ``prompt_ids`` keeps only those prompts' responses (all of the split when None).

    Across tokenizers (``align`` ``uld`` or ``byte``, with ``pair`` the teacher's and ``tokenizer``'s
    `TokenizerPair`): ``with_top_k`` gives ``cross_ids`` / ``cross_logprobs`` ``[length, k]`` and ``cross_mask``
    ``[length]`` tensors (the stored top-k mapped onto the student's tokens, `cross_tokenizer.CrossTargets`)
    instead of ``top_k_ids`` / ``top_k_logprobs``; ``with_teacher_prompts`` adds ``teacher_prompt_ids`` (the
    prompt in the teacher's tokens, its chat template) and ``response_text``, for a live teacher to score.
    """
    cross = align != "none"
    if (cross or with_teacher_prompts) and pair is None:
        raise ValueError(f"align={align!r} / with_teacher_prompts need the TokenizerPair of teacher and student")
    prompts = read_split(dataset, split).set_index("prompt_id")
    outputs = read_teacher_outputs(samples.path, split=split)
    if prompt_ids is not None:
        outputs = outputs[outputs["prompt_id"].isin(prompt_ids)]
    rendered = render_prompts(tokenizer, [json.loads(prompts.at[pid, "messages"]) for pid in outputs["prompt_id"]])
    if with_teacher_prompts:
        teacher_rendered = render_prompts(
            pair.teacher, [json.loads(prompts.at[pid, "messages"]) for pid in outputs["prompt_id"]]
        )
    examples = []
    for index, (prompt, row) in enumerate(zip(rendered, outputs.itertuples(index=False))):
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
        if with_top_k and cross:
            # Once per example: the teacher's stored top-k at the student's positions, in its vocabulary.
            targets = offline_targets(
                pair,
                align,
                [row._asdict()],
                [response_ids],
                [len(prompt_tokens)],
                len(input_ids),
                k=samples.top_k_logprobs,
            )
            example["cross_ids"], example["cross_logprobs"], example["cross_mask"] = (t[0] for t in targets)
        elif with_top_k:
            # Response positions only, as tensors made once here: the collator places them at label positions
            # prompt_length + j by slicing (no per-batch conversion of nested lists, no rows of zeros for the prompt).
            kept = max(len(input_ids) - len(prompt_tokens), 0)
            example["response_top_k_ids"] = torch.tensor(row.top_k_ids[:kept], dtype=torch.int32)
            example["response_top_k_logprobs"] = torch.tensor(row.top_k_logprobs[:kept], dtype=torch.float32)
        if with_teacher_prompts:
            example["teacher_prompt_ids"] = pair.teacher(teacher_rendered[index], add_special_tokens=False)["input_ids"]
            example["response_text"] = row.response_text
        examples.append(example)
    return examples


class PadCollator:
    """Right-pads a batch; labels with -100, top-k targets with zeros (masked by the labels).

    An example's ``response_top_k_ids`` / ``response_top_k_logprobs`` ``[response positions, k]`` are copied by
    slicing into the batch's ``top_k_ids`` / ``top_k_logprobs`` ``[B, width, k]`` at the label positions
    ``prompt_length + j``, zeros elsewhere. With ``with_prompts`` it also returns the prompts alone, left-padded, for
    on-policy rollouts. Cross-tokenizer targets (``cross_*``) are padded the same way, ``cross_mask`` with False;
    a live teacher's ``teacher_prompt_ids`` and ``response_text`` pass through as lists.
    """

    def __init__(self, pad_token_id: int, with_prompts: bool = False):
        self.pad_token_id, self.with_prompts = pad_token_id, with_prompts

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        if "top_k_ids" in batch[0]:
            raise ValueError(
                "examples carry `top_k_ids` (the top-k of every position, prompt included), a layout PadCollator no "
                "longer reads: give each example `response_top_k_ids` / `response_top_k_logprobs` tensors of its "
                "response positions, as build_examples makes them"
            )
        lengths = [len(example["input_ids"]) for example in batch]
        width = max(lengths)
        # One tensor call per field for the whole batch (one per example costs more than the copy itself).
        collated = {
            "input_ids": torch.tensor(
                [list(example["input_ids"]) + [self.pad_token_id] * (width - n) for example, n in zip(batch, lengths)]
            ),
            "attention_mask": (torch.arange(width) < torch.tensor(lengths)[:, None]).long(),
            "labels": torch.tensor(
                [list(example["labels"]) + [-100] * (width - n) for example, n in zip(batch, lengths)]
            ),
        }
        if "response_top_k_ids" in batch[0]:
            k = batch[0]["response_top_k_ids"].shape[-1]
            collated["top_k_ids"] = torch.zeros((len(batch), width, k), dtype=torch.long)
            collated["top_k_logprobs"] = torch.zeros((len(batch), width, k))
            for row, example in enumerate(batch):
                start = example["prompt_length"]
                end = start + len(example["response_top_k_ids"])
                collated["top_k_ids"][row, start:end] = example["response_top_k_ids"]
                collated["top_k_logprobs"][row, start:end] = example["response_top_k_logprobs"]
        if "cross_ids" in batch[0]:
            collated.update(_padded_cross_targets(batch, width))
        if "teacher_prompt_ids" in batch[0]:
            collated["teacher_prompt_ids"] = [example["teacher_prompt_ids"] for example in batch]
            collated["response_text"] = [example["response_text"] for example in batch]
        if self.with_prompts:
            prompt_width = max(example["prompt_length"] for example in batch)
            collated["prompt_input_ids"] = torch.full((len(batch), prompt_width), self.pad_token_id)
            collated["prompt_attention_mask"] = torch.zeros((len(batch), prompt_width), dtype=torch.long)
            for row, example in enumerate(batch):
                length = example["prompt_length"]
                collated["prompt_input_ids"][row, prompt_width - length :] = collated["input_ids"][row, :length]
                collated["prompt_attention_mask"][row, prompt_width - length :] = 1
        return collated


def _padded_cross_targets(batch: list[dict], width: int) -> dict[str, torch.Tensor]:
    """``cross_ids`` / ``cross_logprobs`` ``[B, width, k]`` and ``cross_mask`` ``[B, width]``, right-padded."""
    k = batch[0]["cross_ids"].shape[-1]
    padded = {
        "cross_ids": torch.zeros((len(batch), width, k), dtype=torch.long),
        "cross_logprobs": torch.zeros((len(batch), width, k)),
        "cross_mask": torch.zeros((len(batch), width), dtype=torch.bool),
    }
    for row, example in enumerate(batch):
        for key, values in padded.items():
            values[row, : len(example[key])] = example[key]
    return padded
