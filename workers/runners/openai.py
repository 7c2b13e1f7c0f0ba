"""The `openai` engine: tasks served by any OpenAI-compatible HTTP server (vLLM, TGI, Ollama, hosted).

`OpenAIClient` owns timeouts and retries: 429 and 5xx answers and connection errors are retried
with exponential backoff and jitter (honouring Retry-After), other 4xx are not. A batch's requests
go out concurrently; each job gets its own answer or its own error, and the worker keeps serving.
Registry options: `model` (remote model name), `embedding_model`, `api_key_env` (environment
variable holding the key, "" for servers without auth), `timeout_s`, `max_retries`, `chat` (use
/chat/completions for writing too).
"""

from __future__ import annotations

import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import httpx

from llmos.jobs import Job
from llmos.registry import ModelSpec
from llmos.tasks import (DialogueTask, SummarizationTask, Task, TranslationTask,
                         WritingTask)
from workers.runners.base import ItemError, ItemOutcome, Runner
from workers.runners.seq2seq import LANGUAGE_NAMES

RETRY_STATUSES = {408, 409, 429, 500, 502, 503, 504}


class OpenAIClient:
    """POSTs JSON to an OpenAI-compatible base URL with timeouts and retries."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.base_url = spec.source.rstrip("/")
        opts = spec.options
        self.model = opts.get("model") or spec.name
        self.embedding_model = opts.get("embedding_model") or self.model
        self.key_env = opts.get("api_key_env", "OPENAI_API_KEY")
        self.max_retries = int(opts.get("max_retries", 3))
        self.backoff_s = float(opts.get("backoff_s", 0.5))
        self.http = httpx.Client(timeout=httpx.Timeout(float(opts.get("timeout_s", 60)), connect=5.0))

    def headers(self) -> dict[str, str]:
        if not self.key_env:
            return {}
        key = os.environ.get(self.key_env)
        if not key:
            raise ItemError(
                f"model {self.spec.name!r} needs an API key: set {self.key_env} in the worker's "
                "environment (or api_key_env = \"\" in llmos.toml for a server without auth)")
        return {"Authorization": f"Bearer {key}"}

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        url = f"{self.base_url}/{path.lstrip('/')}"
        headers = self.headers()
        attempt = 0
        while True:
            try:
                resp = self.http.post(url, json=body, headers=headers)
            except httpx.TransportError as exc:
                if attempt >= self.max_retries:
                    raise ItemError(f"cannot reach the OpenAI-compatible endpoint {url}: "
                                    f"{type(exc).__name__}: {exc} (after {attempt + 1} tries)",
                                    transient=True) from None
                self._sleep(attempt, None)
                attempt += 1
                continue
            if resp.status_code < 400:
                return resp.json()
            if resp.status_code in RETRY_STATUSES and attempt < self.max_retries:
                self._sleep(attempt, resp.headers.get("retry-after"))
                attempt += 1
                continue
            raise ItemError(f"{url} answered {resp.status_code}: {resp.text[:300]}"
                            + (f" (after {attempt + 1} tries)" if attempt else ""),
                            transient=resp.status_code in RETRY_STATUSES)

    def _sleep(self, attempt: int, retry_after: str | None) -> None:
        delay = self.backoff_s * (2 ** attempt) * (0.5 + random.random())
        if retry_after:
            try:
                delay = max(delay, float(retry_after))
            except ValueError:
                pass
        time.sleep(min(delay, 30.0))


class OpenAIRunner(Runner):
    """Base: sends each request concurrently; subclasses build the body and read the answer."""

    def preprocess(self, requests: Sequence[Task], jobs: Sequence[Job] | None) -> Any:
        history = [self.history(j) if (self.history and jobs) else [] for j in (jobs or [None] * len(requests))]
        return list(zip(requests, history))

    def forward(self, items: list[tuple[Task, list]]) -> list[ItemOutcome]:
        client: OpenAIClient = self.loaded.model
        with ThreadPoolExecutor(max(1, min(len(items), 16))) as pool:
            return list(pool.map(lambda it: self._one(client, *it), items))

    def _one(self, client: OpenAIClient, task: Task, history: list) -> ItemOutcome:
        try:
            return self.call(client, task, history)
        except ItemError as exc:
            return ItemOutcome(error=str(exc), transient=exc.transient)
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            return ItemOutcome(error=f"unexpected answer from {client.base_url}: {exc!r}")
        except Exception as exc:  # one job's failure, never the batch's
            return ItemOutcome(error=f"{type(exc).__name__}: {exc}")

    def postprocess(self, outputs: list[ItemOutcome], requests: Sequence[Task]) -> list[ItemOutcome]:
        return outputs

    def run(self, requests: Sequence[Task], jobs: Sequence[Job] | None = None,
            control: Any = None) -> list[ItemOutcome]:
        try:
            return self.postprocess(self.forward(self.preprocess(requests, jobs)), requests)
        except Exception as exc:  # e.g. the history read failed: every job of the batch says so
            from workers.batcher import _is_transient

            return [ItemOutcome(error=f"{type(exc).__name__}: {exc}", transient=_is_transient(exc))
                    for _ in requests]

    def call(self, client: OpenAIClient, task: Any, history: list) -> ItemOutcome:
        raise NotImplementedError

    def chat(self, client: OpenAIClient, messages: list[dict], max_tokens: int, **extra: Any) -> tuple[str, dict]:
        body = {"model": client.model, "messages": messages, "max_tokens": max_tokens, **extra}
        data = client.post("chat/completions", body)
        return data["choices"][0]["message"]["content"] or "", data.get("usage") or {}


def _usage(usage: dict) -> tuple[int | None, int | None]:
    return usage.get("prompt_tokens"), usage.get("completion_tokens")


class OpenAIWritingRunner(OpenAIRunner):
    task_type = "writing"

    def call(self, client: OpenAIClient, task: WritingTask, history: list) -> ItemOutcome:
        max_tokens = task.new_tokens(self.spec.max_new_tokens)
        extra: dict[str, Any] = {"temperature": task.temperature, "top_p": task.top_p}
        if task.stop:
            extra["stop"] = task.stop
        if task.seed is not None:
            extra["seed"] = task.seed
        if self.spec.options.get("chat"):
            text, usage = self.chat(client, [{"role": "user", "content": task.prompt}], max_tokens, **extra)
            reason = "stop"
        else:
            data = client.post("completions", {"model": client.model, "prompt": task.prompt,
                                               "max_tokens": max_tokens, **extra})
            choice = data["choices"][0]
            text, usage, reason = choice["text"], data.get("usage") or {}, choice.get("finish_reason") or "stop"
        tin, tout = _usage(usage)
        return ItemOutcome(result={"text": text, "tokens": tout or 0, "prompt_tokens": tin or 0,
                                   "truncated": False, "finish_reason": reason},
                           tokens_in=tin, tokens_out=tout)


class OpenAIDialogueRunner(OpenAIRunner):
    task_type = "dialogue"

    def call(self, client: OpenAIClient, task: DialogueTask, history: list) -> ItemOutcome:
        messages = [{"role": "system", "content": task.system}] if task.system else []
        keep = int(self.spec.options.get("max_history_turns", 20))
        turns = history[-keep:] if keep else []
        for user, reply in turns:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        messages.append({"role": "user", "content": task.user_utterance})
        text, usage = self.chat(client, messages, task.max_new_tokens or self.spec.max_new_tokens,
                                temperature=task.temperature, top_p=task.top_p)
        tin, tout = _usage(usage)
        prompt = "\n".join(f"{m['role']}: {m['content']}" for m in messages)
        return ItemOutcome(result={"response": text.strip(), "conversation_id": task.conversation_id or "",
                                   "history_turns": len(turns), "truncated": len(turns) < len(history),
                                   "prompt": prompt},
                           tokens_in=tin, tokens_out=tout)


class OpenAISummaryRunner(OpenAIRunner):
    task_type = "summarize"

    def call(self, client: OpenAIClient, task: SummarizationTask, history: list) -> ItemOutcome:
        from workers.runners.extractive import split_sentences

        keep = task.sentences_to_keep(len(split_sentences(task.text)) or 1)
        messages = [{"role": "system", "content": "You summarize texts faithfully and briefly."},
                    {"role": "user", "content": f"Summarize this text in at most {keep} "
                                                f"sentence{'s' if keep > 1 else ''}:\n\n{task.text}"}]
        text, usage = self.chat(client, messages, task.max_length, temperature=0)
        tin, tout = _usage(usage)
        return ItemOutcome(result={"summary": text.strip(), "truncated": False}, tokens_in=tin, tokens_out=tout)


class OpenAITranslationRunner(OpenAIRunner):
    task_type = "translate"

    def call(self, client: OpenAIClient, task: TranslationTask, history: list) -> ItemOutcome:
        src = LANGUAGE_NAMES.get(task.source_lang, task.source_lang)
        tgt = LANGUAGE_NAMES.get(task.target_lang, task.target_lang)
        messages = [{"role": "system", "content": f"Translate the user's text from {src} to {tgt}. "
                                                  "Answer with the translation only."},
                    {"role": "user", "content": task.text}]
        text, usage = self.chat(client, messages, self.spec.max_new_tokens, temperature=0)
        tin, tout = _usage(usage)
        return ItemOutcome(result={"translation": text.strip(), "truncated": False}, tokens_in=tin,
                           tokens_out=tout)


class OpenAIEmbedRunner(OpenAIRunner):
    """Embeddings go out as one request per batch (the API takes a list of inputs)."""

    task_type = "embed"

    def forward(self, items: list[tuple[Task, list]]) -> list[ItemOutcome]:
        client: OpenAIClient = self.loaded.model
        texts = [t for task, _ in items for t in task.texts]  # type: ignore[attr-defined]
        try:
            data = client.post("embeddings", {"model": client.embedding_model, "input": texts})
            rows = [d["embedding"] for d in sorted(data["data"], key=lambda d: d.get("index", 0))]
            if len(rows) != len(texts):
                raise ItemError(f"{client.base_url}/embeddings returned {len(rows)} vectors for {len(texts)} texts")
        except ItemError as exc:
            return [ItemOutcome(error=str(exc), transient=exc.transient) for _ in items]
        except Exception as exc:
            return [ItemOutcome(error=f"unexpected answer from {client.base_url}: {exc!r}") for _ in items]
        out, i = [], 0
        for task, _ in items:
            n = len(task.texts)  # type: ignore[attr-defined]
            vecs = rows[i:i + n]
            i += n
            out.append(ItemOutcome(result={"vectors": vecs, "dim": len(vecs[0]) if vecs else 0},
                                   tokens_in=None, tokens_out=0))
        return out
