"""A real OpenAI-compatible HTTP server on loopback, over a tiny local model, for tests.

    python -m tests.openai_server --model FOLDER [--port 0] [--api-key KEY] [--fail-first N]

Serves /v1/completions, /v1/chat/completions, /v1/embeddings and /v1/models the way vLLM and
the hosted API do (the fields LLMOS reads and a few more). `--fail-first N` answers the first N
POSTs with 429 and Retry-After: 0, to exercise client retries. Prints `READY <port>` when up.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Backend:
    def __init__(self, folder: str) -> None:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForCausalLM.from_pretrained(folder).eval()
        self.lock = threading.Lock()

    def complete(self, prompt: str, max_tokens: int) -> tuple[str, int, int]:
        max_tokens = max(1, min(max_tokens, self.model.config.n_positions // 4))  # servers cap it too
        ids = self.tok.encode(prompt, add_special_tokens=False)[-(self.model.config.n_positions - max_tokens - 1):]
        with self.lock, self.torch.inference_mode():
            out = self.model.generate(self.torch.tensor([ids]), attention_mask=self.torch.ones(1, len(ids), dtype=self.torch.long),
                                      max_new_tokens=max_tokens, min_new_tokens=1, do_sample=False,
                                      pad_token_id=self.tok.eos_token_id)
        new = out[0, len(ids):].tolist()
        return self.tok.decode(new, skip_special_tokens=True), len(ids), len(new)

    def embed(self, texts: list[str]) -> list[list[float]]:
        rows = []
        with self.lock, self.torch.inference_mode():
            for t in texts:
                ids = self.tok.encode(t, add_special_tokens=False)[:64] or [0]
                hidden = self.model.transformer(self.torch.tensor([ids])).last_hidden_state[0].mean(0)
                rows.append(self.torch.nn.functional.normalize(hidden, dim=0).tolist())
        return rows


def make_handler(backend: Backend, api_key: str | None, fail_first: int):
    state = {"posts": 0}
    state_lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def send(self, code: int, body: dict, headers: dict | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path.rstrip("/") == "/v1/models":
                return self.send(200, {"object": "list", "data": [{"id": "tiny-gpt2", "object": "model"}]})
            self.send(404, {"error": {"message": "not found"}})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            with state_lock:
                state["posts"] += 1
                n = state["posts"]
            if n <= fail_first:
                return self.send(429, {"error": {"message": "rate limited"}}, {"Retry-After": "0"})
            if api_key and self.headers.get("Authorization") != f"Bearer {api_key}":
                return self.send(401, {"error": {"message": "invalid api key"}})
            path = self.path.rstrip("/")
            created = int(time.time())
            if path == "/v1/completions":
                text, pin, pout = backend.complete(body["prompt"], int(body.get("max_tokens", 16)))
                return self.send(200, {"id": f"cmpl-{n}", "object": "text_completion", "created": created,
                                       "model": body.get("model"), "choices": [
                                           {"index": 0, "text": text, "finish_reason": "length"}],
                                       "usage": {"prompt_tokens": pin, "completion_tokens": pout,
                                                 "total_tokens": pin + pout}})
            if path == "/v1/chat/completions":
                prompt = "".join(f"{m['role']}: {m['content']}\n" for m in body["messages"]) + "assistant:"
                text, pin, pout = backend.complete(prompt, int(body.get("max_tokens", 16)))
                return self.send(200, {"id": f"chat-{n}", "object": "chat.completion", "created": created,
                                       "model": body.get("model"), "choices": [
                                           {"index": 0, "finish_reason": "length",
                                            "message": {"role": "assistant", "content": text}}],
                                       "usage": {"prompt_tokens": pin, "completion_tokens": pout,
                                                 "total_tokens": pin + pout}})
            if path == "/v1/embeddings":
                inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
                vecs = backend.embed(inputs)
                return self.send(200, {"object": "list", "model": body.get("model"), "data": [
                    {"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vecs)],
                    "usage": {"prompt_tokens": 0, "total_tokens": 0}})
            self.send(404, {"error": {"message": f"no route {path}"}})

    return Handler


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--api-key")
    ap.add_argument("--fail-first", type=int, default=0)
    args = ap.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(Backend(args.model), args.api_key, args.fail_first))
    print(f"READY {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
