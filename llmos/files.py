"""Files LLMOS keeps under LLMOS_HOME (the embedded SQLite file, Redis's socket and append-only file,
logs) are the user's alone: folders 0700, files 0600, whatever the process umask.

The embedded database holds every job's input and result, so nothing under LLMOS_HOME may be
readable by other users of the machine.
"""

from __future__ import annotations

import os
from pathlib import Path

PRIVATE_UMASK = 0o077
"""The umask of the processes the embedded stack starts (Redis, workers): files 0600, folders 0700."""


def private_dir(path: Path) -> Path:
    """Create `path` (and parents) if needed and make it 0700; returns it."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


def private_file(path: Path) -> None:
    """Make an existing file 0600 (a missing one is left alone)."""
    try:
        os.chmod(path, 0o600)
    except FileNotFoundError:
        pass


def open_private_log(path: Path):
    """Open a log file for appending, created 0600."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.chmod(path, 0o600)
    return os.fdopen(fd, "ab")


def secure_sqlite(url: str) -> None:
    """The SQLite file of `url` and its WAL/shm companions: 0600 (SQLite gives new WAL/shm files the
    database file's mode, so doing it once after creation holds)."""
    if not url.startswith("sqlite:///"):
        return
    db = Path(url[len("sqlite:///"):])
    for p in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
        private_file(p)
