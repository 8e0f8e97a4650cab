"""A teacher behind an OpenAI-compatible server (vLLM) that scores given token sequences: ``train.kd.teacher: served``.

    connection, model = served_endpoint(config.train.kd, config.sample)   # kd.served / served_model, or the sampler's
    teacher = ServedTeacher(connection, model, top_k=config.train.kd.online_top_k)
    top = teacher.top_k(input_ids, attention_mask)                         # TopK: ids, logprobs [B, T-1, k]

Online KD and on-policy GKD need the teacher's distribution at every position of sequences the
trainer holds (the student's own samples, for GKD). A teacher too big for the training machines can
give it from vLLM's server elsewhere: its completions endpoint takes the prompt as token ids and,
with ``prompt_logprobs: k`` (a vLLM extension of the OpenAI API), answers for every prompt position
after the first the k most likely tokens and their log-probs under the full distribution, plus the
prompt's actual token (``{token_id: {logprob, rank, decoded_token}}``; None for the first position).
``max_tokens`` is 1, the least vLLM generates.

Alignment: answer position j >= 1 is the distribution of the row's j-th token given the ones before,
so it lands at output position (that token's position) - 1, and output position t holds the teacher's
top-k for token t+1: what the in-memory teacher's ``logits[:, :-1]`` holds
(`DistillationTrainer.teacher_distribution`). Only a row's attended tokens are sent; positions with
nothing to predict (padding, a row's last token) get ids 0 and log-probs 0, which the labels mask.

Rows go ``max_concurrency`` at a time; retries, backoff and the API key are the `openai` engine's
(`OpenAIEngine.post_json`). vLLM caps k at its ``--max-logprobs`` (20 unless the server says otherwise).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from stillhouse.config import KDConfig, OpenAIEngineConfig, SampleConfig
from stillhouse.sampling.openai_engine import EngineError, OpenAIEngine
from stillhouse.training.losses import TopK


def served_endpoint(kd: KDConfig, sample: SampleConfig) -> tuple[OpenAIEngineConfig, str]:
    """(connection, model name) of ``train.kd.teacher: served``: kd.served and kd.served_model, or the sampler's."""
    return kd.served or sample.openai, kd.served_model or sample.teacher


