"""The Files and Batch API's limits and timings, from the environment (LLMOS_FILES_*, LLMOS_BATCH_*)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class BatchSettings(BaseSettings):
    """Limits default to OpenAI's: 200 MB a file, 50,000 requests a batch file."""

    model_config = SettingsConfigDict(env_prefix="LLMOS_", extra="ignore", frozen=True)

    files_max_bytes: int = Field(default=200_000_000, gt=0,
                                 description="Largest file `POST /v1/files` (or `llmos batch submit`) stores.")
    batch_max_lines: int = Field(default=50_000, gt=0, description="Most non-blank lines of a batch input file.")
    batch_max_line_bytes: int = Field(default=4 * 1024 * 1024, gt=0,
                                      description="Longest line of a batch input file; a longer one is a bad line "
                                                  "(`line_too_long`), never held in memory whole.")
    batch_advance_s: float = Field(default=2.0, gt=0,
                                   description="How often each API process advances open batches.")
    batch_chunk_lines: int = Field(default=2000, gt=0, le=10_000,
                                   description="Lines submitted per SDK submit call while a batch is created.")
    batch_lease_s: float = Field(default=30.0, gt=0,
                                 description="A process submitting a batch's lines or writing its files holds it this long "
                                             "past its last step; after that another process takes over.")


def get_batch_settings() -> BatchSettings:
    return BatchSettings()
