"""A small OpenAI-compatible chat-completions server on 127.0.0.1, serving a tiny local model.

    with FakeOpenAIServer(model_folder) as server:      # server.url is the base URL (…/v1)
        server.faults += ["429", "sleep:1.0", "malformed"]   # consumed one per request, in order

It answers `POST /v1/chat/completions` with the model's greedy (or sampled) response, `logprobs` and
`top_logprobs` like vLLM's server (tokens as `token_id:N` when `return_tokens_as_token_ids` is set),
records every request's body and Authorization header, and can be told to fail the next requests.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class FakeOpenAIServer:
    def __init__(self, model_folder: Path, served_name: str = "tiny-teacher"):
        from stillhouse.models import load_causal_lm, load_tokenizer

        self.model = load_causal_lm(str(model_folder), device="cpu")
        self.tokenizer = load_tokenizer(str(model_folder))
        self.served_name = served_name
        self.faults: list[str] = []
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = False  # server_close() waits for requests in flight
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def __enter__(self) -> FakeOpenAIServer:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _next_fault(self) -> str | None:
        with self._lock:
            return self.faults.pop(0) if self.faults else None

    def complete(self, body: dict) -> dict:
        from stillhouse.sampling.hf_engine import generate, render_prompts

        k = int(body.get("top_logprobs") or 0)
        prompt = render_prompts(self.tokenizer, [body["messages"]])
        with self._lock:
            generations = generate(self.model, self.tokenizer, prompt, max_new_tokens=int(body["max_tokens"]),
                                   temperature=float(body.get("temperature", 0.0)), top_p=float(body.get("top_p", 1.0)),
                                   n=int(body.get("n", 1)), top_k_logprobs=max(k, 1), seed=int(body.get("seed", 0)))
        as_ids = bool(body.get("return_tokens_as_token_ids"))

        def token(token_id: int) -> str:
            return f"token_id:{token_id}" if as_ids else self.tokenizer.convert_ids_to_tokens(token_id)

        choices = []
        for index, generation in enumerate(generations):
            content = []
            for j, token_id in enumerate(generation.token_ids):
                chosen = generation.top_k_logprobs[j][0] if generation.top_k_ids[j][0] == token_id else None
                top = [{"token": token(i), "logprob": lp} for i, lp in zip(generation.top_k_ids[j][:k], generation.top_k_logprobs[j][:k])]
                content.append({"token": token(token_id), "logprob": chosen if chosen is not None else -1.0, "top_logprobs": top})
            choices.append({"index": index, "message": {"role": "assistant", "content": generation.text},
                            "finish_reason": "stop", "logprobs": {"content": content} if body.get("logprobs") else None})
        return {"id": "chatcmpl-test", "object": "chat.completion", "model": self.served_name, "choices": choices}

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _send(self, status: int, payload: bytes, headers: dict | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                try:
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout test)
                    pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server._lock:
                    server.requests.append({"path": self.path, "body": body, "authorization": self.headers.get("Authorization")})
                if self.path != "/v1/chat/completions":
                    return self._send(404, b'{"error": "not found"}')
                fault = server._next_fault()
                if fault == "429":
                    return self._send(429, b'{"error": {"message": "rate limited"}}', {"Retry-After": "0"})
                if fault == "500":
                    return self._send(500, b'{"error": {"message": "overloaded"}}')
                if fault == "malformed":
                    return self._send(200, b'{"id": "x", "choices": [{"index": 0, "message": {}}]}')
                if fault is not None and fault.startswith("sleep:"):
                    time.sleep(float(fault.split(":", 1)[1]))
                self._send(200, json.dumps(server.complete(body)).encode())

        return Handler
