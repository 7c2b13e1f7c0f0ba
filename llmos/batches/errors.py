"""The errors of files and batches (the API maps each to its status in llmos/api/errors.py)."""

from __future__ import annotations

from llmos.errors import LLMOSError, ValidationError


class FileTooLargeError(ValidationError):
    """The file is over LLMOS_FILES_MAX_BYTES; nothing was kept."""


class FileNotFoundInStoreError(LLMOSError, LookupError):
    """No file with that id (another tenant's file reads the same)."""


class BatchNotFoundError(LLMOSError, LookupError):
    """No batch with that id or name (another tenant's batch reads the same)."""


class BatchStateError(LLMOSError):
    """The batch is not in a state that allows this (results of a batch not final, cancel of a final one)."""

    def __init__(self, message: str | None = None, *, status: str = "") -> None:
        super().__init__(message)
        self.status = status


class FileInUseError(LLMOSError):
    """The file is the input of a batch still open; delete it once the batch is final."""
