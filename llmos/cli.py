"""The `llmos` command: up, demo, worker, submit, job, cancel, prune, db, models, flower, ….

LLMOS errors and usage errors print on stderr with exit code 2, never a traceback. `--json`
prints one line of JSON on stdout; times are ISO 8601 with their UTC offset.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import warnings
from datetime import datetime
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from llmos.api.cli import api_command, keys_app
from llmos.batches.cli import batch_app
from llmos.errors import LLMOSError, NoWorkerWarning
from llmos.monitoring.flower import flower_command
from llmos.nightly.cli import beat_command
from llmos.scheduling.cli import capacity_command, plan_command
from llmos.settings import get_settings
from llmos.supervise import supervise_command
from llmos.tasks import PRIMARY_FIELD

# plain help: typer's rich help labels every flag, --help too, `<bool>`
app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="LLMOS: NLP jobs on language models.")
db_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="The task table's schema.")
models_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="The model registry.")
app.add_typer(db_app, name="db")
app.add_typer(models_app, name="models")
app.command("api")(api_command)
app.command("beat")(beat_command)
app.command("capacity")(capacity_command)
app.command("flower")(flower_command)
app.command("plan")(plan_command)
app.command("supervise")(supervise_command)
app.add_typer(keys_app, name="keys")
app.add_typer(batch_app, name="batch")
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

SAMPLE_FILE = Path(__file__).parent / "data" / "reviews.txt"

JsonOption = Annotated[bool, typer.Option("--json", help="Print one line of JSON (for scripts).")]


def _print_json(data: object, one_line: bool) -> None:
    """`data` as JSON on stdout: one line, or indented for reading."""
    print(json.dumps(data, default=_json_value, indent=None if one_line else 2))


def _json_value(value: object) -> object:
    """Times as ISO 8601 with offset (naive ones were written in UTC), anything else as text."""
    if isinstance(value, datetime):
        from llmos.manager import as_utc

        return as_utc(value).isoformat()
    return str(value)


def _warn(message: str) -> None:
    from rich.markup import escape

    err.print(f"[bold yellow]warning:[/bold yellow] {escape(message)}", highlight=False)


@app.command()
def up(model: Annotated[Optional[list[str]], typer.Option("--model", "-m", help="Model to start a worker for (repeatable); default LLMOS_MODELS.")] = None,
       device: Annotated[Optional[str], typer.Option(help="cpu or cuda:N for the workers.")] = None,
       no_api: Annotated[bool, typer.Option("--no-api", help="Do not start the REST API.")] = False,
       api_port: Annotated[Optional[int], typer.Option(min=1, max=65535, help="Port of the REST API (default LLMOS_API_PORT, 8000).")] = None,
       supervise: Annotated[bool, typer.Option("--supervise", help="Workers as the plan says (`llmos plan`), started and stopped by the supervisor, instead of one per model.")] = False) -> None:
    """Start Redis (embedded unless LLMOS_REDIS_URL), the schema, one worker per model and the REST API; stop on Ctrl-C."""
    from llmos.stack import Stack

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    settings = get_settings()
    stack = Stack(settings, model or None, device, api=not no_api, api_port=api_port, supervise=supervise).start()
    try:
        stack.wait_ready(stop=stop)
        from llmos.reconciler import Reconciler

        reconciler = Reconciler(settings)
        reconciler.start_thread(stop)
        table = Table(title="LLMOS is up", show_header=False)
        for k, v in stack.describe().items():
            table.add_row(k, v)
        out.print(table)
        for line in stack.api_banner():
            out.print(line, highlight=False, markup=False)
        out.print("Submit from another terminal with the same LLMOS_HOME, e.g. "
                  "[bold]llmos submit sentiment \"I love it\"[/bold]. Ctrl-C stops everything.")
        while not stop.wait(1.0):
            for m in stack.supervise_once():
                err.print(f"worker for {m} exited; restarted it")
            for d in stack.supervisor_pass():
                err.print(f"supervisor: {d.line()}", highlight=False, markup=False)
            if stack.supervise_api():
                err.print("the API exited; restarted it")
    finally:
        out.print("stopping…")
        stack.stop()
        out.print("stopped")


@app.command()
def demo(file: Annotated[Path, typer.Option(help="Text file, one document per line.")] = SAMPLE_FILE,
         model: Annotated[str, typer.Option(help="Model to run.")] = "minilm") -> None:
    """Run the main job: every line of a file through sentiment and embed, results printed."""
    from llmos.demo import run_demo

    run_demo(file, model, out)


@app.command()
def reconcile(once: Annotated[bool, typer.Option("--once", help="One pass, print what it did, exit.")] = False,
              interval: Annotated[Optional[float], typer.Option(help="Seconds between passes (default LLMOS_RECONCILE_INTERVAL_S).")] = None) -> None:
    """Re-send lost jobs, requeue jobs of dead workers, expire and time out jobs; loop until stopped."""
    import dataclasses

    from llmos.reconciler import Reconciler

    rec = Reconciler(get_settings())
    if once:
        print(json.dumps(dataclasses.asdict(rec.run_once())))
        rec.close()
        return
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    rec.run_forever(stop, interval)
    rec.close()


@app.command()
def prune(older_than: Annotated[str, typer.Option("--older-than", metavar="AGE", help="Delete what finished (or stopped) longer ago than AGE: a number and s, m, h, d or w, e.g. 30d.")],
          batch_size: Annotated[int, typer.Option(min=1, max=100_000, help="Rows per delete; each batch is its own short transaction.")] = 5000,
          as_json: JsonOption = False) -> None:
    """Delete finished jobs and stopped workers' rows older than AGE, in batches.

    Queued and running jobs stay, and so does every job of a batch that still has one (and any
    job or batch an undelivered webhook waits for). LLMOS_RETENTION_DAYS has the reconciler do
    the same once a day.
    """
    from llmos.db import check_database, get_engine
    from llmos.retention import parse_age, prune_all

    age = parse_age(older_than)
    settings = get_settings()
    check_database(settings.db_url)
    show = None if as_json else (lambda r: err.print(f"… {r.jobs:,} jobs and {r.workers:,} worker rows deleted so far", highlight=False))
    report = prune_all(get_engine(settings.db_url), age, batch_size=batch_size, progress=show)
    data = {"jobs": report.jobs, "workers": report.workers, "deliveries": report.deliveries, "kept": report.kept,
            "cutoff": report.cutoff}
    if as_json:
        _print_json(data, True)
        return
    kept = f"; kept {report.kept:,} of open batches or awaited by a webhook" if report.kept else ""
    out.print(f"deleted {report.jobs:,} finished jobs, {report.workers:,} worker rows and "
              f"{report.deliveries:,} ended webhook deliveries older than "
              f"{older_than.strip()} (finished before {_json_value(report.cutoff)}){kept}", highlight=False)


@app.command()
def worker(model: Annotated[str, typer.Option("--model", "-m", help="Registered model name.")],
           device: Annotated[Optional[str], typer.Option(help="cpu or cuda:N (default: the model's entry).")] = None,
           concurrency: Annotated[Optional[int], typer.Option(help="Messages held at once (default: 2 × max_batch_size).")] = None) -> None:
    """Run one worker: load MODEL once and serve its queue until SIGTERM."""
    from workers.worker import main as worker_main

    raise typer.Exit(worker_main(model, device, concurrency))


@app.command()
def submit(task: Annotated[str, typer.Argument(metavar="TASK", help="Task type: " + ", ".join(PRIMARY_FIELD) + ".")],
           texts: Annotated[list[str], typer.Argument(metavar="TEXT", help="The text (prompt, utterance, question; several for embed).")],
           model: Annotated[str, typer.Option("--model", "-m", metavar="NAME", help="Registered model name.")] = "minilm",
           set_: Annotated[Optional[list[str]], typer.Option("--set", metavar="KEY=VALUE", help="Other task fields (JSON values allowed), e.g. --set target_lang=de; repeatable.")] = None,
           priority: Annotated[str, typer.Option(metavar="PRIORITY", help="0–9 or critical/high/normal/low/batch.")] = "normal",
           wait: Annotated[bool, typer.Option(help="Wait for the result and print it.")] = True,
           timeout: Annotated[float, typer.Option(metavar="SECONDS", help="Seconds to wait.")] = 120.0,
           as_json: JsonOption = False) -> None:
    """Submit one job and print its result (or its id with --no-wait) as JSON.

    Warns on stderr when no live worker serves the model (the job then waits queued). With
    --json a job that fails or is not done in time is printed too: id, status, error.
    """
    import llmos

    from llmos.errors import JobFailedError, JobTimeoutError, ValidationError
    from llmos.tasks import parse_task

    field = PRIMARY_FIELD.get(task)
    data: dict = {field: texts if task == "embed" else " ".join(texts)} if field else {}
    for item in set_ or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValidationError(f"--set takes key=value, got {item!r}")
        data[key] = _set_value(key, value)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", NoWorkerWarning)
        handle = llmos.load_model(model).submit(parse_task(task, data), priority=priority)
    for w in caught:
        _warn(f"{w.message}; job {handle.id} waits queued until one starts")
    if not wait:
        _print_json({"id": handle.id, "status": "queued"}, True)
        return
    try:
        result = handle.result(timeout=timeout)
    except (JobFailedError, JobTimeoutError) as exc:
        if as_json:
            _print_json({"id": handle.id, "status": handle.status().value, "error": str(exc)}, True)
        raise
    _print_json({"id": handle.id, "status": "succeeded", "result": result.model_dump(mode="json")}, True)


def _set_value(key: str, text: str) -> object:
    """A `--set` value: JSON if it parses (nested at most MAX_CLI_JSON_DEPTH deep), else the text."""
    from llmos.constants import MAX_CLI_JSON_DEPTH
    from llmos.errors import ValidationError

    try:
        value = json.loads(text)
        too_deep = _depth(value) > MAX_CLI_JSON_DEPTH
    except json.JSONDecodeError:
        return text
    except RecursionError:  # json's parser gives up near a thousand levels
        too_deep = True
    if too_deep:
        raise ValidationError(f"--set {key}: the JSON value is nested more than {MAX_CLI_JSON_DEPTH} levels deep")
    return value


def _depth(value: object) -> int:
    """How deeply lists and objects nest in a parsed JSON value (iterative: no recursion limit)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            deepest = max(deepest, depth)
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


