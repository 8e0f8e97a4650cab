"""A language model as judge: pairwise verdicts and pointwise scores read from its log-probs.

Every verdict is the probability the judge gives each answer label after the rubric prompt,
computed by teacher-forcing each label (so multi-token labels such as "10" under a character
tokenizer are scored exactly), renormalized over the labels:

- pairwise: P("A") vs P("B"); both orders are judged and averaged to cancel position bias, and a
  pair whose two orders disagree is marked inconsistent;
- pointwise: the expected score over the labels "1".."10";
- verifier: for tasks with one right answer, 1.0 for an exact match of the reference, else 0.0.

A judge served behind an OpenAI-compatible endpoint (`EndpointJudge`) answers each rubric prompt
once, greedily, in a few tokens, through the `openai` sampling engine keeping the server's token
strings; its verdict is read from the top log-probs of the answer's first position over the same
labels (renormalized), or, when the server returns no log-probs or none of the labels is among them,
from the text (`parse_verdict`, `parse_score`). An answer that names no label either way is
unusable: it is counted, and the candidate it concerned is dropped.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from stillhouse.sampling.engine import Engine, Generation, Prompt, SamplingSettings

PAIRWISE_RUBRIC = (
    "Which response answers the question better? Reply with A or B only.\n"
    "Question: {prompt}\nResponse A: {first}\nResponse B: {second}"
)
POINTWISE_RUBRIC = (
    "Rate the response to the question from 1 (useless) to 10 (perfect). Reply with the number only.\n"
    "Question: {prompt}\nResponse: {response}"
)
SCORE_LABELS = tuple(str(score) for score in range(1, 11))


@torch.inference_mode()
def label_logprobs(
    model, tokenizer, prompts: Sequence[str], labels: Sequence[str], batch_size: int = 32
) -> torch.Tensor:
    """``[len(prompts), len(labels)]``: log P(label | rendered prompt), summed over the label's tokens."""
    sequences, spans = [], []
    for prompt in prompts:
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        for label in labels:
            label_ids = tokenizer(label, add_special_tokens=False)["input_ids"]
            sequences.append(prompt_ids + label_ids)
            spans.append((len(prompt_ids), len(label_ids)))
    scores = torch.empty(len(sequences))
    for start in range(0, len(sequences), batch_size):
        batch = sequences[start : start + batch_size]
        width = max(map(len, batch))
        input_ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, sequence in enumerate(batch):  # right padding: positions stay 0..n-1
            input_ids[row, : len(sequence)] = torch.tensor(sequence)
            attention_mask[row, : len(sequence)] = 1
        logprobs = (
            model(input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device))
            .logits.float()
            .log_softmax(-1)
        )
        for row, (prompt_length, label_length) in enumerate(spans[start : start + batch_size]):
            positions = torch.arange(prompt_length - 1, prompt_length + label_length - 1)
            targets = input_ids[row, prompt_length : prompt_length + label_length].to(logprobs.device)
            scores[start + row] = logprobs[row, positions, targets].sum().cpu()
    return scores.view(len(prompts), len(labels))


def render_judge_prompts(tokenizer, contents: Sequence[str]) -> list[str]:
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        for content in contents
    ]


@dataclass(frozen=True)
class PairJudgement:
    """The judge on (prompt, first, second), in both orders.

    ``first_better`` is P(first is better), averaged over the two orders; ``consistent`` says whether
    both orders preferred the same response.
    """

    first_better: float
    consistent: bool

    def verdict(self, tie_margin: float) -> str | None:
        """ "first", "second", or None for a tie or an inconsistent pair."""
        if not self.consistent or abs(self.first_better - 0.5) < tie_margin:
            return None
        return "first" if self.first_better > 0.5 else "second"


