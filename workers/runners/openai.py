"""The `openai` engine: tasks served by any OpenAI-compatible HTTP server (vLLM, TGI, Ollama, hosted).

The HTTP side is the official `openai` package's synchronous client (`openai.OpenAI`): it owns
timeouts, retries (408, 409, 429, 5xx and connection errors, honouring Retry-After and
Retry-After-Ms up to 60 s, exponential backoff with jitter otherwise) and connection pooling.
This module owns the mapping of LLMOS tasks to request bodies and of answers and errors back
to one `ItemOutcome` per job.

Concurrency: a batch's requests go out together from a thread pool that lives as long as the
loaded model (at most `max_batch_size` threads, 32 at most), one blocking client call per job.
The sync client in threads rather than `AsyncOpenAI`: the worker's batcher is thread-based and
calls `run` from its model thread, so an async client would need an event loop thread of its
own per worker; threads give the same overlap for a batch, keep each job's call (and its
exception) on its own future, and a stuck request is bounded by `timeout_s`. Each job gets its
own answer or its own error: a 400 for one job fails that job only; a 429 or 5xx is retried by
the client up to `max_retries` times, then fails that job (marked transient, so the worker's
own retry policy may run it again later); the worker keeps serving. Embeddings go out as one
request per batch (the API takes a list of inputs); if it fails, every job of the batch fails
with that error.

Streaming: when a job of the batch has a subscriber on its token stream (`llmos.streaming`:
one PUBSUB NUMSUB per batch), that job (writing or chat) is requested with `stream=True` (and
`stream_options.include_usage`) and each content delta the remote server sends is relayed with
`TokenPublisher.delta` (with the job's attempt), then `end()` once the job's outcome is a result
(a call that fails, retryable or not, ends nothing: the job may run again as a new attempt);
the recorded result is the joined deltas. The other jobs
go unstreamed. The Redis client comes from the worker's settings (`LLMOS_REDIS_URL`), made once
per runner on first use. A streamed job stops reading early once it is cancelled or over its
timeout. Servers that send no usage chunk get `tokens` counted as the content chunks received.

Registry options (`options = {...}` of an `engine = "openai"` entry; see docs/models.md):
  `model`            remote model name (default: the entry's name)
  `embedding_model`  remote model for `embed` (default: `model`)
  `api_key_env`      environment variable holding the key (default OPENAI_API_KEY; "" for a
                     server without auth: no Authorization header is sent)
  `timeout_s`        seconds per HTTP attempt (default 60)
  `max_retries`      retries after the first attempt (default 3)
  `backoff_s`        first backoff delay when the server sends no Retry-After (default 0.5,
                     doubling per retry, capped at 8 s; the client's own schedule scaled)
  `chat`             true: `writing` goes to /chat/completions as one user message
  `max_history_turns` dialogue turns sent as context (default 20)
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, ClassVar, Iterator, Sequence

import openai

from llmos.jobs import Job
from llmos.registry import ModelSpec
from llmos.streaming import TokenPublisher, listened
from llmos.tasks import (ChatTask, DialogueTask, SummarizationTask, Task, TranslationTask,
                         WritingTask)
from workers.runners.base import ItemError, ItemOutcome, Runner, end_streams
from workers.runners.seq2seq import LANGUAGE_NAMES

DEFAULT_BACKOFF_S = 0.5
"""The official client's first retry delay (openai._constants.INITIAL_RETRY_DELAY)."""

MAX_POOL_THREADS = 32


class _Client(openai.OpenAI):
    """The official client, its backoff scaled by `backoff_s` when the server sends no Retry-After.

    `_calculate_retry_timeout` is the client's one hook for the delay; should a release drop it,
    the client's own schedule applies and only `backoff_s` stops having an effect.
    """

    llmos_backoff_scale: float = 1.0

    def _calculate_retry_timeout(self, remaining_retries: int, options: Any,
                                 response_headers: Any = None) -> float:
        delay = super()._calculate_retry_timeout(remaining_retries, options, response_headers)
        try:
            said = self._parse_retry_after_header(response_headers)
        except Exception:
            said = None
        if said is not None and 0 < said <= 60:
            return delay  # the server said how long to wait: honoured as it is
        return delay * self.llmos_backoff_scale


