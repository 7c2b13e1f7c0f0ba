"""LLMOS: run NLP jobs on language models through Redis priority queues and Celery workers.

    import llmos
    model = llmos.load_model("minilm")
    result = model.execute(llmos.SentimentTask(text="I love it"))
    print(result.label, result.score)
"""

from llmos.errors import (BrokerUnavailableError, ConfigError, DatabaseUnavailableError,
                          JobFailedError, JobNotFoundError, JobTimeoutError, LLMOSError,
                          UnknownModelError, UnsupportedTaskError, ValidationError)
from llmos.jobs import Job, JobStatus
from llmos.sdk import Client, JobHandle, Model, load_model
from llmos.tasks import EmbeddingResult, EmbeddingTask, SentimentResult, SentimentTask

__all__ = [
    "BrokerUnavailableError", "Client", "ConfigError", "DatabaseUnavailableError",
    "EmbeddingResult", "EmbeddingTask", "Job", "JobFailedError", "JobHandle", "JobNotFoundError",
    "JobStatus", "JobTimeoutError", "LLMOSError", "Model", "SentimentResult", "SentimentTask",
    "UnknownModelError", "UnsupportedTaskError", "ValidationError", "load_model",
]
__version__ = "0.1.0"
