"""A real OpenAI-compatible HTTP server on loopback, over a tiny local model, for tests.

    python -m tests.openai_server --model FOLDER [--port 0] [--api-key KEY] [--fail-first N]
                                  [--retry-after S]

Serves /v1/completions, /v1/chat/completions, /v1/embeddings and /v1/models the way vLLM and
the hosted API do (the fields LLMOS reads and a few more), `stream: true` as Server-Sent Events
(one chunk a token, a usage chunk when `stream_options.include_usage`, then `data: [DONE]`).
`--fail-first N` answers the first N POSTs with 429 and `Retry-After: S` (`--retry-after`,
default 0), to exercise client retries; with S > 0 a POST that comes sooner than S seconds after
the last 429 is refused with 429 again and counted as early. A prompt (or message) containing
`[[400]]` is answered 400, as a server rejects one bad request; a streamed one containing
`[[break]]` sends two pieces, then the connection closes mid-body (a transport error: retryable). `GET /stats` says how many POSTs
came, how many early, and the Authorization header of the last one. Prints `READY <port>` when up.
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
        text, pin, pieces = self.pieces(prompt, max_tokens)
        return text, pin, len(pieces)

    def pieces(self, prompt: str, max_tokens: int) -> tuple[str, int, list[str]]:
        """The whole text, the prompt's tokens, and the text token by token (as a server streams it)."""
        max_tokens = max(1, min(max_tokens, self.model.config.n_positions // 4))  # servers cap it too
        ids = self.tok.encode(prompt, add_special_tokens=False)[-(self.model.config.n_positions - max_tokens - 1):]
        with self.lock, self.torch.inference_mode():
            out = self.model.generate(self.torch.tensor([ids]), attention_mask=self.torch.ones(1, len(ids), dtype=self.torch.long),
                                      max_new_tokens=max_tokens, min_new_tokens=1, do_sample=False,
                                      pad_token_id=self.tok.eos_token_id)
        new = out[0, len(ids):].tolist()
        full = self.tok.decode(new, skip_special_tokens=True)
        pieces, done = [], ""
        for k in range(1, len(new)):  # a token's piece: what it adds to the text so far
            so_far = self.tok.decode(new[:k], skip_special_tokens=True)
            if so_far.endswith("\ufffd") or not full.startswith(so_far) or not so_far.startswith(done):
                pieces.append("")  # half a character: it comes with a later token
                continue
            pieces.append(so_far[len(done):])
            done = so_far
        pieces.append(full[len(done):])
        return full, len(ids), pieces

    def embed(self, texts: list[str]) -> list[list[float]]:
        rows = []
        with self.lock, self.torch.inference_mode():
            for t in texts:
                ids = self.tok.encode(t, add_special_tokens=False)[:64] or [0]
                hidden = self.model.transformer(self.torch.tensor([ids])).last_hidden_state[0].mean(0)
                rows.append(self.torch.nn.functional.normalize(hidden, dim=0).tolist())
        return rows


def make_handler(backend: Backend, api_key: str | None, fail_first: int, retry_after: float = 0.0):
    state = {"posts": 0, "early": 0, "refused_at": None, "authorization": None}
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

        def sse(self, chunks: list[dict], cut_after: int | None = None) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            if cut_after is not None:  # a length never reached: the client sees the body cut off
                self.send_header("Content-Length", "1000000")
            self.end_headers()  # no Content-Length: the body ends when the connection closes
            self.close_connection = True
            for chunk in chunks[:cut_after]:
                self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                self.wfile.flush()
            if cut_after is None:
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()

        def stream(self, kind: str, n: int, body: dict, pieces: list[str], pin: int) -> None:
            created, model = int(time.time()), body.get("model")
            head = {"id": f"{kind}-{n}", "created": created, "model": model}
            if kind == "chat":
                head["object"] = "chat.completion.chunk"
                choice = lambda piece, reason=None: {"index": 0, "delta": {"content": piece} if piece is not None  # noqa: E731
                                                     else {}, "finish_reason": reason}
                chunks = [dict(head, choices=[{"index": 0, "delta": {"role": "assistant", "content": ""},
                                               "finish_reason": None}])]
            else:
                head["object"] = "text_completion"
                choice = lambda piece, reason=None: {"index": 0, "text": piece or "", "finish_reason": reason}  # noqa: E731
                chunks = []
            cut = None
            if "[[break]]" in json.dumps(body.get("prompt", "")) + json.dumps(body.get("messages", "")):
                cut = len(chunks) + 2  # two pieces, then the connection closes mid-body
            chunks += [dict(head, choices=[choice(p)]) for p in pieces]
            chunks.append(dict(head, choices=[choice(None, "length")]))
            if (body.get("stream_options") or {}).get("include_usage"):
                chunks.append(dict(head, choices=[], usage={"prompt_tokens": pin, "completion_tokens": len(pieces),
                                                            "total_tokens": pin + len(pieces)}))
            self.sse(chunks, cut)

        def do_GET(self):
            if self.path.rstrip("/") == "/stats":
                with state_lock:
                    return self.send(200, {k: state[k] for k in ("posts", "early", "authorization")})
            if self.path.rstrip("/") == "/v1/models":
                return self.send(200, {"object": "list", "data": [{"id": "tiny-gpt2", "object": "model"}]})
            self.send(404, {"error": {"message": "not found"}})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            with state_lock:
                state["posts"] += 1
                n = state["posts"]
                state["authorization"] = self.headers.get("Authorization")
                now = time.monotonic()
                early = retry_after > 0 and state["refused_at"] is not None and now < state["refused_at"] + retry_after
                if early:
                    state["early"] += 1
                if n <= fail_first or early:
                    state["refused_at"] = now
            if n <= fail_first or early:
                return self.send(429, {"error": {"message": "rate limited"}}, {"Retry-After": f"{retry_after:g}"})
            if api_key and self.headers.get("Authorization") != f"Bearer {api_key}":
                return self.send(401, {"error": {"message": "invalid api key"}})
            path = self.path.rstrip("/")
            created = int(time.time())
            if "[[400]]" in json.dumps(body.get("prompt", "")) + json.dumps(body.get("messages", "")):
                return self.send(400, {"error": {"message": "this request is rejected", "type": "invalid_request_error"}})
            if path == "/v1/completions" and body.get("stream"):
                text, pin, pieces = backend.pieces(body["prompt"], int(body.get("max_tokens", 16)))
                return self.stream("cmpl", n, body, pieces, pin)
            if path == "/v1/chat/completions" and body.get("stream"):
                prompt = "".join(f"{m['role']}: {m['content']}\n" for m in body["messages"]) + "assistant:"
                text, pin, pieces = backend.pieces(prompt, int(body.get("max_tokens", 16)))
                return self.stream("chat", n, body, pieces, pin)
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
    ap.add_argument("--retry-after", type=float, default=0.0)
    args = ap.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(Backend(args.model), args.api_key,
                                                                         args.fail_first, args.retry_after))
    print(f"READY {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
