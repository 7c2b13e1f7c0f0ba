"""One batch input line → one LLMOS task, or the reason it is refused. Pure: no I/O.

Two formats (docs/batch.md):

- OpenAI batch lines, `{"custom_id", "method": "POST", "url", "body"}`: the body means exactly
  what the same request means at the /v1 endpoint (`llmos.openai_protocol.parse_request`);
- plain lines, `{"id", "text"}`: the text fills the batch task's primary field (`llmos.tasks.PRIMARY_FIELD`),
  the batch's task options the rest.

Either may carry the LLMOS extension fields `priority` (0–5 or a name up to `normal`) and
`deadline` (seconds from the submit, or an ISO 8601 time with offset) at the top level.

Whatever a line holds, parsing it never raises: any error becomes a BadLine.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime, timedelta, timezone
from typing import Any

from llmos import openai_protocol
from llmos.constants import PRIORITY_NAMES
from llmos.db import UNSTORABLE
from llmos.errors import LLMOSError, ValidationError
from llmos.priority import parse_priority
from llmos.registry import Registry
from llmos.sdk import _deadline, validate_for
from llmos.tasks import PRIMARY_FIELD, Task, parse_task

PLAIN = "/v1/jobs"
"""The `endpoint` of a batch of plain lines: each line is one job of the batch's task and model."""

ENDPOINTS = (*openai_protocol.ENDPOINTS, PLAIN)

MAX_CUSTOM_ID_CHARS = 512
MAX_BATCH_PRIORITY = PRIORITY_NAMES["normal"]
"""The highest priority a batch or a batch line may have: batch jobs skip LLMOS_API_MAX_QUEUED_JOBS
and load shedding because they run low, so they may not run above normal."""
EXTENSIONS = ("priority", "deadline")


@dataclasses.dataclass(frozen=True)
class GoodLine:
    """A line that becomes one job."""

    line: int
    custom_id: str
    model: str
    task: Task
    priority: int
    deadline: datetime | None
    encoding_format: str = "float"


@dataclasses.dataclass(frozen=True)
class BadLine:
    """A line refused: its number, its custom_id if one could be read, and why."""

    line: int
    custom_id: str | None
    code: str
    message: str

    def error(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message}


@dataclasses.dataclass(frozen=True)
class BatchShape:
    """What every line of one batch shares: its endpoint, and for plain lines the task, model, options."""

    endpoint: str
    priority: int
    task_type: str | None = None
    model: str | None = None
    options: dict[str, Any] | None = None


