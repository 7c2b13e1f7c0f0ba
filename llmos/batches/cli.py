"""`llmos batch`: submit a JSONL file as a batch, follow it, fetch its results, cancel, list.

On the direct client (the database and Redis of LLMOS_HOME or LLMOS_DATABASE_URL/LLMOS_REDIS_URL)
or over HTTP when LLMOS_URL is set (key: LLMOS_API_KEY), as every `llmos` command. Only
LLMOSErrors reach the user (llmos.cli.main prints them, exit 2); a batch that ends other than
completed exits 1.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from llmos.errors import NoWorkerWarning, ValidationError

batch_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                        help="Batch files: submit, status, results, cancel, list.")
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

POLL_S = 1.0
"""How often `status` and `submit --wait` read the batch."""

PLAIN_LINE_EVERY_S = 10.0
"""Without a terminal, a progress line this often (a live bar needs one)."""

BatchArg = Annotated[str, typer.Argument(metavar="BATCH", help="A batch id (batch_...) or a batch's --name.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one line of JSON (for scripts).")]


def _client() -> Any:
    from llmos.sdk import default_client

    warnings.filterwarnings("ignore", category=NoWorkerWarning)  # a batch without a worker waits queued
    return default_client()


def _resolve(client: Any, ref: str) -> str:
    """A batch id from an id or a name."""
    import llmos.batches as B

    if ref.startswith("batch_"):
        return ref
    found = B.find_batch(client, ref)
    if found is None:
        raise B.BatchNotFoundError(f"no batch with id or name {ref!r}")
    return found.id


def _options(items: list[str]) -> dict[str, Any]:
    from llmos.cli import _set_value

    options: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValidationError(f"--option takes key=value, got {item!r}")
        options[key] = _set_value(key, value)
    return options


def default_name(path: Path) -> str:
    """The name of a batch submitted without --name: the file's name (as text, cut to fit) and the
    start of its sha256, so the same file again is the same batch, and an edited file a new one."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    except OSError as exc:
        raise ValidationError(f"cannot read {path}: {exc.strerror or exc}") from None
    from llmos.batches.core import MAX_NAME_CHARS

    return f"{text_name(path)[:MAX_NAME_CHARS - 13]}-{h.hexdigest()[:12]}"


def text_name(path: Path) -> str:
    """The file's name as text a database stores: bytes that are not UTF-8 read as U+FFFD."""
    from llmos.db import storable

    return storable(os.fsencode(path.name).decode("utf-8", "replace"))


def _summary(info: Any) -> dict[str, Any]:
    c = info.request_counts
    return {"id": info.id, "name": info.name, "status": info.status, "endpoint": info.endpoint,
            "total": c.total, "completed": c.completed, "failed": c.failed,
            "output_file_id": info.output_file_id, "error_file_id": info.error_file_id}


def _line(info: Any) -> str:
    c = info.request_counts
    return (f"batch {info.id} ({info.name or 'no name'}): {info.status}, {c.completed + c.failed:,}/{c.total:,} done, "
            f"{c.failed:,} failed")


@batch_app.command("submit")
def submit(file: Annotated[Path, typer.Argument(metavar="FILE.jsonl", help="Plain {\"id\", \"text\"} lines or OpenAI batch lines.")],
           task: Annotated[Optional[str], typer.Option(help="Plain lines: the task (summarize, translate, sentiment, embed...).")] = None,
           model: Annotated[Optional[str], typer.Option(help="Plain lines: the registered model (default minilm).")] = None,
           priority: Annotated[Optional[str], typer.Option(metavar="PRIORITY", help="0–9 or a name; default batch.")] = None,
           name: Annotated[Optional[str], typer.Option(help="The batch's name: the same name and file again resume it (default: the file's name and hash).")] = None,
           option: Annotated[Optional[list[str]], typer.Option("--option", metavar="KEY=VALUE", help="Plain lines: another task field (JSON values allowed), e.g. --option target_lang=de; repeatable.")] = None,
           retry_failed: Annotated[bool, typer.Option("--retry-failed", help="Resuming: run failed, cancelled and expired lines again.")] = False,
           wait: Annotated[bool, typer.Option("--wait", help="Follow the batch until it is final (as `status`).")] = False,
           as_json: JsonOption = False) -> None:
    """Submit FILE.jsonl as a batch (or resume the batch of the same name), and print its id."""
    import llmos.batches as B
    from llmos.batches.lines import PLAIN

    client = _client()
    endpoint = B._endpoint_of(file)
    if endpoint == PLAIN:
        if not task:
            raise ValidationError(f"{file} has plain lines: say which task runs on them with --task")
        model = model or "minilm"
    elif model:
        raise ValidationError(f"{file} has OpenAI batch lines: each names its model; drop --model")
    info = B.submit_file(client, file, name=name or default_name(file), task=task, model=model, priority=priority,
                         options=_options(option or []) or None, retry_failed=retry_failed)
    if not wait:
        _print(info, as_json)
        return
    if not as_json:
        err.print(f"batch {info.id} ({info.name}): {info.request_counts.total:,} lines submitted", highlight=False)
    _follow(client, info.id, as_json)


