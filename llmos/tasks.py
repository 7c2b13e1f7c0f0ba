"""Task types: one typed request and one typed result per kind of NLP job.

A request is validated here, in the producer, before anything is written or queued; the
worker's runner for that task type turns a batch of requests into results of `result_type`.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, ClassVar, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from llmos.constants import (MAX_CHAT_MESSAGES, MAX_CONVERSATION_ID_CHARS, MAX_EMBED_TEXTS, MAX_SEED,
                             MAX_STOP_STRINGS)
from llmos.db import UNSTORABLE
from llmos.errors import ValidationError


def _storable(value: Any) -> Any:
    """Refuse text the task table cannot store (Postgres rejects NUL and lone surrogates)."""
    if isinstance(value, str):
        bad = UNSTORABLE.search(value)
        if bad:
            raise ValueError(f"contains U+{ord(bad.group()):04X} at position {bad.start()}, "
                             "which cannot be stored (NUL and lone surrogates are not allowed)")
    return value


Storable = pydantic.BeforeValidator(_storable)
Text = Annotated[str, StringConstraints(strict=True, min_length=1), Storable]


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty or only whitespace")
    return value


NonBlank = Annotated[Text, pydantic.AfterValidator(_not_blank)]
StopString = Text
"""A stop string: any non-empty text, whitespace included ("\\n" is the commonest one)."""


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


Count = Annotated[int, Field(strict=True, ge=1, le=4096)]
Temperature = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0.0, le=2.0)]
TopP = Annotated[float, Field(strict=True, allow_inf_nan=False, gt=0.0, le=1.0)]
Seed = Annotated[int, Field(strict=True, ge=0, le=MAX_SEED)]


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
    tokens: int = 0  # input tokens the model read, over every text (OpenAI's usage)


class EmbeddingTask(Task):
    """Embed one or more texts into normalised vectors."""

    task_type: ClassVar[str] = "embed"
    result_type: ClassVar[type[TaskResult]] = EmbeddingResult
    texts: Annotated[list[NonBlank], Field(min_length=1, max_length=MAX_EMBED_TEXTS)]

    def texts_for_limit(self) -> list[str]:
        return list(self.texts)


class WritingResult(TaskResult):
    text: str
    tokens: int
    prompt_tokens: int = 0
    truncated: bool = False  # the prompt was trimmed on the left to fit the context window
    finish_reason: str = "length"  # "stop" (EOS or a stop sequence) or "length"


class WritingTask(Task):
    """Continue a prompt. `max_length` (the seed's name) and `max_new_tokens` both cap new tokens."""

    task_type: ClassVar[str] = "writing"
    result_type: ClassVar[type[TaskResult]] = WritingResult
    prompt: NonBlank
    max_length: Count | None = None
    max_new_tokens: Count | None = None
    temperature: Temperature = 0.0
    top_p: TopP = 1.0
    stop: Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] = Field(default_factory=list)
    seed: Seed | None = None

    def new_tokens(self, default: int) -> int:
        return self.max_new_tokens or self.max_length or default

    def texts_for_limit(self) -> list[str]:
        return [self.prompt, *self.stop]


class DialogueResult(TaskResult):
    response: str
    conversation_id: str
    history_turns: int = 0  # earlier turns that fit in the prompt
    truncated: bool = False  # older turns (or the utterance itself) were dropped to fit
    prompt: str | None = None  # the text the model was given, for inspection


class DialogueTask(Task):
    """One user turn of a conversation; the same `conversation_id` continues it."""

    task_type: ClassVar[str] = "dialogue"
    result_type: ClassVar[type[TaskResult]] = DialogueResult
    user_utterance: NonBlank
    conversation_id: Annotated[str, StringConstraints(strict=True, min_length=1,
                                                      max_length=MAX_CONVERSATION_ID_CHARS,
                                                      pattern=r"^[A-Za-z0-9_.:-]+$"), Storable] | None = None
    system: NonBlank | None = None
    max_new_tokens: Count | None = None
    temperature: Temperature = 0.0
    top_p: TopP = 1.0
    seed: Seed | None = None

    def texts_for_limit(self) -> list[str]:
        return [self.user_utterance] + ([self.system] if self.system else [])


ChatRole = Literal["system", "user", "assistant"]
AnyText = Annotated[str, StringConstraints(strict=True), Storable]  # may be empty (an assistant turn)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    role: ChatRole
    content: AnyText