class ServedTeacher:
    """The teacher's top-k per position of given sequences, from ``{connection.base_url}/completions``.

    ``connection`` is the server (endpoint, key variable, concurrency, retries), ``model`` the name it
    serves the teacher under, ``top_k`` the k asked per position (``train.kd.online_top_k``).
    """

    def __init__(
        self,
        connection: OpenAIEngineConfig,
        model: str,
        top_k: int,
        *,
        settings_field: str = "train.kd.served",
        sleep: Callable[[float], None] = time.sleep,
    ):
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        self.connection, self.model, self.k = connection, model, top_k
        self.url = connection.base_url.rstrip("/") + "/completions"
        self.client = OpenAIEngine(connection, model, settings_field=settings_field, sleep=sleep)

    def close(self) -> None:
        self.client.close()

    def top_k(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TopK:
        """The teacher's top-k for each next token: `TopK` with ids (long) and log-probs (fp32) ``[B, T-1, k]``.

        Args:
            input_ids: ``[B, T]`` token ids, padded on either side.
            attention_mask: ``[B, T]``, 1 at the tokens to send; the rest are padding.

        Position t holds the distribution of token t+1 (see the module docstring); positions whose next
        token is padding, or that have no token before them in the row, hold ids 0 and log-probs 0.
        Results are on ``input_ids``' device.
        """
        if input_ids.dim() != 2 or input_ids.shape != attention_mask.shape:
            raise ValueError(
                f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} "
                "must both be [B, T]"
            )
        batch, length = input_ids.shape
        ids = torch.zeros(batch, max(length - 1, 0), self.k, dtype=torch.long)
        logprobs = torch.zeros(batch, max(length - 1, 0), self.k, dtype=torch.float32)
        kept = attention_mask.detach().cpu().bool()
        tokens = input_ids.detach().cpu()
        rows = [tokens[b][kept[b]].tolist() for b in range(batch)]
        positions = [kept[b].nonzero().squeeze(-1).tolist() for b in range(batch)]

        def one(b: int) -> list[tuple[list[int], list[float]]]:
            return self.score(rows[b], where=f"served teacher, row {b} of {batch}") if len(rows[b]) > 1 else []

        pool = ThreadPoolExecutor(max_workers=self.connection.max_concurrency)
        try:
            scored = [future.result() for future in [pool.submit(one, b) for b in range(batch)]]
        finally:  # on the first failure, rows not yet sent are dropped
            pool.shutdown(wait=True, cancel_futures=True)
        at_row, at_position, top_ids, top_logprobs = [], [], [], []
        for b, answers in enumerate(scored):
            for j, (position_ids, position_logprobs) in enumerate(answers, start=1):
                at_row.append(b)
                at_position.append(positions[b][j] - 1)  # predicts the token at positions[b][j]
                top_ids.append(position_ids)
                top_logprobs.append(position_logprobs)
        if at_row:
            ids[at_row, at_position] = torch.tensor(top_ids, dtype=torch.long)
            logprobs[at_row, at_position] = torch.tensor(top_logprobs, dtype=torch.float32)
        return TopK(ids.to(input_ids.device), logprobs.to(input_ids.device))

    def score(self, token_ids: Sequence[int], *, where: str) -> list[tuple[list[int], list[float]]]:
        """For tokens 1..n-1 of one sequence: (the teacher's k most likely ids, their log-probs), best first."""
        body = {
            "model": self.model,
            "prompt": [int(token) for token in token_ids],
            "max_tokens": 1,
            "temperature": 0.0,
            "prompt_logprobs": self.k,
        }
        payload, url = self.client.post_json("/completions", body, where)
        try:
            answer = payload["choices"][0].get("prompt_logprobs")
        except (KeyError, IndexError, TypeError, AttributeError):
            raise EngineError(f"{where}: malformed answer from {url}: {str(payload)[:200]}") from None
        if answer is None:
            raise EngineError(
                f"{where}: {url} answered without `prompt_logprobs`; the served teacher needs vLLM's OpenAI-compatible "
                "server (other servers ignore the field)"
            )
        if not isinstance(answer, list) or len(answer) != len(token_ids):
            raise EngineError(
                f"{where}: {url} answered `prompt_logprobs` for {len(answer) if isinstance(answer, list) else '?'} "
                f"positions of a {len(token_ids)}-token prompt"
            )
        scored = []
        for j in range(1, len(token_ids)):
            entries = answer[j]
            try:
                # The k best by rank; the prompt's own token rides along when it ranked lower.
                ranked = sorted(
                    ((int(token), entry) for token, entry in entries.items()),
                    key=lambda item: (
                        item[1].get("rank") if item[1].get("rank") is not None else math.inf,
                        -float(item[1]["logprob"]),
                    ),
                )[: self.k]
                top = ([token for token, _ in ranked], [float(entry["logprob"]) for _, entry in ranked])
            except (AttributeError, KeyError, TypeError, ValueError):
                raise EngineError(
                    f"{where}: {url} answered a malformed `prompt_logprobs` entry at position {j}: {str(entries)[:200]}"
                ) from None
            if len(ranked) < self.k:
                raise EngineError(
                    f"{where}: {url} returned {len(ranked)} prompt_logprobs at position {j} for k={self.k}; lower "
                    "train.kd.online_top_k to what the server allows (vLLM: its --max-logprobs)"
                )
            scored.append(top)
        return scored

    def probe(self, token_ids: Sequence[int] = (0, 1)) -> str | None:
        """Ask once for the top-k of a two-token sequence: None when the answer has them, else what went wrong."""
        try:
            self.score(token_ids, where="probe")
        except EngineError as error:
            return f"failed the probe request ({str(error).removeprefix('probe: ')})"
        return None
