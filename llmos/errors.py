"""LLMOS's errors: one root, one subclass per thing a user can get wrong or run into.

Each class's docstring is its default message. Errors about configuration say how to fix it.
"""

from __future__ import annotations


class LLMOSError(Exception):
    """Something went wrong in LLMOS."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class ValidationError(LLMOSError, ValueError):
    """The task is not valid; nothing was written or queued."""


class IdempotencyConflictError(ValidationError):
    """The idempotency key already names a job of another model, task or input; nothing was written."""


class UnknownModelError(LLMOSError, LookupError):
    """No model of that name is registered."""


class UnsupportedTaskError(LLMOSError, ValueError):
    """The model cannot run that kind of task."""


class BrokerUnavailableError(LLMOSError, ConnectionError):
    """Redis (the broker) cannot be reached."""


class DatabaseUnavailableError(LLMOSError, ConnectionError):
    """The task table's database cannot be reached."""


class JobNotFoundError(LLMOSError, LookupError):
    """No job with that id exists."""


class JobFailedError(LLMOSError):
    """The job ended without a result."""

    def __init__(self, message: str | None = None, *, job_id: str | None = None,
                 status: str | None = None) -> None:
        super().__init__(message)
        self.job_id = job_id
        self.status = status


class JobTimeoutError(LLMOSError, TimeoutError):
    """The job did not finish within the time waited; it may still run."""


class NoWorkerError(LLMOSError):
    """No live worker serves the model; the job stays queued. Start one with `llmos worker --model NAME` (or `llmos up -m NAME`)."""


class NoWorkerWarning(UserWarning):
    """No live worker serves the model: the job waits queued until one starts."""


class ConfigError(LLMOSError):
    """The LLMOS configuration is invalid."""


# The API's answers that its client raises too (llmos.remote): defined here, not in llmos.api,
# so an HTTP client never imports the server (llmos.api.errors re-exports them).


class AuthError(LLMOSError):
    """A valid API key is required: send `Authorization: Bearer <key>`."""


class ForbiddenError(LLMOSError):
    """This route needs an admin key."""


class JobFinalError(LLMOSError):
    """The job has already ended; only queued or running jobs can be cancelled."""

    def __init__(self, message: str | None = None, *, status: str) -> None:
        super().__init__(message)
        self.status = status


class JobStateError(LLMOSError):
    """The job is not in a state this action applies to (only a failed job can be retried)."""

    def __init__(self, message: str | None = None, *, status: str) -> None:
        super().__init__(message)
        self.status = status


class QuotaExceededError(LLMOSError):
    """The tenant is over a quota; retry after the time given."""

    def __init__(self, message: str | None = None, *, limit: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.limit = limit
        self.retry_after_s = retry_after_s


# Admission at submit (llmos.scheduling.eta): refusals are ValidationErrors (nothing was written;
# the API answers 422).


class DeadlineUnmeetableError(ValidationError):
    """The job's predicted start is past its deadline; nothing was written."""

    def __init__(self, message: str | None = None, *, eta_start_s: float | None = None,
                 deadline_in_s: float | None = None) -> None:
        super().__init__(message)
        self.eta_start_s = eta_start_s
        self.deadline_in_s = deadline_in_s


class DeadlineUnmeetableWarning(UserWarning):
    """The job's predicted start is past its deadline; it was accepted (LLMOS_DEADLINE_ADMISSION=warn)."""


class ModelTooLargeError(ValidationError):
    """The model needs more memory than the largest device has; nothing was written."""