class ChatTask(Task):
    """The next assistant turn of a whole conversation given as messages (OpenAI's chat shape).

    Unlike `dialogue`, nothing is kept between jobs: every job carries the conversation so far.
    The worker renders the messages with the model's chat template, or, for a model without
    one, as plain lines (docs/openai.md)."""

    task_type: ClassVar[str] = "chat"
    result_type: ClassVar[type[TaskResult]] = WritingResult
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_CHAT_MESSAGES)]
    max_new_tokens: Count | None = None
    temperature: Temperature = 0.0
    top_p: TopP = 1.0
    stop: Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] = Field(default_factory=list)
    seed: Seed | None = None

    @pydantic.model_validator(mode="after")
    def _something_to_answer(self) -> "ChatTask":
        if not any(m.content.strip() for m in self.messages):
            raise ValueError("every message is empty: give at least one with content")
        return self

    def new_tokens(self, default: int) -> int:
        return self.max_new_tokens or default

    def texts_for_limit(self) -> list[str]:
        return [m.content for m in self.messages] + list(self.stop)


class SummarizationResult(TaskResult):
    summary: str
    truncated: bool = False  # the model read only part of the input (cut to its window)


DEFAULT_SUMMARY_RATIO = 1 / 3  # without max_sentences or ratio: about a third of the sentences ...
DEFAULT_MAX_SENTENCES = 5  # ... and at most five
Ratio = Annotated[float, Field(strict=True, allow_inf_nan=False, gt=0.0, lt=1.0)]


class SummarizationTask(Task):
    """Summarize a text in `max_sentences` or `ratio` of its sentences (default: a third, 1 to 5)."""

    task_type: ClassVar[str] = "summarize"
    result_type: ClassVar[type[TaskResult]] = SummarizationResult
    text: NonBlank
    max_sentences: Annotated[int, Field(strict=True, ge=1, le=4096)] | None = None
    ratio: Ratio | None = None
    max_length: Count = 128
    min_length: Annotated[int, Field(strict=True, ge=0, le=4096)] = 0

    @pydantic.model_validator(mode="after")
    def _lengths(self) -> "SummarizationTask":
        if self.min_length > self.max_length:
            raise ValueError(f"min_length {self.min_length} is over max_length {self.max_length}")
        if self.max_sentences is not None and self.ratio is not None:
            raise ValueError("give max_sentences or ratio, not both")
        return self

    def sentences_to_keep(self, n: int) -> int:
        """How many of a text's n sentences its summary keeps: fewer than n unless n is 1 or max_sentences >= n."""
        if self.max_sentences is not None:
            return min(n, self.max_sentences)
        keep = math.ceil((self.ratio or DEFAULT_SUMMARY_RATIO) * n - 1e-9)
        if self.ratio is None:
            keep = min(keep, DEFAULT_MAX_SENTENCES)
        return max(1, min(keep, n - 1))

    def fraction(self, n: int) -> float:
        """The share of a text's n sentences kept (abstractive runners size their output in tokens by it)."""
        return self.sentences_to_keep(n) / n if n > 1 else 1.0

    def texts_for_limit(self) -> list[str]:
        return [self.text]


Lang = Annotated[str, StringConstraints(strict=True, min_length=2, max_length=16,
                                        pattern=r"^[A-Za-z]{2,3}([_-][A-Za-z0-9]{2,8})?$"), Storable]


class TranslationResult(TaskResult):
    translation: str
    truncated: bool = False


class TranslationTask(Task):
    """Translate a text from `source_lang` to `target_lang` (ISO codes such as en, de, zh)."""

    task_type: ClassVar[str] = "translate"
    result_type: ClassVar[type[TaskResult]] = TranslationResult
    text: NonBlank
    source_lang: Lang
    target_lang: Lang

    def texts_for_limit(self) -> list[str]:
        return [self.text]


class QuestionAnsweringResult(TaskResult):
    answer: str
    score: float
    start: int  # character offsets of the answer in the context
    end: int


class QuestionAnsweringTask(Task):
    """Find the answer to `question` as a span of `context` (extractive)."""

    task_type: ClassVar[str] = "qa"
    result_type: ClassVar[type[TaskResult]] = QuestionAnsweringResult
    question: NonBlank
    context: NonBlank

    def texts_for_limit(self) -> list[str]:
        return [self.question, self.context]


TASK_TYPES: dict[str, type[Task]] = {
    cls.task_type: cls
    for cls in (WritingTask, ChatTask, DialogueTask, SummarizationTask, TranslationTask, QuestionAnsweringTask,
                SentimentTask, EmbeddingTask)
}
"""Every task type by its name, as stored in the task table's `task_type` column."""


PRIMARY_FIELD = {"writing": "prompt", "dialogue": "user_utterance", "summarize": "text",
                 "translate": "text", "qa": "question", "sentiment": "text", "embed": "texts"}
"""Which field of each task one plain text fills: `llmos submit`'s TEXT, a plain batch line's
`text` (a list of one for `embed`). `chat` has none: its input is a list of messages."""


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
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise ValidationError(f"invalid {task_type} task: expected an object with field names, "
                              f"got {type(data).__name__}")
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