class OpenAIClient:
    """One endpoint: the official client (made per API key value, read from the environment at
    each call, so a rotated key is picked up), the engine's options, and the request pool."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.base_url = spec.source.rstrip("/")
        opts = spec.options
        self.model = opts.get("model") or spec.name
        self.embedding_model = opts.get("embedding_model") or self.model
        self.key_env = opts.get("api_key_env", "OPENAI_API_KEY")
        self.timeout_s = float(opts.get("timeout_s", 60))
        self.max_retries = int(opts.get("max_retries", 3))
        self.backoff_s = float(opts.get("backoff_s", DEFAULT_BACKOFF_S))
        self._clients: dict[str | None, openai.OpenAI] = {}
        self._users: dict[int, int] = {}  # calls using each client now, by id(client)
        self._retired: list[openai.OpenAI] = []  # replaced (a key change), closed once unused
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self.headers: dict[str, Any] = {} if self.key_env else {"Authorization": openai.Omit()}
        """Per request: without a key, no Authorization header at all."""

    def api(self) -> openai.OpenAI:
        """The official client for the key now in the environment (ItemError when it is missing).

        A key change replaces the client; the old one is closed (its connection pool) as soon as
        no call still uses it (`using`)."""
        key: str | None = None
        if self.key_env:
            key = os.environ.get(self.key_env)
            if not key:
                raise ItemError(
                    f"model {self.spec.name!r} needs an API key: set {self.key_env} in the worker's "
                    "environment (or api_key_env = \"\" in llmos.toml for a server without auth)")
        with self._lock:
            client = self._clients.get(key)
            if client is None:
                client = _Client(base_url=self.base_url, api_key=key or "unused", timeout=self.timeout_s,
                                 max_retries=self.max_retries)
                client.llmos_backoff_scale = self.backoff_s / DEFAULT_BACKOFF_S
                self._retired += self._clients.values()  # an old key's client is dropped
                self._clients = {key: client}
                self._close_unused()
            return client

    @contextlib.contextmanager
    def using(self) -> Iterator[openai.OpenAI]:
        """The client for the current key, counted as in use until the block ends (a replaced
        client is closed only once its last call is done)."""
        client = self.api()
        with self._lock:
            self._users[id(client)] = self._users.get(id(client), 0) + 1
        try:
            yield client
        finally:
            with self._lock:
                left = self._users.pop(id(client)) - 1
                if left:
                    self._users[id(client)] = left
                self._close_unused()

    def _close_unused(self) -> None:
        """Close the replaced clients no call uses (the lock held)."""
        for old in [c for c in self._retired if id(c) not in self._users]:
            self._retired.remove(old)
            try:
                old.close()
            except Exception:  # closing a pool must not fail a job
                pass

    def pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max(1, min(self.spec.max_batch_size, MAX_POOL_THREADS)),
                                                thread_name_prefix=f"openai-{self.spec.name}")
            return self._pool

    def call(self, path: str, fn: Callable[[openai.OpenAI], Any]) -> Any:
        """`fn(client)`, with the client's errors turned into this job's ItemError."""
        with self.using() as api, self.errors(path):
            return fn(api)

    @contextlib.contextmanager
    def errors(self, path: str) -> Iterator[None]:
        """The client's errors (and a stream that breaks off) as this job's ItemError."""
        try:
            yield
        except ItemError:
            raise
        except openai.APIStatusError as exc:
            raise self._status_error(path, exc) from None
        except openai.APIConnectionError as exc:
            raise self._connection_error(path, exc) from None
        except openai.APIError as exc:  # an error event inside a stream
            raise ItemError(f"{self.base_url}/{path} sent an error: {exc.message[:300]}") from None
        except (OSError, RuntimeError) as exc:  # the transport broke off mid-stream (httpx errors)
            raise ItemError(f"the stream from {self.base_url}/{path} broke off: {type(exc).__name__}: {exc}",
                            transient=True) from None
        except Exception as exc:
            if type(exc).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore"):
                raise ItemError(f"the stream from {self.base_url}/{path} broke off: "
                                f"{type(exc).__name__}: {exc}", transient=True) from None
            raise

    def _tries(self, request: Any) -> str:
        try:
            retries = int(request.headers.get("x-stainless-retry-count", "0"))
        except (AttributeError, ValueError, RuntimeError):
            return ""
        return f" (after {retries + 1} tries)" if retries else ""

    def _status_error(self, path: str, exc: openai.APIStatusError) -> ItemError:
        status = exc.status_code
        try:
            text = exc.response.text[:300]
        except Exception:  # a streamed body not read
            text = exc.message[:300]
        retried = status in (408, 409, 429) or status >= 500
        return ItemError(f"{self.base_url}/{path} answered {status}: {text}"
                         f"{self._tries(exc.response.request)}", transient=retried)

    def _connection_error(self, path: str, exc: openai.APIConnectionError) -> ItemError:
        cause = exc.__cause__ or exc.__context__
        what = f"{type(cause).__name__}: {cause}" if cause is not None else f"{type(exc).__name__}: {exc}"
        if isinstance(exc, openai.APITimeoutError):
            what = f"no answer within timeout_s = {self.timeout_s:g} s"
        tries = self._tries(exc.request) or " (after 1 try)"
        return ItemError(f"cannot reach the OpenAI-compatible endpoint {self.base_url}/{path}: {what}{tries}",
                         transient=True)

    def generate(self, path: str, body: dict[str, Any], publisher: TokenPublisher | None = None,
                 stop: Callable[[], bool] | None = None) -> tuple[str, dict[str, Any], str]:
        """POST a completions or chat body: (text, usage, finish_reason), streamed to `publisher`
        when one is given (`stop()` true ends the stream early; the caller sends `end`, once
        the job's outcome is a result)."""
        chat = path == "chat/completions"

        def create(api: openai.OpenAI) -> Any:
            endpoint = api.chat.completions if chat else api.completions
            if publisher is None:
                return endpoint.create(**body, extra_headers=self.headers)
            return endpoint.create(**body, stream=True, stream_options={"include_usage": True},
                                   extra_headers=self.headers)

        if publisher is None:
            data = self.call(path, create)
            choice = data.choices[0]
            text = (choice.message.content if chat else choice.text) or ""
            return text, _usage_dict(data.usage), choice.finish_reason or "stop"
        pieces: list[str] = []
        usage: dict[str, Any] = {}
        reason = None
        with self.using() as api:  # held while the stream is read: a key change closes it after
            with self.errors(path):
                stream = create(api)
            try:
                with self.errors(path):
                    for chunk in stream:
                        if chunk.usage is not None:
                            usage = _usage_dict(chunk.usage)
                        for choice in chunk.choices or ():
                            piece = (choice.delta.content if chat else choice.text) or ""
                            if piece:
                                pieces.append(piece)
                                publisher.delta(piece)
                            reason = choice.finish_reason or reason
                        if stop is not None and stop():
                            break
            finally:
                stream.close()
        if "completion_tokens" not in usage:
            usage["completion_tokens"] = len(pieces)  # no usage chunk: one token a content chunk
        return "".join(pieces), usage, reason or "stop"

    def embed(self, texts: list[str]) -> list[list[float]]:
        data = self.call("embeddings", lambda api: api.embeddings.create(
            model=self.embedding_model, input=texts, encoding_format="float", extra_headers=self.headers))
        return [list(d.embedding) for d in sorted(data.data, key=lambda d: d.index or 0)]


def _usage_dict(usage: Any) -> dict[str, Any]:
    if usage is None:
        return {}
    return {k: getattr(usage, k, None) for k in ("prompt_tokens", "completion_tokens")
            if getattr(usage, k, None) is not None}


def _usage(usage: dict) -> tuple[int | None, int | None]:
    return usage.get("prompt_tokens"), usage.get("completion_tokens")


@dataclasses.dataclass
class _Item:
    index: int
    task: Task
    history: list
    publisher: TokenPublisher | None = None


class OpenAIRunner(Runner):
    """Base: sends each request of a batch concurrently; subclasses build the body and read the answer."""

    uses_history: ClassVar[bool] = False
    streams: ClassVar[bool] = False  # this task type relays a remote stream to a listened job

    def __init__(self, loaded: Any, history: Any = None) -> None:
        super().__init__(loaded, history)
        self._redis: Any = None
        self._redis_lock = threading.Lock()

    @property
    def client(self) -> OpenAIClient:
        return self.loaded.model

    def stream_redis(self) -> Any:
        """The Redis client token streams go to: the worker's (`runners_for` sets `redis`), else
        one made on first use from the settings (a runner built outside a worker)."""
        if self.redis is not None:
            return self.redis
        with self._redis_lock:
            if self._redis is None:
                from llmos.notify import redis_client
                from llmos.settings import get_settings

                self._redis = redis_client(get_settings())
            return self._redis

    def preprocess(self, requests: Sequence[Task], jobs: Sequence[Job] | None) -> list[_Item]:
        js = list(jobs) if jobs else [None] * len(requests)
        items = [_Item(i, task, self.history(j) if (self.uses_history and self.history and j) else [])
                 for i, (task, j) in enumerate(zip(requests, js))]
        if self.streams and jobs:
            redis_client = self.stream_redis()
            wanted = listened(redis_client, [j.id for j in jobs])
            for item, job in zip(items, jobs):
                if job.id in wanted:
                    item.publisher = TokenPublisher(redis_client, job.id, job.attempts)
        return items

    def forward(self, items: list[_Item]) -> list[ItemOutcome]:
        if len(items) == 1:
            return [self._one(items[0])]
        return list(self.client.pool().map(self._one, items))

    def _one(self, item: _Item) -> ItemOutcome:
        try:
            return self.call(item)
        except ItemError as exc:
            return ItemOutcome(error=str(exc), transient=exc.transient)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
            return ItemOutcome(error=f"unexpected answer from {self.client.base_url}: {exc!r}")
        except Exception as exc:  # one job's failure, never the batch's
            return ItemOutcome(error=f"{type(exc).__name__}: {exc}")

    def postprocess(self, outputs: list[ItemOutcome], requests: Sequence[Task]) -> list[ItemOutcome]:
        return outputs

    def run(self, requests: Sequence[Task], jobs: Sequence[Job] | None = None,
            control: Any = None) -> list[ItemOutcome]:
        self._jobs, self._control = list(jobs) if jobs else None, control
        try:
            items = self.preprocess(requests, jobs)
            out = self.postprocess(self.forward(items), requests)
            end_streams(out, [item.publisher for item in items])  # a result: its text is final
            return out
        except Exception as exc:  # e.g. the history read failed: every job of the batch says so
            from workers.batcher import _is_transient

            return [ItemOutcome(error=f"{type(exc).__name__}: {exc}", transient=_is_transient(exc))
                    for _ in requests]

    def call(self, item: _Item) -> ItemOutcome:
        raise NotImplementedError

    def chat(self, item: _Item, messages: list[dict], max_tokens: int, **extra: Any) -> tuple[str, dict, str]:
        body = {"model": self.client.model, "messages": messages, "max_tokens": max_tokens, **extra}
        return self.client.generate("chat/completions", body, item.publisher, self._stopper(item.index))

    def written(self, text: str, usage: dict, reason: str) -> ItemOutcome:
        tin, tout = _usage(usage)
        return ItemOutcome(result={"text": text, "tokens": tout or 0, "prompt_tokens": tin or 0,
                                   "truncated": False, "finish_reason": reason},
                           tokens_in=tin, tokens_out=tout)


def _sampling(task: WritingTask | ChatTask) -> dict[str, Any]:
    extra: dict[str, Any] = {"temperature": task.temperature, "top_p": task.top_p}
    if task.stop:
        extra["stop"] = list(task.stop)
    if task.seed is not None:
        extra["seed"] = task.seed
    return extra


class OpenAIWritingRunner(OpenAIRunner):
    task_type = "writing"
    streams = True

    def call(self, item: _Item) -> ItemOutcome:
        task: WritingTask = item.task  # type: ignore[assignment]
        max_tokens = task.new_tokens(self.spec.max_new_tokens)
        if self.spec.options.get("chat"):
            return self.written(*self.chat(item, [{"role": "user", "content": task.prompt}], max_tokens,
                                           **_sampling(task)))
        body = {"model": self.client.model, "prompt": task.prompt, "max_tokens": max_tokens, **_sampling(task)}
        return self.written(*self.client.generate("completions", body, item.publisher,
                                                  self._stopper(item.index)))


class OpenAIChatRunner(OpenAIRunner):
    """The `chat` task: its messages go to /chat/completions as they are."""

    task_type = "chat"
    streams = True

    def call(self, item: _Item) -> ItemOutcome:
        task: ChatTask = item.task  # type: ignore[assignment]
        messages = [{"role": m.role, "content": m.content} for m in task.messages]
        return self.written(*self.chat(item, messages, task.new_tokens(self.spec.max_new_tokens),
                                       **_sampling(task)))


class OpenAIDialogueRunner(OpenAIRunner):
    task_type = "dialogue"
    uses_history = True

    def call(self, item: _Item) -> ItemOutcome:
        task: DialogueTask = item.task  # type: ignore[assignment]
        history = item.history
        messages = [{"role": "system", "content": task.system}] if task.system else []
        keep = int(self.spec.options.get("max_history_turns", 20))
        turns = history[-keep:] if keep else []
        for user, reply in turns:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        messages.append({"role": "user", "content": task.user_utterance})
        extra: dict[str, Any] = {"temperature": task.temperature, "top_p": task.top_p}
        if task.seed is not None:
            extra["seed"] = task.seed
        text, usage, _ = self.chat(item, messages, task.max_new_tokens or self.spec.max_new_tokens, **extra)
        tin, tout = _usage(usage)
        prompt = "\n".join(f"{m['role']}: {m['content']}" for m in messages)
        return ItemOutcome(result={"response": text.strip(), "conversation_id": task.conversation_id or "",
                                   "history_turns": len(turns), "truncated": len(turns) < len(history),
                                   "prompt": prompt},
                           tokens_in=tin, tokens_out=tout)


class OpenAISummaryRunner(OpenAIRunner):
    task_type = "summarize"

    def call(self, item: _Item) -> ItemOutcome:
        from workers.runners.extractive import split_sentences

        task: SummarizationTask = item.task  # type: ignore[assignment]
        keep = task.sentences_to_keep(len(split_sentences(task.text)) or 1)
        messages = [{"role": "system", "content": "You summarize texts faithfully and briefly."},
                    {"role": "user", "content": f"Summarize this text in at most {keep} "
                                                f"sentence{'s' if keep > 1 else ''}:\n\n{task.text}"}]
        text, usage, _ = self.chat(item, messages, task.max_length, temperature=0)
        tin, tout = _usage(usage)
        return ItemOutcome(result={"summary": text.strip(), "truncated": False}, tokens_in=tin, tokens_out=tout)


class OpenAITranslationRunner(OpenAIRunner):
    task_type = "translate"

    def call(self, item: _Item) -> ItemOutcome:
        task: TranslationTask = item.task  # type: ignore[assignment]
        src = LANGUAGE_NAMES.get(task.source_lang, task.source_lang)
        tgt = LANGUAGE_NAMES.get(task.target_lang, task.target_lang)
        messages = [{"role": "system", "content": f"Translate the user's text from {src} to {tgt}. "
                                                  "Answer with the translation only."},
                    {"role": "user", "content": task.text}]
        text, usage, _ = self.chat(item, messages, self.spec.max_new_tokens, temperature=0)
        tin, tout = _usage(usage)
        return ItemOutcome(result={"translation": text.strip(), "truncated": False}, tokens_in=tin,
                           tokens_out=tout)


class OpenAIEmbedRunner(OpenAIRunner):
    """Embeddings go out as one request per batch (the API takes a list of inputs)."""

    task_type = "embed"

    def forward(self, items: list[_Item]) -> list[ItemOutcome]:
        client = self.client
        texts = [t for item in items for t in item.task.texts]  # type: ignore[attr-defined]
        try:
            rows = client.embed(texts)
            if len(rows) != len(texts):
                raise ItemError(f"{client.base_url}/embeddings returned {len(rows)} vectors for {len(texts)} texts")
        except ItemError as exc:
            return [ItemOutcome(error=str(exc), transient=exc.transient) for _ in items]
        except Exception as exc:
            return [ItemOutcome(error=f"unexpected answer from {client.base_url}: {exc!r}") for _ in items]
        out, i = [], 0
        for item in items:
            n = len(item.task.texts)  # type: ignore[attr-defined]
            vecs = rows[i:i + n]
            i += n
            out.append(ItemOutcome(result={"vectors": vecs, "dim": len(vecs[0]) if vecs else 0},
                                   tokens_in=None, tokens_out=0))
        return out
