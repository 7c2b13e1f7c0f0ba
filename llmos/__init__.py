"""LLMOS: run NLP jobs on language models through Redis priority queues and Celery workers.

    import llmos
    model = llmos.load_model("minilm")
    result = model.execute(llmos.SentimentTask(text="I love it"))
    print(result.label, result.score)

Over HTTP, the same calls: `client = llmos.connect("http://host:8000", api_key=...)`, then
`client.load_model("minilm")` (or set LLMOS_URL and LLMOS_API_KEY and keep `llmos.load_model`).
"""

from typing import Any

from llmos.errors import (BrokerUnavailableError, ConfigError, DatabaseUnavailableError,
                          IdempotencyConflictError, JobFailedError, JobNotFoundError,
                          JobTimeoutError, LLMOSError, NoWorkerError, NoWorkerWarning,
                          UnknownModelError, UnsupportedTaskError,
                          ValidationError)
from llmos.jobs import Job, JobStatus
from llmos.sdk import Client, JobHandle, Model, load_model
from llmos.remote import APIError, APIUnavailableError, HTTPClient
from llmos.tasks import (DialogueResult, DialogueTask, EmbeddingResult, EmbeddingTask,
                         QuestionAnsweringResult, QuestionAnsweringTask, SentimentResult,
                         SentimentTask, SummarizationResult, SummarizationTask, TranslationResult,
                         TranslationTask, WritingResult, WritingTask)

__all__ = [
    "BrokerUnavailableError", "Client", "ConfigError", "DatabaseUnavailableError",
    "DialogueResult", "DialogueTask", "EmbeddingResult", "EmbeddingTask", "IdempotencyConflictError",
    "Job", "JobFailedError", "JobHandle", "JobNotFoundError", "JobStatus", "JobTimeoutError", "LLMOSError", "Model",
    "NoWorkerError", "NoWorkerWarning",
    "QuestionAnsweringResult", "QuestionAnsweringTask", "SentimentResult", "SentimentTask",
    "SummarizationResult", "SummarizationTask", "TranslationResult", "TranslationTask",
    "UnknownModelError", "UnsupportedTaskError", "ValidationError", "WritingResult", "WritingTask",
    "APIError", "APIUnavailableError", "HTTPClient", "connect", "load_model",
]
__version__ = "0.1.0"


def connect(url: str, api_key: str | None = None, **opts: Any) -> HTTPClient:
    """A client of the LLMOS REST API at `url`, with `llmos.Client`'s surface (see docs/api.md)."""
    return HTTPClient(url, api_key, **opts)
