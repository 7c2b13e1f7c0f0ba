"""OpenAI's request and response shapes, mapped onto LLMOS tasks and jobs. Pure: no I/O.

The /v1 endpoints (llmos/api/routes/openai.py) and the Batch API (llmos/batches/: each line of a
batch file is one of these requests) both go through here, so a request means the same in both:

- `POST /v1/chat/completions` → one `chat` task (messages, max_tokens / max_completion_tokens,
  temperature, top_p, stop, seed);
- `POST /v1/completions` → one `writing` task per prompt (a string, or a list of strings: one
  choice each);
- `POST /v1/embeddings` → one `embed` task with every input text (a string or a list of strings).

A field OpenAI defines that LLMOS cannot honour (n > 1, tools, logprobs, a non-text content part,
token-id prompts...) is refused with a ValidationError naming it, rather than ignored; fields
that change nothing here (`user`, `store`, `metadata`, `service_tier`, penalties of 0) are
accepted. Anything else unknown is refused too, as OpenAI does.
"""

from __future__ import annotations

import base64
import dataclasses
import struct
from datetime import datetime, timezone
from typing import Any

from llmos.errors import ValidationError
from llmos.jobs import Job
from llmos.tasks import ChatTask, EmbeddingTask, Task, WritingTask

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"
ENDPOINTS = (CHAT, COMPLETIONS, EMBEDDINGS)
"""The endpoints a request (and a batch) may name."""

_TOLERATED = {"user", "store", "metadata", "service_tier", "stream_options", "parallel_tool_calls"}
_ZERO_ONLY = {"presence_penalty", "frequency_penalty"}
_COMMON = {"model", "stream", "n", "temperature", "top_p", "stop", "seed", "max_tokens"}
_FIELDS = {
    CHAT: _COMMON | {"messages", "max_completion_tokens", "response_format", "logprobs", "top_logprobs",
                     "tools", "tool_choice", "functions", "function_call", "logit_bias"},
    COMPLETIONS: _COMMON | {"prompt", "echo", "suffix", "logprobs", "best_of", "logit_bias"},
    EMBEDDINGS: {"model", "input", "encoding_format", "dimensions"},
}
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclasses.dataclass(frozen=True)
class Request:
    """One OpenAI request as LLMOS runs it: the registry model's name and its tasks, in order."""

    endpoint: str
    model: str
    tasks: list[Task]
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage
    encoding_format: str = "float"  # embeddings: "float" or "base64"


def parse_request(endpoint: str, body: Any) -> Request:
    """The tasks of one request body for `endpoint`; ValidationError naming what is wrong."""
    if endpoint not in ENDPOINTS:
        raise ValidationError(f"unknown endpoint {endpoint!r}; one of {', '.join(ENDPOINTS)}")
    if not isinstance(body, dict):
        raise ValidationError("the request body must be a JSON object")
    unknown = sorted(set(body) - _FIELDS[endpoint] - _TOLERATED - _ZERO_ONLY)
    if unknown:
        raise ValidationError(f"unknown or unsupported field(s) for {endpoint}: {', '.join(unknown)}")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ValidationError("model: required, the name of a registry model (GET /v1/models)")
    for name in _ZERO_ONLY:
        if body.get(name) is not None and not (_is_number(body[name]) and body[name] == 0):
            raise ValidationError(f"{name}: only 0 is supported")
    if endpoint == EMBEDDINGS:
        return _embeddings(body, model)
    _refuse_set(body, "logit_bias", "tools", "functions", "suffix", "best_of")
    _refuse_set(body, "tool_choice", "function_call", allowed=(None, "none"))
    _refuse_set(body, "logprobs", allowed=(None, False))
    _refuse_set(body, "top_logprobs", allowed=(None, 0))
    _refuse_set(body, "echo", allowed=(None, False))
    if body.get("n") is not None and not (_is_number(body["n"]) and body["n"] == 1):
        raise ValidationError("n: only 1 is supported")
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise ValidationError("stream: must be true or false")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"}
                                or not isinstance(options.get("include_usage", False), (bool, type(None)))):
        raise ValidationError("stream_options: only {\"include_usage\": true|false} is supported")
    include_usage = bool(stream) and bool((options or {}).get("include_usage"))
    common = _sampling(body)
    if endpoint == CHAT:
        fmt = body.get("response_format")
        if fmt is not None and fmt != {"type": "text"}:
            raise ValidationError("response_format: only {\"type\": \"text\"} is supported")
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        tasks: list[Task] = [ChatTask(messages=_messages(body.get("messages")), max_new_tokens=limit, **common)]
    else:
        prompts = body.get("prompt")
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValidationError("prompt: a string or a non-empty list of strings (token ids are not supported)")
        tasks = [WritingTask(prompt=p, max_new_tokens=body.get("max_tokens"), **common) for p in prompts]
    return Request(endpoint, model, tasks, stream=bool(stream), include_usage=include_usage)