def _print(info: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(_summary(info)))
    else:
        out.print(_line(info), highlight=False)


def _follow(client: Any, batch_id: str, as_json: bool) -> None:
    """Read the batch every POLL_S until it is final: a live bar on a terminal; exit 1 unless completed."""
    import llmos.batches as B

    info = B.batch_info(client, batch_id)
    if err.is_terminal and not as_json:
        info = _bar(client, info)
    else:
        last = 0.0
        while not info.is_final:
            if not as_json and time.monotonic() - last >= PLAIN_LINE_EVERY_S:
                err.print(_line(info), highlight=False)
                last = time.monotonic()
            time.sleep(POLL_S)
            info = B.batch_info(client, batch_id)
    _print(info, as_json)
    if info.status != "completed":
        raise typer.Exit(1)


def _bar(client: Any, info: Any) -> Any:
    import llmos.batches as B
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("[red]{task.fields[failed]:,} failed[/red]"), TextColumn("{task.fields[rate]}"),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    with Progress(*columns, console=err, transient=False) as progress:
        c = info.request_counts
        bar = progress.add_task(info.status, total=c.total or None, completed=c.completed + c.failed,
                                failed=c.failed, rate="")
        while True:
            c = info.request_counts
            speed = progress.tasks[0].speed
            progress.update(bar, description=info.status, total=c.total or None, completed=c.completed + c.failed,
                            failed=c.failed, rate=f"{speed:,.0f}/s" if speed else "")
            if info.is_final:
                return info
            time.sleep(POLL_S)
            info = B.batch_info(client, info.id)


@batch_app.command("status")
def status(batch: BatchArg,
           follow: Annotated[bool, typer.Option("--follow/--once", help="Draw a live progress bar until the batch is final (default), or print it once.")] = True,
           as_json: JsonOption = False) -> None:
    """A batch's progress: done/total, failed, rate and ETA, live until it is final."""
    import llmos.batches as B

    client = _client()
    batch_id = _resolve(client, batch)
    if not follow:
        _print(B.batch_info(client, batch_id), as_json)
        return
    _follow(client, batch_id, as_json)


@batch_app.command("results")
def results(batch: BatchArg,
            output: Annotated[Path, typer.Option("--output", "-o", metavar="OUT.jsonl", help="Where to write the results.")],
            as_json: JsonOption = False) -> None:
    """Write a final batch's results in input order: each line's id with its result or error."""
    import llmos.batches as B

    client = _client()
    batch_id = _resolve(client, batch)
    n = B.write_results(client, batch_id, output)
    if as_json:
        print(json.dumps({"id": batch_id, "lines": n, "output": str(output)}))
    else:
        out.print(f"{n:,} lines written to {output}", highlight=False)


@batch_app.command("cancel")
def cancel(batch: BatchArg, as_json: JsonOption = False) -> None:
    """Cancel an open batch: its queued lines are cancelled; what finished is kept."""
    import llmos.batches as B

    client = _client()
    _print(B.cancel(client, _resolve(client, batch)), as_json)


@batch_app.command("list")
def list_(limit: Annotated[int, typer.Option(min=1, max=100, help="How many, newest first.")] = 20,
          as_json: JsonOption = False) -> None:
    """The newest batches."""
    import llmos.batches as B
    from rich.table import Table

    found = B.list_batches(_client(), limit=limit)
    if as_json:
        print(json.dumps([_summary(b) for b in found]))
        return
    table = Table()
    table.add_column("id", no_wrap=True)
    for header in ("name", "status", "done", "failed", "total", "created"):
        table.add_column(header, overflow="fold")
    for b in found:
        c = b.request_counts
        table.add_row(b.id, b.name or "-", b.status, f"{c.completed + c.failed:,}", f"{c.failed:,}", f"{c.total:,}",
                      b.created_at.isoformat(timespec="seconds"))
    # a pipe or a log gets the whole table, not one folded to 80 columns
    (out if out.is_terminal else Console(soft_wrap=True, width=200)).print(table)