def judge_pairs(
    model,
    tokenizer,
    prompts: Sequence[str],
    firsts: Sequence[str],
    seconds: Sequence[str],
    rubric: str = PAIRWISE_RUBRIC,
    batch_size: int = 32,
) -> list[PairJudgement]:
    forward = [rubric.format(prompt=p, first=a, second=b) for p, a, b in zip(prompts, firsts, seconds)]
    swapped = [rubric.format(prompt=p, first=b, second=a) for p, a, b in zip(prompts, firsts, seconds)]
    logprobs = label_logprobs(
        model, tokenizer, render_judge_prompts(tokenizer, forward + swapped), ("A", "B"), batch_size
    )
    prob_a = logprobs.softmax(-1)[:, 0]
    in_order, reversed_order = prob_a[: len(prompts)], 1 - prob_a[len(prompts) :]  # both: P(first is better)
    return [
        PairJudgement(first_better=float((p + q) / 2), consistent=bool((p > 0.5) == (q > 0.5)))
        for p, q in zip(in_order, reversed_order)
    ]


def pointwise_scores(
    model,
    tokenizer,
    prompts: Sequence[str],
    responses: Sequence[str],
    rubric: str = POINTWISE_RUBRIC,
    batch_size: int = 32,
) -> list[float]:
    """The expected 1-10 score of each response under the judge."""
    contents = [rubric.format(prompt=p, response=r) for p, r in zip(prompts, responses)]
    probabilities = label_logprobs(
        model, tokenizer, render_judge_prompts(tokenizer, contents), SCORE_LABELS, batch_size
    ).softmax(-1)
    values = torch.tensor([float(label) for label in SCORE_LABELS])
    return (probabilities * values).sum(-1).tolist()


def verifier_scores(responses: Sequence[str], references: Sequence[str]) -> list[float]:
    return [float(response.strip() == reference.strip()) for response, reference in zip(responses, references)]


_VERDICT = re.compile(r"\b([AB])\b")


def parse_verdict(text: str) -> str | None:
    """ "A" or "B" from a judge's text answer, or None when it names neither or both."""
    found = set(_VERDICT.findall(text.strip()[:20]))
    return found.pop() if len(found) == 1 else None


_SCORE = re.compile(r"(?<!\d)(10|[1-9])(?!\d)")


def parse_score(text: str) -> int | None:
    """A 1-10 score from a judge's text answer, or None when it names no score or several."""
    found = set(_SCORE.findall(text.strip()[:20]))
    return int(found.pop()) if len(found) == 1 else None


def _answer_label(token: str) -> str:
    # Servers return decoded tokens (" A"); some return the tokenizer's raw pieces ("ĠA", "▁A").
    return token.replace("Ġ", " ").replace("▁", " ").strip()


def _label_probabilities(answer: Generation, position: int, labels: Sequence[str]) -> dict[str, float]:
    """Probability of each label among one position's top log-probs (tokens that spell the same label add up)."""
    found: dict[str, float] = {}
    for token, logprob in zip(answer.top_k_tokens[position], answer.top_k_logprobs[position]):
        label = _answer_label(token)
        if label in labels:
            found[label] = found.get(label, 0.0) + math.exp(logprob)
    return found


def _answer_start(answer: Generation) -> int | None:
    """The answer's first position whose token is not whitespace; None when the server sent no log-probs."""
    if answer.tokens is None or answer.top_k_tokens is None:
        return None
    for position, token in enumerate(answer.tokens):
        if _answer_label(token):
            return position
    return None


def pairwise_answer(answer: Generation) -> float | None:
    """P("A") renormalized over "A"/"B" from an endpoint's answer: log-probs when it gave them, else its text;
    None when unusable."""
    start = _answer_start(answer)
    if start is not None:
        found = _label_probabilities(answer, start, ("A", "B"))
        if found:
            return found.get("A", 0.0) / sum(found.values())
    verdict = parse_verdict(answer.text)
    return None if verdict is None else float(verdict == "A")


def pointwise_answer(answer: Generation) -> float | None:
    """The expected 1-10 score over the labels' renormalized probabilities at the answer's first position,
    else the text's score.

    A tokenizer that spells "10" as "1", "0" puts both in P("1"); when the answer did start with "1",
    the next position's P("0") splits it into "10" and "1". Otherwise "10" counts as improbable.
    """
    start = _answer_start(answer)
    if start is not None:
        found = _label_probabilities(answer, start, SCORE_LABELS)
        starts_with_one = _answer_label(answer.tokens[start]) == "1" and start + 1 < len(answer.tokens)
        if "10" not in found and "1" in found and starts_with_one:
            then_zero = _label_probabilities(answer, start + 1, ("0",)).get("0", 0.0)
            found["10"], found["1"] = found["1"] * then_zero, found["1"] * (1 - then_zero)
        total = sum(found.values())
        if total > 0:
            return sum(int(label) * probability for label, probability in found.items()) / total
    score = parse_score(answer.text)
    return None if score is None else float(score)


