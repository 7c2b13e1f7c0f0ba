"""One tick of a schedule: new files become batches once, finished batches get their results.

A tick of schedule S over its input folder, for each file matching S's pattern (results files
and hidden files never match):
1. a file that has a results file already is done: nothing is asked of anyone;
2. a file with no batch named `S:<file name>` (in S's tenant) becomes one (`submit_file`), once:
   the name is how the next tick knows (batches are unique by name per tenant), so the same
   file name is never run twice, even with new content (name each night's file apart, e.g. by
   date). A file modified less than `settle_s` ago waits for a later tick (it may still be
   being copied in; writing it under another name and renaming it in is the sure way);
3. a batch that is final (completed, failed, expired, cancelled) gets its results written to
   `<output_dir>/<stem>.results.jsonl` (`write_results` writes a hidden temporary file in that
   folder, then renames it: a results file is always whole, and its presence means done);
4. one summary line is logged: files found, submitted, waiting to settle, running, finished,
   results written, failed lines, errors.

Submitting is resumable (`submit_file` with the same name skips the lines already submitted),
so a submit that failed half-way in this process is done again on the next tick, and on its
first tick after a start beat submits again every file whose batch is not final yet (a beat
killed mid-submit leaves a batch with only part of its lines). One file's error (an unreadable
file, a database that does not answer, a file name that is not UTF-8, any exception at all) is
logged and counted; the other files go on.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

from llmos.db import UNSTORABLE
from llmos.errors import ValidationError
from llmos.logs import event
from llmos.nightly.config import Schedule

log = logging.getLogger("llmos.nightly")

FINAL_STATUSES = frozenset({"completed", "failed", "expired", "cancelled"})
"""Batch states after which nothing more happens to a batch's lines."""

RESULTS_SUFFIX = ".results.jsonl"


@dataclasses.dataclass
class TickSummary:
    """What one tick of one schedule did (the fields of its summary line)."""

    schedule: str
    found: int = 0  # input files matching the pattern
    submitted: int = 0  # new batches made this tick
    resumed: int = 0  # batches submitted again (a failed submit, or not final at beat's start)
    waiting: int = 0  # new files left for a later tick (modified less than settle_s ago)
    running: int = 0  # batches not final yet
    finished: int = 0  # batches found final with no results file yet
    written: int = 0  # results files written
    lines: int = 0  # lines in the results files written
    failed_lines: int = 0  # failed lines of the batches whose results were written
    errors: int = 0  # files whose step failed this tick (logged; tried again next tick)


def batch_name(schedule: Schedule, path: Path) -> str:
    """The batch a schedule makes of an input file: `<schedule name>:<file name>` (ValidationError
    for a file name that is not text a database stores: not UTF-8, or a NUL)."""
    if UNSTORABLE.search(path.name):
        raise ValidationError(f"the file name {path.name!r} is not UTF-8 text; rename the file")
    return f"{schedule.name}:{path.name}"


def results_path(schedule: Schedule, path: Path) -> Path:
    """Where an input file's results go: `<output_dir>/<stem>.results.jsonl`."""
    stem = path.name[:-len(".jsonl")] if path.name.endswith(".jsonl") else path.stem
    return schedule.output_dir / f"{stem}{RESULTS_SUFFIX}"


def input_files(schedule: Schedule) -> list[Path]:
    """The schedule's input files now, in name order (results files and hidden files excluded)."""
    return sorted(p for p in schedule.input_dir.glob(schedule.pattern)
                  if not p.name.startswith(".") and not p.name.endswith(RESULTS_SUFFIX) and p.is_file())


def _count(counts: Any, key: str) -> int:
    value = counts.get(key) if isinstance(counts, dict) else getattr(counts, key, 0)
    return int(value or 0)


class Ticker:
    """Runs ticks of schedules with one client; remembers only which submits to do again."""

    def __init__(self, client: Any, batches: Any = None) -> None:
        """`batches`: the module of batch functions (default llmos.batches; tests give a fake)."""
        if batches is None:
            from llmos import batches
        self.client, self.batches = client, batches
        self._started: set[str] = set()  # schedules that had their first tick in this process
        self._redo: set[tuple[str, Path]] = set()  # (schedule, file) whose submit failed

    def tick(self, schedule: Schedule) -> TickSummary:
        summary = TickSummary(schedule.name)
        first = schedule.name not in self._started
        self._started.add(schedule.name)
        files = input_files(schedule)
        summary.found = len(files)
        for path in files:
            try:
                self._file(schedule, path, summary, first)
            except Exception as exc:  # this file's problem, whatever it is: the others go on
                summary.errors += 1
                event(log, "nightly_file_failed", logging.WARNING, schedule=schedule.name,
                      file=str(path).encode("utf-8", "backslashreplace").decode(),
                      error=f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:300])
        event(log, "nightly_tick", **dataclasses.asdict(summary))
        return summary

    def _file(self, schedule: Schedule, path: Path, summary: TickSummary, first: bool) -> None:
        out = results_path(schedule, path)
        if out.exists():
            return
        b, name, tenant = self.batches, batch_name(schedule, path), schedule.tenant
        info = b.find_batch(self.client, name, tenant=tenant)
        redo = (schedule.name, path) in self._redo
        if info is None or redo or (first and info.status not in FINAL_STATUSES):
            if info is None and time.time() - path.stat().st_mtime < schedule.settle_s:
                summary.waiting += 1
                return
            new = info is None
            self._redo.add((schedule.name, path))  # until the submit returns
            info = b.submit_file(self.client, path, name=name, task=schedule.task, model=schedule.model,
                                 priority=schedule.priority, options=schedule.options or None, tenant=tenant)
            self._redo.discard((schedule.name, path))
            if new:
                summary.submitted += 1
            else:
                summary.resumed += 1
            event(log, "nightly_submitted", schedule=schedule.name, file=str(path), batch=info.id,
                  lines=_count(info.request_counts, "total"), resumed=not new)
        if info.status not in FINAL_STATUSES:  # find_batch advanced its lifecycle already
            summary.running += 1
            return
        summary.finished += 1
        lines = b.write_results(self.client, info.id, out, tenant=tenant)  # a temp file, then renamed
        summary.written += 1
        summary.lines += lines
        summary.failed_lines += _count(info.request_counts, "failed")
        event(log, "nightly_results", schedule=schedule.name, file=str(path), batch=info.id,
              status=info.status, results=str(out), lines=lines,
              failed=_count(info.request_counts, "failed"))
