"""`llmos demo`: the main job on the embedded default, end to end through queues and workers.

Starts the stack (unless one already runs for this LLMOS_HOME), submits every line of a file
as a sentiment job and an embed job, shows progress, prints labels, scores and each line's
nearest neighbour by embedding, and a summary read back from the task table.
"""

from __future__ import annotations

import time
from pathlib import Path
from statistics import mean

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from llmos import manager
from llmos.errors import LLMOSError, ValidationError
from llmos.sdk import Client, result_of
from llmos.settings import get_settings
from llmos.stack import EmbeddedRedis, Stack
from llmos.tasks import EmbeddingTask, SentimentTask


def read_lines(path: Path) -> list[str]:
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except OSError as exc:
        raise ValidationError(f"cannot read {path}: {exc.strerror}") from None
    lines = [line for line in lines if line]
    if not lines:
        raise ValidationError(f"{path} has no non-empty lines")
    return lines


def run_demo(path: Path, model: str, console: Console) -> None:
    settings = get_settings()
    lines = read_lines(path)
    stack = None
    running = settings.embedded_redis and EmbeddedRedis(settings).running()
    if not running:
        stack = Stack(settings, [model])
        with console.status(f"starting Redis, the task table and a {model} worker…"):
            stack.start()
            try:
                stack.wait_ready()
            except BaseException:
                stack.stop()
                raise
    try:
        with Client(settings) as client:
            _run(client, model, lines, console)
    finally:
        if stack is not None:
            with console.status("stopping…"):
                stack.stop()


def _run(client: Client, model: str, lines: list[str], console: Console, timeout_s: float = 600.0) -> None:
    m = client.load_model(model)
    started = time.perf_counter()
    sentiment = m.submit_many([SentimentTask(text=t) for t in lines])
    embed = m.submit_many([EmbeddingTask(texts=[t]) for t in lines])
    ids = [h.id for h in sentiment + embed]
    if not manager.live_workers(client.engine, model):
        raise LLMOSError(f"no live worker serves {model!r}: start one with `llmos worker --model {model}` "
                         f"(or stop the running `llmos up` and run the demo alone)")
    deadline = time.monotonic() + timeout_s
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=True) as progress:
        bar = progress.add_task(f"{len(ids)} jobs on {model}", total=len(ids))
        while True:
            counts = client._db(manager.status_counts, ids, tenant=client.tenant)
            done = sum(n for s, n in counts.items() if s.is_final)
            progress.update(bar, completed=done)
            if done == len(ids):
                break
            if time.monotonic() > deadline:
                raise LLMOSError(f"{len(ids) - done} of {len(ids)} jobs not done after {timeout_s:.0f} s; "
                                 "see `llmos job ID` and the worker logs")
            time.sleep(0.2)
    elapsed = time.perf_counter() - started
    jobs = manager.get_jobs(client.engine, ids, tenant=client.tenant)
    labels = [result_of(jobs[h.id]) for h in sentiment]
    vectors = [result_of(jobs[h.id]).vectors[0] for h in embed]

    table = Table(title=f"{len(lines)} lines: sentiment and nearest neighbour ({model})")
    table.add_column("#", justify="right")
    table.add_column("label")
    table.add_column("score", justify="right")
    table.add_column("nearest", justify="right")
    table.add_column("text")
    for i, (text, res) in enumerate(zip(lines, labels), 1):
        sims = [(sum(a * b for a, b in zip(vectors[i - 1], v)), j) for j, v in enumerate(vectors, 1) if j != i]
        nearest = max(sims)[1] if sims else "-"
        colour = "green" if res.label == "POSITIVE" else "red"
        table.add_row(str(i), f"[{colour}]{res.label}[/{colour}]", f"{res.score:.2f}", str(nearest), text)
    console.print(table)
    rows = list(jobs.values())
    console.print(
        f"{len(rows)} jobs ({len(lines)} sentiment + {len(lines)} embed, {len(vectors[0])}-dim vectors) "
        f"in {elapsed:.2f} s; mean queue wait {mean(j.queue_wait_ms or 0 for j in rows):.1f} ms, "
        f"mean compute {mean(j.compute_ms or 0 for j in rows):.1f} ms, "
        f"mean batch size {mean(j.batch_size or 0 for j in rows):.1f}"
    )

