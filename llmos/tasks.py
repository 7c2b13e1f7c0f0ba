"""Task types: one typed request and one typed result per kind of NLP job.

A request is validated here, in the producer, before anything is written or queued; the
worker's runner for that task type turns a batch of requests into results of `result_type`.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

import pydantic
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from llmos.errors import ValidationError

Text = Annotated[str, StringConstraints(strict=True, min_length=1), Field()]


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty or only whitespace")
    return value


NonBlank = Annotated[Text, pydantic.AfterValidator(_not_blank)]


class TaskResult(BaseModel):
    """Base of every task's result: plain JSON-ready fields."""

    model_config = ConfigDict(extra="ignore", frozen=True)


class Task(BaseModel):
    """Base of every task request."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task_type: ClassVar[str]
    result_type: ClassVar[type[TaskResult]]

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except pydantic.ValidationError as exc:
            raise ValidationError(f"invalid {self.task_type} task: {_describe(exc)}") from None

    def input_chars(self) -> int:
        """Characters of text in the request, checked against the model's limit."""
        return sum(len(v) for v in self.texts_for_limit())

    def texts_for_limit(self) -> list[str]:
        return []


class SentimentResult(TaskResult):
    label: str
    score: float


class SentimentTask(Task):
    """Classify the sentiment of one text (POSITIVE / NEGATIVE)."""

    task_type: ClassVar[str] = "sentiment"
    result_type: ClassVar[type[TaskResult]] = SentimentResult
    text: NonBlank

    def texts_for_limit(self) -> list[str]:
        return [self.text]


class EmbeddingResult(TaskResult):
    vectors: list[list[float]]
    dim: int


class EmbeddingTask(Task):
    """Embed one or more texts into normalised vectors."""

    task_type: ClassVar[str] = "embed"
    result_type: ClassVar[type[TaskResult]] = EmbeddingResult
    texts: Annotated[list[NonBlank], Field(min_length=1)]

    def texts_for_limit(self) -> list[str]:
        return list(self.texts)


TASK_TYPES: dict[str, type[Task]] = {cls.task_type: cls for cls in (SentimentTask, EmbeddingTask)}
"""Every task type by its name, as stored in the task table's `task_type` column."""


def task_class(task_type: str) -> type[Task]:
    try:
        return TASK_TYPES[task_type]
    except KeyError:
        raise ValidationError(
            f"unknown task type {task_type!r}; known: {', '.join(sorted(TASK_TYPES))}"
        ) from None


def parse_task(task_type: str, data: Any) -> Task:
    """Build and validate a task from JSON-like input, raising LLMOS's ValidationError."""
    cls = task_class(task_type)
    if not isinstance(data, dict):
        raise ValidationError(f"invalid {task_type} task: expected an object, got {type(data).__name__}")
    return cls(**data)  # Task.__init__ turns pydantic's errors into ours


def ensure_task(task: Any) -> Task:
    if not isinstance(task, Task):
        raise ValidationError(
            f"expected a task such as llmos.SentimentTask(text=...), got {type(task).__name__}"
        )
    return task


def _describe(exc: pydantic.ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "input"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)
