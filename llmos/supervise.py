"""The `llmos supervise` command (registered by llmos/cli.py): a production node's worker processes.

It runs a `llmos.scheduling.supervisor.Supervisor` over `llmos worker` children of this process
(`llmos.stack.SupervisedWorkers`) following `make_plan` for this host (`--host`, default the
hostname, as `[[device]] host = ...` names it), one printed line per decision. SIGTERM or Ctrl-C:
every worker drains (SIGTERM; each finishes the jobs it holds) and the command exits when they
have. `--once`: one pass against the current plan, the windows not waited for, printing what it
would start or stop; nothing is started.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from datetime import datetime
from typing import Annotated, Optional

import typer


def _say(line: str) -> None:
    print(f"{datetime.now().isoformat(timespec='seconds')} {line}", flush=True)


def supervise_command(
        once: Annotated[bool, typer.Option("--once", help="One pass without the windows: print what it would start or stop, start nothing, exit.")] = False,
        host: Annotated[Optional[str], typer.Option(help="The host whose plan to follow (default this hostname).")] = None) -> None:
    """Start and stop this host's workers as the plan says (scale-up delay, scale-down window: LLMOS_SUPERVISOR_*); one line per decision."""
    from llmos.errors import LLMOSError
    from llmos.files import private_dir
    from llmos.logs import setup
    from llmos.scheduling.supervisor import Supervisor, plan_source
    from llmos.settings import get_settings

    settings = get_settings()
    setup(settings.log_level)
    if once:
        class Planned:  # what a pass would start; nothing runs
            def alive(self) -> bool:
                return True

        dry = Supervisor(settings, host=host, plan_source=plan_source(settings),
                         start_worker=lambda model, device: Planned(), stop_worker=lambda h: None,
                         up_delay_s=0, down_window_s=0)
        decisions = dry.tick()
        for d in decisions:
            print(("would " if d.action in ("start", "stop", "evict") else "") + d.line())
        if not decisions:
            print(f"nothing to start on {dry.host}: its plan has no workers")
        raise typer.Exit(1 if any(d.action == "error" for d in decisions) else 0)

    import os

    from llmos.stack import make_supervisor

    log_dir = private_dir(private_dir(settings.home_dir) / "logs")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    sup = make_supervisor(settings, dict(os.environ), log_dir, host=host)
    _say(f"supervising the workers of {sup.host} (up delay {sup.up_delay_s:g} s, down window "
         f"{sup.down_window_s:g} s, every {sup.interval_s:g} s; logs in {log_dir})")
    try:
        sup.run(stop, on_decision=lambda d: _say(d.line()))
    except LLMOSError as exc:
        print(f"error: {exc}", file=sys.stderr)
    finally:
        handles = sup.shutdown()
        _say(f"draining {len(handles)} worker(s)")
        grace = settings.max_job_seconds + settings.timeout_grace_s  # no job may run longer
        deadline = time.monotonic() + grace
        for h in handles:
            h.wait(max(0.0, deadline - time.monotonic()))
        _say("stopped")