class EndpointJudge:
    """A judge served behind an OpenAI-compatible endpoint, through the `openai` engine's requests and retries.

    ``engine`` is an `OpenAIEngine` that keeps token strings (``token_ids=False``): the verdict is read
    from how the labels are spelled. Each rubric prompt is one greedy request of at most ``max_tokens``
    tokens, asking for ``top_logprobs`` log-probs per position (none when 0: the verdict is then parsed
    from the text). Unusable answers come back as None.
    """

    def __init__(self, engine: Engine, *, max_tokens: int, top_logprobs: int):
        self.engine = engine
        self.settings = SamplingSettings(max_new_tokens=max_tokens, temperature=0.0, n=1, top_k_logprobs=top_logprobs)

    def _ask(self, contents: Sequence[str], prompt_ids: Sequence[str], where: str, read) -> list[float | None]:
        prompts = [
            Prompt(prompt_id, [{"role": "user", "content": content}])
            for content, prompt_id in zip(contents, prompt_ids)
        ]
        return [read(answer) for answer in self.engine.generate(prompts, self.settings, seed=0, where=where)]

    def judge_pairs(
        self,
        prompts: Sequence[str],
        firsts: Sequence[str],
        seconds: Sequence[str],
        prompt_ids: Sequence[str],
        where: str,
        rubric: str = PAIRWISE_RUBRIC,
    ) -> list[PairJudgement | None]:
        """Like `judge_pairs`, both orders; None where either order's answer was unusable.

        ``prompt_ids[i]`` names prompt i in error messages, after ``where`` (the judge's shard).
        """
        forward = [rubric.format(prompt=p, first=a, second=b) for p, a, b in zip(prompts, firsts, seconds)]
        swapped = [rubric.format(prompt=p, first=b, second=a) for p, a, b in zip(prompts, firsts, seconds)]
        prob_a = self._ask(forward + swapped, list(prompt_ids) * 2, where, pairwise_answer)
        judgements = []
        for in_order, reversed_a in zip(prob_a[: len(prompts)], prob_a[len(prompts) :]):
            if in_order is None or reversed_a is None:
                judgements.append(None)
                continue
            reversed_order = 1 - reversed_a  # both: P(first is better)
            judgements.append(
                PairJudgement(
                    first_better=(in_order + reversed_order) / 2, consistent=(in_order > 0.5) == (reversed_order > 0.5)
                )
            )
        return judgements

    def pointwise_scores(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        prompt_ids: Sequence[str],
        where: str,
        rubric: str = POINTWISE_RUBRIC,
    ) -> list[float | None]:
        """Like `pointwise_scores`; None where the answer was unusable."""
        contents = [rubric.format(prompt=p, response=r) for p, r in zip(prompts, responses)]
        return self._ask(contents, prompt_ids, where, pointwise_answer)


@dataclass(frozen=True)
class WinRate:
    """The share of pairs the first response wins (ties and inconsistent pairs count half),
    with a 95% Wilson interval."""

    rate: float
    low: float
    high: float
    pairs: int


def win_rate(judgements: Sequence[PairJudgement], tie_margin: float = 0.05) -> WinRate:
    outcomes = {"first": 1.0, "second": 0.0, None: 0.5}
    scores = [outcomes[judgement.verdict(tie_margin)] for judgement in judgements]
    n = len(scores)
    if n == 0:
        return WinRate(float("nan"), float("nan"), float("nan"), 0)
    rate, z = sum(scores) / n, 1.959964
    # Wilson score interval: sensible at small n and at rates near 0 or 1, unlike the normal approximation.
    centre = (rate + z * z / (2 * n)) / (1 + z * z / n)
    half_width = z * ((rate * (1 - rate) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return WinRate(rate, max(0.0, centre - half_width), min(1.0, centre + half_width), n)