@app.command()
def job(job_id: Annotated[str, typer.Argument(metavar="JOB_ID", help="The id submit printed.")],
        as_json: JsonOption = False) -> None:
    """Print a job's row as JSON (durations in ms, to 0.1 ms)."""
    import dataclasses

    from llmos.jobs import JobStatus
    from llmos.sdk import default_client, no_worker_message

    client = default_client()
    found = client.job(job_id)
    row = dataclasses.asdict(found)
    for key in ("queue_wait_ms", "compute_ms"):
        if row[key] is not None:
            row[key] = round(row[key], 1)
    from llmos.scheduling.eta import eta_vs_actual

    row["eta_vs_actual"] = eta_vs_actual(found)  # predicted start/finish against what happened
    _print_json(row, as_json)
    if found.status == JobStatus.QUEUED and not client.has_worker(found.model):
        _warn(f"{no_worker_message(found.model)}; the job waits queued until one starts")


@app.command()
def cancel(job_id: Annotated[str, typer.Argument(metavar="JOB_ID", help="The id submit printed.")],
           as_json: JsonOption = False) -> None:
    """Cancel a queued or running job; says why and exits 1 if it had already ended."""
    from llmos.sdk import default_client

    client = default_client()
    if client.cancel(job_id):
        if as_json:
            _print_json({"id": job_id, "cancelled": True}, True)
        else:
            out.print(f"cancelled job {job_id}", highlight=False)
        return
    ended = client.job(job_id)
    when = _json_value(ended.finished_at) if ended.finished_at else "an unknown time"
    reason = f"already {ended.status.value} at {when}"
    if as_json:
        _print_json({"id": ended.id, "cancelled": False, "status": ended.status.value, "reason": reason}, True)
    err.print(f"job {ended.id} not cancelled: {reason}", highlight=False)
    raise typer.Exit(1)


