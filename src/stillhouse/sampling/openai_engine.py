"""The `openai` engine: any OpenAI-compatible chat-completions endpoint (vLLM server, TGI, llama.cpp, hosted).

Requests run ``max_concurrency`` at a time; a 429, a 5xx, a timeout or a dropped connection is
retried with exponential backoff (a server's Retry-After wins). Top-k capture uses the endpoint's
``top_logprobs``; the tail mass is what the k returned log-probs leave, 1 - Σ exp(top)
(`engine.tail_logprob`). The API key is read from the environment variable named in config at
request time, sent as a Bearer token, and never stored, logged or put in an error message.

    engine = OpenAIEngine(config.sample.openai, "Qwen/Qwen2.5-7B-Instruct", tokenizer=tokenizer)   # sampling: ids
    engine = OpenAIEngine(config.feedback.judge.openai, name, token_ids=False)                     # the judge: strings
    payload, url = engine.post_json("/completions", body, where)            # another endpoint, same retries and key
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import httpx

from stillhouse.config import OpenAIEngineConfig
from stillhouse.errors import StillhouseError
from stillhouse.sampling.engine import Generation, Prompt, SamplingSettings, tail_logprob

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}
_TOKEN_ID = re.compile(r"^token_id:(\d+)$")


class EngineError(StillhouseError):
    """A generation engine failed on a shard; the message names the shard, the prompt and the cause."""


class OpenAIEngine:
    """Generate through ``{base_url}/chat/completions`` with the served ``model``: a request per prompt, n choices each.

    With ``token_ids`` (sampling), each answer's tokens become ids: the server's own (``token_id:N``,
    when ``connection.return_token_ids`` asks for them) or through ``tokenizer``, the served model's.
    Without (the feedback judge, which reads labels such as " A"), the tokens are kept as the server
    spelled them (`Generation.tokens`, ``top_k_tokens``), log-probs are asked only when top-k capture
    is on, and an answer that can't be read comes back empty rather than failing the call: its reader
    counts it as unusable, like an answer that names no label. ``settings_field`` is the config
    section errors tell the user to change (the judge has its own).
    """

    def __init__(
        self,
        connection: OpenAIEngineConfig,
        model: str,
        *,
        tokenizer=None,
        token_ids: bool = True,
        settings_field: str = "sample.openai",
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.connection = connection
        self.model = model
        self.tokenizer = tokenizer
        self.token_ids = token_ids
        self.settings_field = settings_field
        self.sleep = sleep
        self.client = httpx.Client(timeout=connection.timeout_seconds)

    def close(self) -> None:
        self.client.close()

    def generate(
        self,
        prompts: Sequence[Prompt],
        settings: SamplingSettings,
        *,
        seed: int,
        where: str,
        on_progress: Callable[[int], None] | None = None,
    ) -> list[Generation]:
        """``settings.n`` generations per prompt, prompt-major; prompt p is asked under seed ``seed + p``.

        Errors name ``where`` and the prompt's id; on the first failure, requests not yet sent are dropped.
        """

        def one(position: int) -> list[Generation]:
            prompt = prompts[position]
            location = f"{where}, prompt {prompt.prompt_id!r}"
            generations = self._complete(prompt.messages, settings, seed + position, location)
            if on_progress is not None:
                on_progress(1)
            return generations

        pool = ThreadPoolExecutor(max_workers=self.connection.max_concurrency)
        try:
            futures = [pool.submit(one, position) for position in range(len(prompts))]
            per_prompt = [future.result() for future in futures]
        finally:  # on the first failure, requests not yet sent are dropped
            pool.shutdown(wait=True, cancel_futures=True)
        return [generation for generations in per_prompt for generation in generations]

    def _body(self, messages: list[dict], settings: SamplingSettings, seed: int) -> dict:
        body = {
            "model": self.model,
            "messages": messages,
            "max_tokens": settings.max_new_tokens,
            "n": settings.n,
            "temperature": settings.temperature,
            "seed": seed,
        }
        if self.token_ids or settings.top_k_logprobs:  # token ids are read from the answer's log-probs: always ask
            body["logprobs"] = True
        if settings.temperature > 0:
            body["top_p"] = settings.top_p
            if settings.top_k:
                body["top_k"] = settings.top_k
        if settings.top_k_logprobs:
            body["top_logprobs"] = settings.top_k_logprobs
        if settings.stop:
            body["stop"] = list(settings.stop)
        if self.token_ids and self.connection.return_token_ids:
            body["return_tokens_as_token_ids"] = True
        return body

    def _headers(self) -> dict:
        name = self.connection.api_key_env
        key = os.environ.get(name) if name else None
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _complete(self, messages: list[dict], settings: SamplingSettings, seed: int, where: str) -> list[Generation]:
        response = self._post(self._body(messages, settings, seed), where)
        try:
            payload = response.json()
            return self._parse(payload, settings) if self.token_ids else self._parse_strings(payload, settings)
        except (ValueError, KeyError, TypeError, IndexError) as error:
            raise EngineError(
                f"{where}: malformed response from {response.url} ({type(error).__name__}: {error}); "
                f"got {response.text[:200]!r}"
            ) from None

    def post_json(self, endpoint: str, body: dict, where: str) -> tuple[dict, str]:
        """POST ``body`` to ``{base_url}{endpoint}`` with the retries and key of every request; (its JSON answer, URL).

        For callers with their own request shape, such as the served KD teacher's ``/completions`` with
        ``prompt_logprobs`` (`stillhouse.training.served_teacher`). An answer that isn't JSON is an `EngineError`.
        """
        response = self._post(body, where, endpoint)
        try:
            payload = response.json()
        except ValueError:
            raise EngineError(f"{where}: {response.url} answered with no JSON: {response.text[:200]!r}") from None
        return payload, str(response.url)

    def _post(self, body: dict, where: str, endpoint: str = "/chat/completions") -> httpx.Response:
        """POST to ``endpoint``, retrying 429s, 5xx, timeouts and dropped connections; the first 200 answer."""
        url = self.connection.base_url.rstrip("/") + endpoint
        for attempt in range(self.connection.max_retries + 1):
            last = attempt == self.connection.max_retries
            try:
                response = self.client.post(url, json=body, headers=self._headers())
            except (httpx.TimeoutException, httpx.TransportError) as error:
                if last:
                    raise EngineError(
                        f"{where}: {type(error).__name__} from {url} after {attempt + 1} tries; raise "
                        f"{self.settings_field}.timeout_seconds or max_retries, or check the server"
                    ) from None
                self.sleep(self._delay(attempt, None))
                continue
            if response.status_code in RETRY_STATUS and not last:
                self.sleep(self._delay(attempt, response.headers.get("retry-after")))
                continue
            if response.status_code != 200:
                hint = f"; set ${self.connection.api_key_env}" if response.status_code in (401, 403) else ""
                raise EngineError(
                    f"{where}: HTTP {response.status_code} from {url} after {attempt + 1} tries: "
                    f"{response.text[:300]}{hint}"
                )
            return response
        raise AssertionError("unreachable")

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        if retry_after is not None:
            try:
                return min(float(retry_after), 600.0)
            except ValueError:
                pass
        return self.connection.backoff_seconds * 2**attempt

    def _token_id(self, token: str) -> int:
        match = _TOKEN_ID.match(token)
        if match:
            return int(match.group(1))
        if self.tokenizer is None:
            raise ValueError(
                f"token {token!r} carries no id; set sample.openai.tokenizer to the served model's tokenizer"
            )
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or (token_id == self.tokenizer.unk_token_id and token != self.tokenizer.unk_token):
            raise ValueError(f"token {token!r} is not in the tokenizer's vocabulary")
        return int(token_id)

    def _parse(self, payload: dict, settings: SamplingSettings) -> list[Generation]:
        k = settings.top_k_logprobs
        choices = sorted(payload["choices"], key=lambda choice: choice.get("index", 0))
        if len(choices) != settings.n:
            raise ValueError(f"expected {settings.n} choices, got {len(choices)}")
        generations = []
        for sample_index, choice in enumerate(choices):
            text = choice["message"]["content"]
            if not isinstance(text, str):
                raise TypeError("choices[].message.content is not a string")
            positions = (choice.get("logprobs") or {}).get("content")
            if positions is None:
                if k or self.tokenizer is None:
                    raise ValueError(
                        "no logprobs in the response; the server must support `logprobs` (or set top_k_logprobs: "
                        "0 and a tokenizer)"
                    )
                generations.append(
                    Generation(
                        self.tokenizer(text, add_special_tokens=False)["input_ids"], text, sample_index=sample_index
                    )
                )
                continue
            generation = Generation([self._token_id(p["token"]) for p in positions], text, sample_index=sample_index)
            if k:
                generation.top_k_ids, generation.top_k_logprobs, generation.tail_logprobs = [], [], []
                for position in positions:
                    top = sorted(position["top_logprobs"], key=lambda entry: -float(entry["logprob"]))[:k]
                    if len(top) < k:
                        raise ValueError(
                            f"the server returned {len(top)} top_logprobs for k={k}; "
                            "lower sample.top_k_logprobs to what it allows"
                        )
                    generation.top_k_ids.append([self._token_id(entry["token"]) for entry in top])
                    generation.top_k_logprobs.append([float(entry["logprob"]) for entry in top])
                    generation.tail_logprobs.append(tail_logprob(float(entry["logprob"]) for entry in top))
            generations.append(generation)
        return generations

    def _parse_strings(self, payload: dict, settings: SamplingSettings) -> list[Generation]:
        """``settings.n`` answers, tokens as the server spelled them; an answer that can't be read comes back empty."""
        try:
            choices = sorted(payload["choices"], key=lambda choice: choice.get("index", 0))
        except (KeyError, TypeError, AttributeError):
            choices = []
        generations = []
        for sample_index in range(settings.n):
            try:
                generation = self._read_strings(choices[sample_index])
            # No message, a malformed position, too few choices: the reader counts it as unusable.
            except (KeyError, IndexError, TypeError, ValueError, AttributeError):
                generation = Generation([], "")
            generation.sample_index = sample_index
            generations.append(generation)
        return generations

    @staticmethod
    def _read_strings(choice: dict) -> Generation:
        """One choice's text and, when the server sent log-probs, each position's token and the candidates it listed."""
        text = choice["message"].get("content") or ""
        if not isinstance(text, str):
            raise TypeError("choices[].message.content is not a string")
        positions = (choice.get("logprobs") or {}).get("content") or []
        if not positions:
            return Generation([], text)
        tokens, top_k_tokens, top_k_logprobs = [], [], []
        for position in positions:
            if not isinstance(position["token"], str):
                raise TypeError("choices[].logprobs.content[].token is not a string")
            tokens.append(position["token"])
            top = position.get("top_logprobs") or []
            top_k_tokens.append([str(entry["token"]) for entry in top])
            top_k_logprobs.append([float(entry["logprob"]) for entry in top])
        tails = [tail_logprob(values) for values in top_k_logprobs]
        return Generation(
            [], text, top_k_logprobs=top_k_logprobs, tail_logprobs=tails, tokens=tokens, top_k_tokens=top_k_tokens
        )
