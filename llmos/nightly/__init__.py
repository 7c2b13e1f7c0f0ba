"""The nightly schedule: folders of JSONL files turned into batches by Celery beat (`llmos beat`).

This subpackage owns the `[[schedule]]` entries of llmos.toml (`config`: read and checked at
start), one tick of a schedule (`tick`: new files become batches once, finished batches get
their results written beside their input, one summary line logged) and the beat process that
runs the ticks (`beat`: celery.beat.Service with a scheduler that runs each tick in the beat
process itself). It holds no state of its own beyond celery beat's schedule file under
LLMOS_HOME: which file has a batch, and whether that batch is done, is read from the batches
themselves (a batch's name is derived from the schedule's name and the file's name) and from
the results files on disk.

It may import llmos.batches (the batch functions), llmos.sdk (the client they take),
llmos.settings, llmos.registry, llmos.tasks, llmos.priority, llmos.errors, llmos.logs, llmos.db
(its UNSTORABLE) and celery; never llmos.api (the REST API is a peer, not a layer below).
"""

from llmos.nightly.config import Schedule, load_schedules, parse_schedules
from llmos.nightly.tick import TickSummary, Ticker

__all__ = ["Schedule", "TickSummary", "Ticker", "load_schedules", "parse_schedules"]