@app.command()
def retry(job_id: Annotated[str, typer.Argument(metavar="JOB_ID", help="The id of a failed job.")],
          as_json: JsonOption = False) -> None:
    """Run a failed job again: queued and sent anew, with its attempt budget again (an error if it is not failed)."""
    from llmos.sdk import default_client

    job = default_client().retry(job_id)
    if as_json:
        _print_json({"id": job.id, "status": job.status.value, "attempts": job.attempts,
                     "max_attempts": job.max_attempts}, True)
        return
    out.print(f"job {job.id} queued again (up to {job.max_attempts - job.attempts} more attempt(s))", highlight=False)


@db_app.command("upgrade")
def db_upgrade(revision: str = "head") -> None:
    """Apply migrations to the task table's database."""
    from llmos import migrate

    settings = get_settings()
    migrate.upgrade(settings.db_url, revision)
    from llmos.settings import redact

    out.print(f"database {redact(settings.db_url)} at {revision}")


@db_app.command("downgrade")
def db_downgrade(revision: str = "base") -> None:
    """Revert migrations (default: drop everything)."""
    from llmos import migrate

    migrate.downgrade(get_settings().db_url, revision)


def _loaded_on(settings) -> dict[str, list[str]]:
    """Live workers per model ("where loaded now"); empty if the database cannot be read."""
    from llmos import manager
    from llmos.db import get_engine

    try:
        rows = manager.live_workers(get_engine(settings.db_url))
    except Exception:
        return {}
    where: dict[str, list[str]] = {}
    for w in rows:
        where.setdefault(w["model"], []).append(f"{w['device']}@{w['host']}:{w['pid']}")
    return where