def _is_number(value: Any) -> bool:
    """A JSON number (true and false are not numbers, though Python's bool is an int)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _refuse_set(body: dict[str, Any], *names: str, allowed: tuple = (None,)) -> None:
    for name in names:
        value = body.get(name)
        # same type and value (0 is not false here), or an empty object or list: nothing asked
        if not any(type(value) is type(a) and value == a for a in allowed) and value not in ({}, []):
            raise ValidationError(f"{name}: not supported by LLMOS")


def _sampling(body: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in ("temperature", "top_p", "seed"):
        if body.get(name) is not None:
            value = body[name]
            # JSON has one number type: 1 is a valid temperature, as OpenAI takes it
            out[name] = float(value) if name != "seed" and isinstance(value, int) and not isinstance(value, bool) else value
    stop = body.get("stop")
    if stop is not None:
        out["stop"] = [stop] if isinstance(stop, str) else stop
    return out


def _messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise ValidationError("messages: a non-empty list of {role, content}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValidationError(f"messages[{i}]: must be an object with role and content")
        role = m.get("role")
        if not isinstance(role, str) or role not in _ROLES:
            raise ValidationError(f"messages[{i}].role: {role!r} is not supported; one of "
                                  f"{', '.join(_ROLES)} (tool and function messages are not)")
        extra = set(m) - {"role", "content", "name"}
        if extra:
            raise ValidationError(f"messages[{i}]: unsupported field(s) {', '.join(sorted(extra))}")
        out.append({"role": _ROLES[role], "content": _content(m.get("content"), i)})
    return out


def _content(content: Any, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValidationError(f"messages[{i}].content: only text parts are supported")
            texts.append(part["text"])
        return "".join(texts)
    raise ValidationError(f"messages[{i}].content: a string or a list of text parts")


def _embeddings(body: dict[str, Any], model: str) -> Request:
    texts = body.get("input")
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise ValidationError("input: a string or a non-empty list of strings (token ids are not supported)")
    fmt = body.get("encoding_format")
    fmt = "float" if fmt is None else fmt
    if not isinstance(fmt, str) or fmt not in ("float", "base64"):
        raise ValidationError("encoding_format: \"float\" or \"base64\"")
    if body.get("dimensions") is not None:
        raise ValidationError("dimensions: not supported (each model has its own size; see GET /v1/models)")
    return Request(EMBEDDINGS, model, [EmbeddingTask(texts=texts)], encoding_format=fmt)


# --- responses ----------------------------------------------------------------------------------

def created_at(job: Job) -> int:
    """OpenAI's `created`: Unix seconds of the (first) job's creation."""
    at = job.created_at if job.created_at.tzinfo else job.created_at.replace(tzinfo=timezone.utc)
    return int(at.timestamp())


def response_id(request: Request, job: Job) -> str:
    """The response's id, made from its (first) job's id, so a job's answer always has the same id."""
    prefix = {CHAT: "chatcmpl-", COMPLETIONS: "cmpl-", EMBEDDINGS: "embd-"}[request.endpoint]
    return prefix + job.id.replace("-", "")


def response_body(request: Request, jobs: list[Job]) -> dict[str, Any]:
    """The response to `request` once its jobs (one per task, in order) have all succeeded."""
    first = jobs[0]
    results = [j.result or {} for j in jobs]
    if request.endpoint == EMBEDDINGS:
        vectors = results[0].get("vectors", [])
        data = [{"object": "embedding", "index": i,
                 "embedding": encode_vector(v) if request.encoding_format == "base64" else v}
                for i, v in enumerate(vectors)]
        tokens = int(results[0].get("tokens", 0))
        return {"object": "list", "data": data, "model": request.model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
    prompt = sum(int(r.get("prompt_tokens", 0)) for r in results)
    completion = sum(int(r.get("tokens", 0)) for r in results)
    usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    base = {"id": response_id(request, first), "created": created_at(first), "model": request.model,
            "system_fingerprint": None}
    if request.endpoint == CHAT:
        r = results[0]
        return {**base, "object": "chat.completion", "usage": usage, "choices": [{
            "index": 0, "message": {"role": "assistant", "content": r.get("text", "")},
            "finish_reason": r.get("finish_reason", "stop"), "logprobs": None}]}
    return {**base, "object": "text_completion", "usage": usage, "choices": [
        {"index": i, "text": r.get("text", ""), "finish_reason": r.get("finish_reason", "stop"), "logprobs": None}
        for i, r in enumerate(results)]}


def encode_vector(vector: list[float]) -> str:
    """OpenAI's base64 encoding of an embedding: little-endian float32s."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


def chunk(request: Request, job: Job, *, delta: dict[str, Any] | None = None, text: str | None = None,
          finish_reason: str | None = None, usage: dict[str, int] | None = None, index: int = 0) -> dict[str, Any]:
    """One streamed chunk (chat: `delta`; completions: `text`); `usage` alone: the last, choices empty."""
    base = {"id": response_id(request, job), "created": created_at(job), "model": request.model,
            "system_fingerprint": None}
    if request.endpoint == CHAT:
        base["object"] = "chat.completion.chunk"
        choice = {"index": index, "delta": delta or {}, "finish_reason": finish_reason, "logprobs": None}
    else:
        base["object"] = "text_completion"
        choice = {"index": index, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
    if usage is not None:
        return {**base, "choices": [], "usage": usage}
    return {**base, "choices": [choice]}


def now_unix() -> int:
    return int(datetime.now(timezone.utc).timestamp())