def _custom_id(value: Any, field: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValidationError(f"{field}: required, a string (or, in a plain line, an integer)")
    text = str(value)
    if not 1 <= len(text) <= MAX_CUSTOM_ID_CHARS or UNSTORABLE.search(text):
        raise ValidationError(f"{field}: 1–{MAX_CUSTOM_ID_CHARS} characters, no NUL or lone surrogate")
    return text


def error_code(exc: BaseException) -> str:
    """A refused line's error code for the exception that refused it."""
    return {"UnknownModelError": "model_not_found", "UnsupportedTaskError": "unsupported_task",
            "ModelNotFoundError": "model_not_found"}.get(type(exc).__name__, "invalid_request")


def _extensions(data: dict[str, Any], default_priority: int, now: datetime) -> tuple[int, datetime | None]:
    priority = parse_priority(data["priority"]) if data.get("priority") is not None else default_priority
    if priority > MAX_BATCH_PRIORITY:
        raise ValidationError(f"priority: a batch line runs at normal ({MAX_BATCH_PRIORITY}) or lower, got {priority}")
    deadline = data.get("deadline")
    if isinstance(deadline, str):
        try:
            deadline = datetime.fromisoformat(deadline.replace("Z", "+00:00"))
        except ValueError:
            raise ValidationError(f"deadline: an ISO 8601 time with offset, or seconds from now, got {deadline!r}") from None
    at, in_s = _deadline(deadline)
    if in_s is not None:
        at = now + timedelta(seconds=in_s)
    return priority, at


def parse_line(raw: bytes | None, line: int, shape: BatchShape, registry: Registry,
               now: datetime | None = None) -> GoodLine | BadLine:
    """The task of one input line (`line`: its 1-based number), validated against its model.

    `raw` None: the line was over LLMOS_BATCH_MAX_LINE_BYTES (`store.iter_lines` skipped it)."""
    now = now or datetime.now(timezone.utc)
    if raw is None:
        return BadLine(line, None, "line_too_long",
                       f"line {line} is over the limit of a batch line (LLMOS_BATCH_MAX_LINE_BYTES)")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        return BadLine(line, None, "invalid_json", f"line {line} is not valid JSON: {exc}")
    if not isinstance(data, dict):
        return BadLine(line, None, "invalid_json", f"line {line} must be a JSON object")
    id_field = "id" if shape.endpoint == PLAIN else "custom_id"
    custom_id = None
    try:
        custom_id = _custom_id(data.get(id_field), id_field)
        if shape.endpoint == PLAIN:
            return _plain(data, line, custom_id, shape, registry, now)
        return _openai(data, line, custom_id, shape, registry, now)
    except LLMOSError as exc:
        return BadLine(line, custom_id, error_code(exc), " ".join(str(exc).split()))
    except Exception as exc:  # anything else a line's content can provoke (an unhashable value...)
        return BadLine(line, custom_id, "invalid_request",
                       f"line {line} is not a valid request: {type(exc).__name__}: {' '.join(str(exc).split())}"[:1000])


def _openai(data: dict[str, Any], line: int, custom_id: str, shape: BatchShape, registry: Registry,
            now: datetime) -> GoodLine | BadLine:
    unknown = sorted(set(data) - {"custom_id", "method", "url", "body", *EXTENSIONS})
    if unknown:
        raise ValidationError(f"unknown field(s) {', '.join(unknown)}; a line has custom_id, method, url, body "
                              f"(and LLMOS's {', '.join(EXTENSIONS)})")
    if data.get("method", "POST") != "POST":
        raise ValidationError(f"method: only POST, got {data.get('method')!r}")
    url = data.get("url")
    if url != shape.endpoint:
        return BadLine(line, custom_id, "invalid_url",
                       f"url {url!r} is not the batch's endpoint {shape.endpoint!r}")
    request = openai_protocol.parse_request(shape.endpoint, data.get("body"))
    if request.stream:
        raise ValidationError("body.stream: a batch line is not streamed; drop stream")
    if len(request.tasks) != 1:
        raise ValidationError("body.prompt: a batch line takes one prompt; put each prompt on a line of its own")
    task = request.tasks[0]
    validate_for(registry.get(request.model), task)  # checked here; the submit's own check keys a dialogue's id
    priority, deadline = _extensions(data, shape.priority, now)
    return GoodLine(line, custom_id, request.model, task, priority, deadline, request.encoding_format)


def _plain(data: dict[str, Any], line: int, custom_id: str, shape: BatchShape, registry: Registry,
           now: datetime) -> GoodLine:
    unknown = sorted(set(data) - {"id", "text", *EXTENSIONS})
    if unknown:
        raise ValidationError(f"unknown field(s) {', '.join(unknown)}; a plain line has id and text "
                              f"(and LLMOS's {', '.join(EXTENSIONS)})")
    text = data.get("text")
    if not isinstance(text, str):
        raise ValidationError("text: required, a string")
    task_type, model = shape.task_type or "", shape.model or ""
    field = PRIMARY_FIELD.get(task_type)
    if field is None:
        raise ValidationError(f"task {task_type!r} takes no plain lines; one of {', '.join(PRIMARY_FIELD)}")
    fields = {**(shape.options or {}), field: [text] if task_type == "embed" else text}
    task = parse_task(task_type, fields)
    validate_for(registry.get(model), task)
    priority, deadline = _extensions(data, shape.priority, now)
    return GoodLine(line, custom_id, model, task, priority, deadline)


def detect(first_lines: list[bytes]) -> str | None:
    """The endpoint a file's lines name: an OpenAI line's url, PLAIN for `{"id", "text"}` lines
    (None if no line of `first_lines` says: none parses)."""
    for raw in first_lines:
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError, TypeError):
            continue
        if isinstance(data, dict):
            if "custom_id" in data or "body" in data:
                url = data.get("url")
                return url if isinstance(url, str) else openai_protocol.CHAT
            return PLAIN
    return None
