"""Structured logs: every line is `action=<what> key=value ...`, with the job id where there is one."""

from __future__ import annotations

import logging
import os
import sys


def setup(level: str | None = None) -> None:
    """Configure root logging for an LLMOS process once (stderr, one line per event)."""
    root = logging.getLogger()
    if getattr(root, "_llmos_configured", False):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root.addHandler(handler)
    root.setLevel((level or os.environ.get("LLMOS_LOG_LEVEL") or "WARNING").upper())
    root._llmos_configured = True  # type: ignore[attr-defined]


def event(logger: logging.Logger, action: str, level: int = logging.INFO, **fields: object) -> None:
    if logger.isEnabledFor(level):
        kv = " ".join(f"{k}={_fmt(v)}" for k, v in fields.items())
        logger.log(level, "action=%s %s", action, kv)


def _fmt(value: object) -> str:
    text = str(value)
    return f'"{text}"' if (" " in text or not text) else text
