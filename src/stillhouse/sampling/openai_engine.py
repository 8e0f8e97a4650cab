"""The `openai` engine: any OpenAI-compatible chat-completions endpoint (vLLM server, TGI, llama.cpp, hosted).

Requests run ``max_concurrency`` at a time; a 429, a 5xx, a timeout or a dropped connection is
retried with exponential backoff (a server's Retry-After wins). Top-k capture uses the endpoint's
``top_logprobs``; the tail mass is what the k returned log-probs leave, 1 - Σ exp(top). The API key
is read from the environment variable named in config at request time, sent as a Bearer token, and
never stored, logged or put in an error message.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import httpx

from stillhouse.config import SampleConfig
from stillhouse.errors import StillhouseError
from stillhouse.sampling.hf_engine import Generation

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}
_TOKEN_ID = re.compile(r"^token_id:(\d+)$")


class EngineError(StillhouseError):
    """A generation engine failed on a shard; the message names the shard, the prompt and the cause."""


class OpenAIEngine:
    """Generate through ``{base_url}/chat/completions``, one request per prompt (``n`` choices each)."""

    def __init__(self, config: SampleConfig, tokenizer=None, sleep: Callable[[float], None] = time.sleep,
                 settings_field: str = "sample.openai"):
        self.config = config
        self.settings = config.openai
        self.settings_field = settings_field  # where errors tell the user to change timeouts (the judge has its own section)
        self.tokenizer = tokenizer
        self.sleep = sleep
        self.client = httpx.Client(timeout=self.settings.timeout_seconds)

    def close(self) -> None:
        self.client.close()

    def generate(self, conversations: Sequence[list[dict]], *, seed: int, shard: str, prompt_ids: Sequence[str],
                 on_prompt: Callable[[int], None] | None = None) -> list[Generation]:
        """``n`` generations per conversation, prompt-major, like `hf_engine.generate`."""

        def one(position: int) -> list[Generation]:
            generations = self._complete(conversations[position], seed + position, f"{shard}, prompt {prompt_ids[position]!r}")
            if on_prompt is not None:
                on_prompt(1)
            return generations

        pool = ThreadPoolExecutor(max_workers=self.settings.max_concurrency)
        try:
            futures = [pool.submit(one, position) for position in range(len(conversations))]
            per_prompt = [future.result() for future in futures]
        finally:  # on the first failure, requests not yet sent are dropped
            pool.shutdown(wait=True, cancel_futures=True)
        return [generation for generations in per_prompt for generation in generations]

    def _body(self, messages: list[dict], seed: int) -> dict:
        config = self.config
        body = {"model": config.teacher, "messages": messages, "max_tokens": config.max_new_tokens, "n": config.n,
                "temperature": config.temperature, "seed": seed, "logprobs": True}
        if config.temperature > 0:
            body["top_p"] = config.top_p
            if config.top_k:
                body["top_k"] = config.top_k
        if config.top_k_logprobs:
            body["top_logprobs"] = config.top_k_logprobs
        if config.stop:
            body["stop"] = list(config.stop)
        if self.settings.return_token_ids:
            body["return_tokens_as_token_ids"] = True
        return body

    def _headers(self) -> dict:
        name = self.settings.api_key_env
        key = os.environ.get(name) if name else None
        return {"Authorization": f"Bearer {key}"} if key else {}

    def chat(self, body: dict, where: str) -> dict:
        """Send one chat-completions ``body`` as it is, retried like every request here; the server's JSON answer.

        For callers that read the answer themselves (the feedback judge reads text and top_logprobs).
        """
        response = self._post(body, where)
        try:
            return response.json()
        except ValueError as error:
            raise EngineError(f"{where}: malformed response from {response.url} ({error}); got {response.text[:200]!r}") from None

    def _complete(self, messages: list[dict], seed: int, where: str) -> list[Generation]:
        response = self._post(self._body(messages, seed), where)
        try:
            return self._parse(response.json())
        except (ValueError, KeyError, TypeError, IndexError) as error:
            raise EngineError(f"{where}: malformed response from {response.url} ({type(error).__name__}: {error}); "
                              f"got {response.text[:200]!r}") from None

    def _post(self, body: dict, where: str) -> httpx.Response:
        """POST to /chat/completions, retrying 429s, 5xx, timeouts and dropped connections; the first 200 answer."""
        url = self.settings.base_url.rstrip("/") + "/chat/completions"
        for attempt in range(self.settings.max_retries + 1):
            last = attempt == self.settings.max_retries
            try:
                response = self.client.post(url, json=body, headers=self._headers())
            except (httpx.TimeoutException, httpx.TransportError) as error:
                if last:
                    raise EngineError(f"{where}: {type(error).__name__} from {url} after {attempt + 1} tries; raise "
                                      f"{self.settings_field}.timeout_seconds or max_retries, or check the server") from None
                self.sleep(self._delay(attempt, None))
                continue
            if response.status_code in RETRY_STATUS and not last:
                self.sleep(self._delay(attempt, response.headers.get("retry-after")))
                continue
            if response.status_code != 200:
                hint = f"; set ${self.settings.api_key_env}" if response.status_code in (401, 403) else ""
                raise EngineError(f"{where}: HTTP {response.status_code} from {url} after {attempt + 1} tries: {response.text[:300]}{hint}")
            return response
        raise AssertionError("unreachable")

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        if retry_after is not None:
            try:
                return min(float(retry_after), 600.0)
            except ValueError:
                pass
        return self.settings.backoff_seconds * 2**attempt

    def _token_id(self, token: str) -> int:
        match = _TOKEN_ID.match(token)
        if match:
            return int(match.group(1))
        if self.tokenizer is None:
            raise ValueError(f"token {token!r} carries no id; set sample.openai.tokenizer to the served model's tokenizer")
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or (token_id == self.tokenizer.unk_token_id and token != self.tokenizer.unk_token):
            raise ValueError(f"token {token!r} is not in the tokenizer's vocabulary")
        return int(token_id)

    def _parse(self, payload: dict) -> list[Generation]:
        k = self.config.top_k_logprobs
        choices = sorted(payload["choices"], key=lambda choice: choice.get("index", 0))
        if len(choices) != self.config.n:
            raise ValueError(f"expected {self.config.n} choices, got {len(choices)}")
        generations = []
        for sample_index, choice in enumerate(choices):
            text = choice["message"]["content"]
            if not isinstance(text, str):
                raise TypeError("choices[].message.content is not a string")
            positions = (choice.get("logprobs") or {}).get("content")
            if positions is None:
                if k or self.tokenizer is None:
                    raise ValueError("no logprobs in the response; the server must support `logprobs` (or set top_k_logprobs: 0 and a tokenizer)")
                generations.append(Generation(self.tokenizer(text, add_special_tokens=False)["input_ids"], text, sample_index=sample_index))
                continue
            generation = Generation([self._token_id(p["token"]) for p in positions], text, sample_index=sample_index)
            if k:
                generation.top_k_ids, generation.top_k_logprobs, generation.tail_logprobs = [], [], []
                for position in positions:
                    top = sorted(position["top_logprobs"], key=lambda entry: -float(entry["logprob"]))[:k]
                    if len(top) < k:
                        raise ValueError(f"the server returned {len(top)} top_logprobs for k={k}; lower sample.top_k_logprobs to what it allows")
                    generation.top_k_ids.append([self._token_id(entry["token"]) for entry in top])
                    generation.top_k_logprobs.append([float(entry["logprob"]) for entry in top])
                    rest = 1.0 - sum(math.exp(float(entry["logprob"])) for entry in top)
                    generation.tail_logprobs.append(math.log(rest) if rest > 0 else float("-inf"))
            generations.append(generation)
        return generations