def _model_data(spec, loaded: dict[str, list[str]]) -> dict:
    """One registry entry as `models show` prints it: the entry, its memory need, its workers."""
    data = spec.model_dump(mode="json")
    data["memory_need_mb"] = spec.memory_need_mb()
    data["loaded_on"] = loaded.get(spec.name, [])
    return data


@models_app.command("list")
def models_list(as_json: JsonOption = False) -> None:
    """List every registered model: built-in and configured."""
    from llmos.registry import Registry

    settings = get_settings()
    loaded = _loaded_on(settings)
    specs = Registry.load(settings).all()
    if as_json:
        _print_json([_model_data(spec, loaded) for spec in specs], True)
        return
    # names are never cut: the name column keeps its width, the others fold
    table = Table()
    table.add_column("name", no_wrap=True, min_width=max(len(s.name) for s in specs))
    for header in ("engine", "kind", "tasks", "source", "memory MB", "loaded on"):
        table.add_column(header, overflow="fold")
    for spec in specs:
        mem = spec.memory_need_mb()
        table.add_row(spec.name, spec.engine, spec.kind if spec.engine == "transformers" else "-",
                      ", ".join(spec.tasks), spec.source or "(not configured)",
                      f"{mem:.0f}" if mem else "-", ", ".join(loaded.get(spec.name, [])) or "-")
    out.print(table)


@models_app.command("show")
def models_show(name: Annotated[str, typer.Argument(metavar="NAME", help="Registered model name.")],
                as_json: JsonOption = False) -> None:
    """Print one model's registry entry, memory need and workers as JSON."""
    from llmos.registry import Registry

    settings = get_settings()
    _print_json(_model_data(Registry.load(settings).get(name), _loaded_on(settings)), as_json)


@models_app.command("pull")
def models_pull(name: str) -> None:
    """Download a hub model's files into the local cache (needs network)."""
    from llmos.registry import Registry, pull

    path = pull(Registry.load(get_settings()).get(name))
    out.print(f"{name}: files in {path}")


try:  # newer typer carries its own copy of click, whose errors derive from TyperException
    USAGE_ERRORS: tuple[type[Exception], ...] = (typer.TyperException,)
except AttributeError:
    import click

    USAGE_ERRORS = (click.ClickException,)


def _context_of(argv: list[str]) -> typer.Context:
    """A context for the (sub)command `argv` names, for a usage error raised without one."""
    command, path = typer.main.get_command(app), ["llmos"]
    for token in argv:
        sub = getattr(command, "commands", {}).get(token)
        if sub is None:
            break
        command, path = sub, [*path, token]
    return typer.Context(command, info_name=" ".join(path))


def main(argv: list[str] | None = None) -> None:
    from llmos.logs import setup

    setup()
    try:
        code = app(args=argv, prog_name="llmos", standalone_mode=False)  # a typer.Exit's code, or None
    except LLMOSError as exc:
        from rich.markup import escape

        line = " ".join(str(exc).split())  # one line, whatever the message holds
        err.print(f"[bold red]error:[/bold red] {escape(line)}", highlight=False)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        sys.exit(130)
    except USAGE_ERRORS as exc:  # the usage line and the problem, exit 2 (no traceback)
        if getattr(exc, "ctx", False) is None:  # e.g. an option without its value
            exc.ctx = _context_of(sys.argv[1:] if argv is None else argv)
        exc.show()
        sys.exit(exc.exit_code)
    sys.exit(code)


if __name__ == "__main__":
    main()
