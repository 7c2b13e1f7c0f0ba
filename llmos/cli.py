"""The `llmos` command: up, demo, worker, submit, job, cancel, db, models.

LLMOS errors print as one line on stderr with exit code 2, never a traceback.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from llmos.errors import LLMOSError
from llmos.settings import get_settings

app = typer.Typer(add_completion=False, no_args_is_help=True, help="LLMOS: NLP jobs on language models.")
db_app = typer.Typer(no_args_is_help=True, help="The task table's schema.")
models_app = typer.Typer(no_args_is_help=True, help="The model registry.")
app.add_typer(db_app, name="db")
app.add_typer(models_app, name="models")
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

SAMPLE_FILE = Path(__file__).parent / "data" / "reviews.txt"


@app.command()
def up(model: Annotated[Optional[list[str]], typer.Option("--model", "-m", help="Model to start a worker for (repeatable); default LLMOS_MODELS.")] = None,
       device: Annotated[Optional[str], typer.Option(help="cpu or cuda:N for the workers.")] = None) -> None:
    """Start Redis (embedded unless LLMOS_REDIS_URL), the schema and one worker per model; stop on Ctrl-C."""
    from llmos.stack import Stack

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    settings = get_settings()
    stack = Stack(settings, model or None, device).start()
    try:
        stack.wait_ready(stop=stop)
        from llmos.reconciler import Reconciler

        reconciler = Reconciler(settings)
        reconciler.start_thread(stop)
        table = Table(title="LLMOS is up", show_header=False)
        for k, v in stack.describe().items():
            table.add_row(k, v)
        out.print(table)
        out.print("Submit from another terminal with the same LLMOS_HOME, e.g. "
                  "[bold]llmos submit sentiment \"I love it\"[/bold]. Ctrl-C stops everything.")
        while not stop.wait(1.0):
            for m in stack.supervise_once():
                err.print(f"worker for {m} exited; restarted it")
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
def worker(model: Annotated[str, typer.Option("--model", "-m", help="Registered model name.")],
           device: Annotated[Optional[str], typer.Option(help="cpu or cuda:N (default: the model's entry).")] = None,
           concurrency: Annotated[Optional[int], typer.Option(help="Messages held at once (default: 2 × max_batch_size).")] = None) -> None:
    """Run one worker: load MODEL once and serve its queue until SIGTERM."""
    from workers.worker import main as worker_main

    raise typer.Exit(worker_main(model, device, concurrency))


PRIMARY_FIELD = {"writing": "prompt", "dialogue": "user_utterance", "summarize": "text",
                 "translate": "text", "qa": "question", "sentiment": "text", "embed": "texts"}
"""Which field of each task the positional TEXT argument fills."""


@app.command()
def submit(task: Annotated[str, typer.Argument(help="Task type: " + ", ".join(PRIMARY_FIELD) + ".")],
           texts: Annotated[list[str], typer.Argument(help="The text (prompt, utterance, question; several for embed).")],
           model: Annotated[str, typer.Option("--model", "-m")] = "minilm",
           set_: Annotated[Optional[list[str]], typer.Option("--set", help="Other task fields, key=value (JSON values allowed), e.g. --set target_lang=de.")] = None,
           priority: Annotated[str, typer.Option(help="0–9 or critical/high/normal/low/batch.")] = "normal",
           wait: Annotated[bool, typer.Option(help="Wait for the result and print it.")] = True,
           timeout: Annotated[float, typer.Option(help="Seconds to wait.")] = 120.0) -> None:
    """Submit one job and print its result (or its id with --no-wait) as JSON."""
    import llmos

    from llmos.errors import ValidationError
    from llmos.tasks import parse_task

    field = PRIMARY_FIELD.get(task)
    data: dict = {field: texts if task == "embed" else " ".join(texts)} if field else {}
    for item in set_ or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValidationError(f"--set takes key=value, got {item!r}")
        data[key] = _set_value(key, value)
    handle = llmos.load_model(model).submit(parse_task(task, data), priority=priority)
    if not wait:
        print(json.dumps({"id": handle.id, "status": "queued"}))
        return
    result = handle.result(timeout=timeout)
    print(json.dumps({"id": handle.id, "status": "succeeded", "result": result.model_dump(mode="json")}))


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
def job(job_id: str) -> None:
    """Print a job's row as JSON."""
    import dataclasses

    from llmos.sdk import default_client

    row = dataclasses.asdict(default_client().job(job_id))
    print(json.dumps(row, default=str, indent=2))


@app.command()
def cancel(job_id: str) -> None:
    """Cancel a queued job."""
    from llmos.sdk import default_client

    done = default_client().cancel(job_id)
    print(json.dumps({"id": job_id, "cancelled": done}))


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


@models_app.command("list")
def models_list() -> None:
    """List every registered model: built-in and configured."""
    from llmos.registry import Registry

    settings = get_settings()
    loaded = _loaded_on(settings)
    table = Table("name", "engine", "kind", "tasks", "source", "memory MB", "loaded on")
    for spec in Registry.load(settings).all():
        mem = spec.memory_need_mb()
        table.add_row(spec.name, spec.engine, spec.kind if spec.engine == "transformers" else "-",
                      ", ".join(spec.tasks), spec.source or "(not configured)",
                      f"{mem:.0f}" if mem else "-", ", ".join(loaded.get(spec.name, [])) or "-")
    out.print(table)


@models_app.command("show")
def models_show(name: str) -> None:
    """Print one model's registry entry, memory need and workers as JSON."""
    from llmos.registry import Registry

    settings = get_settings()
    spec = Registry.load(settings).get(name)
    data = spec.model_dump(mode="json")
    data["memory_need_mb"] = spec.memory_need_mb()
    data["loaded_on"] = _loaded_on(settings).get(name, [])
    print(json.dumps(data, indent=2))


@models_app.command("pull")
def models_pull(name: str) -> None:
    """Download a hub model's files into the local cache (needs network)."""
    from llmos.registry import Registry, pull

    path = pull(Registry.load(get_settings()).get(name))
    out.print(f"{name}: files in {path}")


def main(argv: list[str] | None = None) -> None:
    from llmos.logs import setup

    setup()
    try:
        app(args=argv, standalone_mode=False)
    except LLMOSError as exc:
        from rich.markup import escape

        line = " ".join(str(exc).split())  # one line, whatever the message holds
        err.print(f"[bold red]error:[/bold red] {escape(line)}", highlight=False)
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        sys.exit(130)
    except Exception as exc:  # click usage errors
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
