"""`llmos beat`: Celery beat with one entry per [[schedule]], each tick run in the beat process.

Beat's scheduler is `NightlyScheduler`, a `celery.beat.PersistentScheduler` whose `apply_entry`
calls the schedule's tick (`Ticker.tick`) instead of sending a task message: a tick is a few
queries and file reads, plus the submit of a new file's lines (which only writes jobs and
queues their ids for the model's workers), so no Celery worker is needed for the schedule and
nothing else must be deployed for it; the work itself runs on the model workers, at the
schedule's priority. The scheduler never opens a broker connection (no producer, no remote
control). Ticks run one at a time: a long submit delays the next schedule's tick, never
overlaps it, and two ticks of one schedule never run at once.

Cron expressions are read in UTC (Celery's default timezone). Beat's state (when each entry
last ran) is celery's shelve file `LLMOS_HOME/celerybeat-schedule`: after a restart a cron
entry whose time passed while beat was down runs once at start, not once per missed night.
Run one beat per deployment (two would both tick; the batch names keep them from submitting a
file twice, but the results could be written twice).

SIGTERM or Ctrl-C: a tick in progress finishes (its submit is resumable anyway), then beat
saves its state and exits 0.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Any

from celery import Celery
from celery.beat import PersistentScheduler, Service

from llmos.logs import event
from llmos.nightly.config import Schedule, load_schedules
from llmos.nightly.tick import Ticker
from llmos.settings import Settings

log = logging.getLogger("llmos.nightly")

STATE_FILE = "celerybeat-schedule"
"""Beat's persisted state, under LLMOS_HOME."""

TICK_TASK = "llmos.nightly.tick"
"""The task name of every beat entry (never sent: the scheduler runs the tick itself)."""

MAX_SLEEP_S = 5.0
"""Longest beat sleeps between looks at its schedule (it wakes sooner when an entry is due)."""


class NightlyScheduler(PersistentScheduler):
    """Runs each due entry's tick in this process; `ticker` and `schedules` are set per beat."""

    producer = None  # shadows the broker-connected producer: nothing is ever sent
    ticker: Ticker
    schedules: dict[str, Schedule]
    busy = threading.Event()  # set while a tick runs (SIGTERM then waits for it)

    def install_default_entries(self, data: Any) -> None:
        pass  # no result backend to clean up

    def apply_entry(self, entry: Any, producer: Any = None) -> None:
        schedule = self.schedules.get(entry.name)
        if schedule is None:  # an entry of an older configuration, left in the state file
            return
        self.busy.set()
        try:
            self.ticker.tick(schedule)
        except Exception as exc:  # one tick's failure never stops beat; the next tick tries again
            event(log, "nightly_tick_failed", logging.ERROR, schedule=schedule.name,
                  error=f"{type(exc).__name__}: {exc}"[:500])
        finally:
            self.busy.clear()
            self._do_sync()  # last_run_at on disk at once


def beat_app(schedules: list[Schedule]) -> Celery:
    """A Celery app whose beat_schedule has one entry per schedule (no broker is contacted)."""
    app = Celery("llmos-beat", set_as_current=False)
    app.conf.update(
        timezone="UTC", enable_utc=True, beat_max_loop_interval=MAX_SLEEP_S,
        beat_schedule={s.name: {"task": TICK_TASK, "schedule": s.celery_schedule()} for s in schedules},
    )
    return app


def make_service(settings: Settings, schedules: list[Schedule], ticker: Ticker) -> Service:
    """The beat service: state under LLMOS_HOME, the nightly scheduler, no remote control."""
    home: Path = settings.home_dir
    home.mkdir(parents=True, exist_ok=True)
    scheduler = type("NightlyScheduler", (NightlyScheduler,), {
        "ticker": ticker, "schedules": {s.name: s for s in schedules}, "busy": threading.Event()})
    return Service(beat_app(schedules), max_interval=MAX_SLEEP_S, schedule_filename=str(home / STATE_FILE),
                   scheduler_cls=scheduler, remote_control=False)


def run_beat(settings: Settings) -> int:
    """Check the schedules and the database, then run beat until SIGTERM or Ctrl-C."""
    from llmos.sdk import Client

    schedules = load_schedules(settings)
    if logging.getLogger("llmos.nightly").getEffectiveLevel() > logging.INFO:
        logging.getLogger("llmos.nightly").setLevel(logging.INFO)  # the summary lines are beat's output
    client = Client(settings)
    client.engine  # noqa: B018 -- DatabaseUnavailableError now rather than at the first tick
    service = make_service(settings, schedules, Ticker(client))
    busy = service.scheduler.busy

    def stop(*_: Any) -> None:
        service._is_shutdown.set()  # the loop ends after the current tick or sleep
        if not busy.is_set():
            raise SystemExit(0)  # interrupts the sleep; Service.start saves the state

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    for s in schedules:
        event(log, "nightly_schedule", schedule=s.name, when=s.when(), input_dir=str(s.input_dir),
              pattern=s.pattern, output_dir=str(s.output_dir), task=s.task or "", model=s.model or "",
              priority=s.priority, tenant=s.tenant or "")
    try:
        service.start()
    finally:
        client.close()
    return 0
