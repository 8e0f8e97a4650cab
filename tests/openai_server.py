"""A small OpenAI-compatible chat-completions server on 127.0.0.1, serving a tiny local model.

    with FakeOpenAIServer(model_folder) as server:      # server.url is the base URL (…/v1)
        server.faults += ["429", "sleep:1.0", "malformed"]   # consumed one per request, in order

    with FakeOpenAIServer(None, failure_share=0.1, failure_seed=0) as server:   # load tests
        ...                                              # echo backend; ~10% of tries get 429 or 503

It answers `POST /v1/chat/completions` with the model's greedy (or sampled) response, `logprobs` and
`top_logprobs` like vLLM's server (tokens as `token_id:N` when `return_tokens_as_token_ids` is set),
records every request's body and Authorization header, and can be told to fail the next requests.

`POST /v1/completions` takes the prompt as token ids (or text) and answers like vLLM's server with
`prompt_logprobs: k`: per prompt position a dict token id -> {logprob, rank, decoded_token} holding
the k most likely tokens and the prompt's actual token (None for the first position), computed by a
real forward pass of the model in this process, plus ``max_tokens`` greedy tokens. Like vLLM it
refuses k above ``max_logprobs`` (vLLM's --max-logprobs, 20 by default) with HTTP 400;
``prompt_logprobs=False`` plays a server that ignores the field (as non-vLLM servers do).
Without a model folder it echoes the last message back (one token per UTF-8 byte, id = the byte),
which costs nothing, so thousands of requests test the client's retry logic rather than a model.
``failure_share`` answers that share of tries with 429 or 503, chosen by a hash of (seed, the
conversation, which try of it this is): the same tries fail whatever order concurrent requests
arrive in. ``answered`` counts the 200 answers per conversation.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class FakeOpenAIServer:
    def __init__(
        self,
        model_folder: Path | None,
        served_name: str = "tiny-teacher",
        *,
        failure_share: float = 0.0,
        failure_seed: int = 0,
        record_requests: bool = True,
        max_logprobs: int = 20,
        prompt_logprobs: bool = True,
    ):
        self.model = self.tokenizer = None
        if model_folder is not None:
            from stillhouse.models import load_causal_lm, load_tokenizer

            self.model = load_causal_lm(str(model_folder), device="cpu")
            self.tokenizer = load_tokenizer(str(model_folder))
        self.served_name = served_name
        self.max_logprobs, self.prompt_logprobs = max_logprobs, prompt_logprobs
        self.faults: list[str] = []
        self.requests: list[dict] = []
        self.record_requests = record_requests
        self.failure_share, self.failure_seed = failure_share, failure_seed
        self.tries: Counter[str] = Counter()  # requests per conversation
        self.answered: Counter[str] = Counter()  # 200 answers per conversation
        self.failures: Counter[int] = Counter()  # injected failures by status
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = False  # server_close() waits for requests in flight
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def __enter__(self) -> FakeOpenAIServer:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        # Idle keep-alive connections would hold their handler threads (and server_close) forever:
        # end their reading side; a response being written still goes out.
        with self._lock:
            for connection in self._connections:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RD)
        self._server.server_close()

    def _next_fault(self) -> str | None:
        with self._lock:
            return self.faults.pop(0) if self.faults else None

    @staticmethod
    def conversation_key(body: dict) -> str:
        return json.dumps(body.get("messages", body.get("prompt")), sort_keys=True)

    def _injected_failure(self, key: str) -> int | None:
        """429 or 503 for ``failure_share`` of tries, decided by (seed, conversation, try number) alone."""
        if not self.failure_share:
            return None
        with self._lock:
            attempt = self.tries[key]
            self.tries[key] += 1
        digest = hashlib.sha256(f"{self.failure_seed}|{attempt}|{key}".encode()).digest()
        if int.from_bytes(digest[:8], "big") / 2**64 >= self.failure_share:
            return None
        status = 429 if digest[8] % 2 else 503
        with self._lock:
            self.failures[status] += 1
        return status

    def echo(self, body: dict) -> dict:
        """The last message's content back, as many choices as asked, one token per UTF-8 byte."""
        text = body["messages"][-1]["content"]
        k = int(body.get("top_logprobs") or 0)
        content = [
            {
                "token": f"token_id:{byte}",
                "logprob": 0.0,
                "top_logprobs": [
                    {"token": f"token_id:{(byte + i) % 256}", "logprob": 0.0 if i == 0 else -30.0} for i in range(k)
                ],
            }
            for byte in text.encode()
        ]
        choices = [
            {
                "index": index,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
                "logprobs": {"content": content} if body.get("logprobs") else None,
            }
            for index in range(int(body.get("n", 1)))
        ]
        return {"id": "chatcmpl-echo", "object": "chat.completion", "model": self.served_name, "choices": choices}

    def complete(self, body: dict) -> dict:
        from stillhouse.sampling.hf_engine import generate, render_prompts

        if self.model is None:
            return self.echo(body)

        k = int(body.get("top_logprobs") or 0)
        prompt = render_prompts(self.tokenizer, [body["messages"]])
        with self._lock:
            generations = generate(
                self.model,
                self.tokenizer,
                prompt,
                max_new_tokens=int(body["max_tokens"]),
                temperature=float(body.get("temperature", 0.0)),
                top_p=float(body.get("top_p", 1.0)),
                n=int(body.get("n", 1)),
                top_k_logprobs=max(k, 1),
                seed=int(body.get("seed", 0)),
            )
        as_ids = bool(body.get("return_tokens_as_token_ids"))

        def token(token_id: int) -> str:
            return f"token_id:{token_id}" if as_ids else self.tokenizer.convert_ids_to_tokens(token_id)

        choices = []
        for index, generation in enumerate(generations):
            content = []
            for j, token_id in enumerate(generation.token_ids):
                chosen = generation.top_k_logprobs[j][0] if generation.top_k_ids[j][0] == token_id else None
                top = [
                    {"token": token(i), "logprob": lp}
                    for i, lp in zip(generation.top_k_ids[j][:k], generation.top_k_logprobs[j][:k])
                ]
                content.append(
                    {"token": token(token_id), "logprob": chosen if chosen is not None else -1.0, "top_logprobs": top}
                )
            choices.append(
                {
                    "index": index,
                    "message": {"role": "assistant", "content": generation.text},
                    "finish_reason": "stop",
                    "logprobs": {"content": content} if body.get("logprobs") else None,
                }
            )
        return {"id": "chatcmpl-test", "object": "chat.completion", "model": self.served_name, "choices": choices}

    def complete_prompt(self, body: dict) -> tuple[int, dict]:
        """(status, answer) of /v1/completions: vLLM's `prompt_logprobs` from one forward, ``max_tokens`` greedy."""
        import torch

        if self.model is None:
            return 400, {"error": {"message": "this test server needs a model folder for /v1/completions"}}
        prompt = body["prompt"]
        ids = (
            list(prompt) if isinstance(prompt, list) else self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        )
        k = body.get("prompt_logprobs")
        if k is not None and int(k) > self.max_logprobs:
            message = f"Requested prompt logprobs of {k}, which is greater than max allowed: {self.max_logprobs}"
            return 400, {"error": {"message": message, "type": "BadRequestError", "code": 400}}
        with self._lock, torch.no_grad():
            sequence = list(ids)
            logprobs = None
            for _ in range(max(int(body.get("max_tokens", 16)), 1)):
                step = self.model(input_ids=torch.tensor([sequence])).logits[0].float().log_softmax(-1)
                logprobs = step if logprobs is None else logprobs
                sequence.append(int(step[-1].argmax()))
        answer = [None]
        for j in range(1, len(ids)):
            distribution = logprobs[j - 1]
            actual = ids[j]
            # vLLM's order: the prompt's own token first, then the top-k by rank.
            entries = {
                str(actual): {
                    "logprob": float(distribution[actual]),
                    "rank": int((distribution > distribution[actual]).sum()) + 1,
                    "decoded_token": self.tokenizer.decode([actual]),
                }
            }
            if k:
                values, top = distribution.topk(int(k))
                for rank, (token, value) in enumerate(zip(top.tolist(), values.tolist()), start=1):
                    entries[str(token)] = {
                        "logprob": value,
                        "rank": rank,
                        "decoded_token": self.tokenizer.decode([token]),
                    }
            answer.append(entries)
        generated = sequence[len(ids) :]
        choice = {
            "index": 0,
            "text": self.tokenizer.decode(generated),
            "logprobs": None,
            "finish_reason": "length",
            "prompt_logprobs": answer if k is not None and self.prompt_logprobs else None,
        }
        if not self.prompt_logprobs:
            del choice["prompt_logprobs"]
        return 200, {"id": "cmpl-test", "object": "text_completion", "model": self.served_name, "choices": [choice]}

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive: a load test would otherwise open a connection per request

            def setup(self) -> None:
                super().setup()
                with server._lock:
                    server._connections.add(self.connection)

            def finish(self) -> None:
                with server._lock:
                    server._connections.discard(self.connection)
                super().finish()

            def log_message(self, *args) -> None:
                pass

            def _send(self, status: int, payload: bytes, headers: dict | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout test)
                    self.wfile.write(payload)

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if server.record_requests:
                    with server._lock:
                        server.requests.append(
                            {"path": self.path, "body": body, "authorization": self.headers.get("Authorization")}
                        )
                if self.path not in ("/v1/chat/completions", "/v1/completions"):
                    return self._send(404, b'{"error": "not found"}')
                key = server.conversation_key(body)
                injected = server._injected_failure(key)
                if injected == 429:
                    return self._send(429, b'{"error": {"message": "rate limited"}}', {"Retry-After": "0"})
                if injected == 503:
                    return self._send(503, b'{"error": {"message": "service unavailable"}}')
                fault = server._next_fault()
                if fault == "429":
                    return self._send(429, b'{"error": {"message": "rate limited"}}', {"Retry-After": "0"})
                if fault == "500":
                    return self._send(500, b'{"error": {"message": "overloaded"}}')
                if fault == "malformed":
                    return self._send(200, b'{"id": "x", "choices": [{"index": 0, "message": {}}]}')
                if fault is not None and fault.startswith("sleep:"):
                    time.sleep(float(fault.split(":", 1)[1]))
                if self.path == "/v1/completions":
                    status, payload = server.complete_prompt(body)
                else:
                    status, payload = 200, server.complete(body)
                if status == 200:
                    with server._lock:
                        server.answered[key] += 1
                self._send(status, json.dumps(payload).encode())

        return Handler
