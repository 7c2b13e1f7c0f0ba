"""What LLMOS itself costs per job: CPU of every process on the job's path, with a model so small
that the pipeline, not the model, is the work.

    .venv/bin/python benchmarks/overhead.py [--n 4000] [--batch 32] [--wait results|each|notices]
                                            [--texts short|long] [--profile] [--out overhead.json]

A tiny random DistilBERT classifier (built on the spot) serves N sentiment jobs submitted with
one `submit_many` (chunks of 10,000); the worker runs with one torch thread. The producer waits
as a user does (`--wait results`: `Model.results(handles)`, the default; `each`: every handle's
`result()` in turn; `notices`: the benchmark's own pattern subscription, no SDK wait).

CPU per job is summed over every process the jobs pass through, each read before and after:
- the producer (this process: submit, then wait; `resource.getrusage`, less this script's own
  sampler thread);
- the worker process (`/proc/<pid>/stat`, all its threads; per thread from
  `/proc/<pid>/task/<tid>/schedstat`, named by a shim that starts the worker and writes its
  threads' names; the shim's own thread is left out of the sum);
- the Redis server (`INFO cpu` of the server behind LLMOS_REDIS_URL: the whole server, every
  client of every db; `INFO commandstats` says which commands it ran);
- Postgres: the backends serving this run's database, found by their process title
  (`postgres: user <db> host(port) …` in /proc/<pid>/cmdline) and sampled every second so that a
  backend that exits mid-run still counts; and, separately, the cluster's background processes
  (postmaster, walwriter, background writer, checkpointer: cluster-wide, shared with any other
  database on the server). Backends of other databases are listed, not counted.
The tiny model's own work is measured side by side, after the run, in this process: the same
texts through the same runner in batches of `--batch`, one torch thread, the thread's CPU clock
(`time.thread_time`): what a user's bare loop spends. Issue 11's target (0.5 ms per job) is for
what LLMOS adds: the sum over every process less that bare model's CPU per job (docs/benchmarks.md,
"What the CPU target counts"). The sum itself, and the batch compute time the table recorded, are
printed too.

`--profile`: a sampling profiler in the worker (through the shim) and in this process: every
2 ms each Python thread's CPU since the last sample (its CPU clock) is charged to its current stack;
reported by the deepest frame in llmos/ or workers/ (file:line) and by leaf function. It costs
CPU of its own, so its run's per-job figures are not the headline ones.

Linux only. Used in docs/benchmarks.md ("Where the encoder's gap goes", "Per-job overhead").
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HZ = os.sysconf("SC_CLK_TCK")
TARGET_MS = 0.5
SHIM = "--worker-shim"


def bare_model_cpu_s(cfg: Path, tasks: list, batch: int) -> float:
    """CPU seconds of this thread for the tiny model's bare loop over `tasks` (the worker's runner,
    batches of `batch`, one torch thread), after one warm-up batch."""
    import torch
    from llmos.registry import Registry
    from llmos.settings import Settings
    from workers import model_cache
    from workers.runners import runners_for

    runner = runners_for(model_cache.get(Registry.load(Settings(config=cfg)).get("tiny"), "cpu"))["sentiment"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runner.run(tasks[:batch])
        t0 = time.thread_time()
        for i in range(0, len(tasks), batch):
            runner.run(tasks[i:i + batch])
        return time.thread_time() - t0
    finally:
        torch.set_num_threads(threads)


# -- CPU readers ---------------------------------------------------------------------------------
def proc_cpu() -> dict[int, tuple[str, int]]:
    """pid → (command, user+system ticks of the whole process, dead threads included)."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        out[int(pid)] = (stat[stat.index("(") + 1:stat.rindex(")")], int(fields[11]) + int(fields[12]))
    return out


def thread_ns(pid: int | str = "self") -> dict[int, int]:
    """tid → nanoseconds on CPU (schedstat) of each live thread of `pid`."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            out[int(tid)] = int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def parent_pid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[1])


def postmaster_of(engine) -> int | None:
    """The postmaster serving `engine`: the parent of one of its backends (if visible in /proc)."""
    import sqlalchemy as sa

    try:
        with engine.connect() as c:
            backend = c.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
    except sa.exc.SQLAlchemyError:  # SQLite
        return None
    parent = parent_pid(int(backend))
    return parent if parent and parent_pid(parent) is not None else None


def postgres_role(pid: int, comm: str, dbname: str | None, postmaster: int | None) -> str | None:
    """'ours', 'background' or 'other' for a process of the cluster behind `postmaster`; else None."""
    if postmaster is None or not comm.startswith("postgres"):
        return None
    if pid == postmaster:
        return "background"
    if parent_pid(pid) != postmaster:
        return None  # another cluster's, or not Postgres
    words = cmdline(pid).split()
    # postgres: [cluster:] user db host(port) activity  |  postgres: [cluster:] walwriter
    if dbname and dbname in words:
        return "ours"
    if any("(" in w and w.endswith(")") for w in words) or "[local]" in words:
        return "other"
    return "background"


class PostgresWatch(threading.Thread):
    """Samples every Postgres process's CPU each second (a backend may exit before the end)."""

    def __init__(self, dbname: str | None, postmaster: int | None) -> None:
        super().__init__(name="bench-pg-watch", daemon=True)
        self.dbname, self.postmaster = dbname, postmaster
        self.first: dict[int, tuple[str, int]] = {}
        self.last: dict[int, tuple[str, int]] = {}
        self.stop_event = threading.Event()
        self.own_cpu_s = 0.0

    def sample(self) -> None:
        for pid, (comm, ticks) in proc_cpu().items():
            role = self.last[pid][0] if pid in self.last else postgres_role(pid, comm, self.dbname, self.postmaster)
            if role is None:
                continue
            self.first.setdefault(pid, (role, ticks if not self.last_started else 0))
            self.last[pid] = (role, ticks)

    def run(self) -> None:
        t0 = time.thread_time()
        while not self.stop_event.wait(1.0):
            self.sample()
        self.sample()
        self.own_cpu_s = time.thread_time() - t0

    def begin(self) -> None:
        self.last_started = False
        self.sample()  # baseline of every process now alive
        self.last_started = True  # a process first seen later started during the run: from 0
        self.start()

    def end(self) -> dict[str, dict]:
        self.stop_event.set()
        self.join()
        out: dict[str, dict] = {}
        for pid, (role, ticks) in self.last.items():
            d = out.setdefault(role, {"ticks": 0, "processes": 0})
            d["ticks"] += ticks - self.first[pid][1]
            d["processes"] += 1
        return out


def redis_stats(client) -> tuple[float, dict[str, tuple[int, int]], dict]:
    """(CPU seconds of the server, command → (calls, usec), other facts) from INFO."""
    cpu = client.info("cpu")
    cmds = {k.removeprefix("cmdstat_"): (v["calls"], v["usec"]) for k, v in client.info("commandstats").items()}
    server = client.info("server")
    clients = client.info("clients")
    return (cpu["used_cpu_sys"] + cpu["used_cpu_user"], cmds,
            {"pid": server.get("process_id"), "connected_clients": clients.get("connected_clients")})


def pg_db_stats(engine) -> dict[str, int]:
    import sqlalchemy as sa

    with engine.connect() as c:
        row = c.execute(sa.text(
            "SELECT xact_commit, xact_rollback, tup_returned, tup_fetched, tup_inserted, tup_updated, "
            "tup_deleted FROM pg_stat_database WHERE datname = current_database()")).mappings().first()
        try:
            wal = c.execute(sa.text("SELECT wal_records, wal_bytes FROM pg_stat_wal")).mappings().first()
        except sa.exc.SQLAlchemyError:
            wal = None
    out = {k: int(v) for k, v in (row or {}).items()}
    with engine.connect() as c:
        tables = c.execute(sa.text(
            "SELECT relname, seq_scan, seq_tup_read, idx_scan, idx_tup_fetch, n_tup_upd, n_tup_hot_upd "
            "FROM pg_stat_user_tables WHERE relname IN ('jobs', 'workers')")).mappings().all()
        indexes = c.execute(sa.text(
            "SELECT indexrelname, idx_scan, idx_tup_read FROM pg_stat_user_indexes WHERE relname = 'jobs'")).mappings().all()
    for t in tables:
        for k in ("seq_scan", "seq_tup_read", "idx_scan", "idx_tup_fetch", "n_tup_upd", "n_tup_hot_upd"):
            out[f"{t['relname']}.{k}"] = int(t[k] or 0)
    for i in indexes:
        out[f"index {i['indexrelname']}.idx_scan"] = int(i["idx_scan"] or 0)
        out[f"index {i['indexrelname']}.idx_tup_read"] = int(i["idx_tup_read"] or 0)
    if wal:
        out.update({"wal_records (cluster)": int(wal["wal_records"]), "wal_bytes (cluster)": int(wal["wal_bytes"])})
    return out


# -- the sampling profiler (worker through the shim, and this process) -------------------------------
PROJECT_DIRS = (str(ROOT / "llmos") + os.sep, str(ROOT / "workers") + os.sep)


def _short(filename: str) -> str:
    for marker in ("site-packages" + os.sep, str(ROOT) + os.sep, "lib" + os.sep + "python3"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


def _group(name: str) -> str:
    if name.startswith("ThreadPoolExecutor"):
        return "Celery pool threads"
    return name


class StackSampler:
    """CPU-weighted stack samples of this process's Python threads: at each tick, the CPU each
    thread used since the last tick (its `pthread_getcpuclockid` clock, no file read) is charged
    to the stack it is in now. A thread that ran and then blocked is charged at its blocking call,
    so read the deepest project frame (the call that led there), not the leaf, for such threads."""

    def __init__(self) -> None:
        self.last: dict[int, int] = {}
        self.clocks: dict[int, int] = {}
        self.native: dict[int, int | None] = {}
        self.by_project_line: dict[str, float] = {}
        self.by_leaf: dict[str, float] = {}
        self.by_thread: dict[str, float] = {}
        self.me: int | None = None

    def tick(self) -> None:
        threads = {t.ident: t for t in threading.enumerate()}
        frames = sys._current_frames()
        for ident, frame in frames.items():
            t = threads.get(ident)
            if t is None or ident == self.me:
                continue
            try:
                clock = self.clocks.get(ident)
                if clock is None or self.native.get(ident) != t.native_id:  # an ident is reused
                    clock = self.clocks[ident] = time.pthread_getcpuclockid(ident)
                    self.native[ident] = t.native_id
                    self.last.pop(ident, None)
                now = time.clock_gettime_ns(clock)
            except OSError:  # the thread just ended
                self.clocks.pop(ident, None)
                continue
            delta = now - self.last.get(ident, now)
            self.last[ident] = now
            if delta <= 0:
                continue
            group = _group(t.name)
            self.by_thread[group] = self.by_thread.get(group, 0) + delta
            project, leaf = None, "(unreadable stack)"
            try:
                leaf = f"{_short(frame.f_code.co_filename)}:{frame.f_code.co_name}"
                f = frame
                while f is not None:
                    if f.f_code.co_filename.startswith(PROJECT_DIRS):
                        project = f"{_short(f.f_code.co_filename)}:{f.f_lineno} {f.f_code.co_name}"
                        break
                    f = f.f_back
            except AttributeError:  # a frame torn down under us (seen in CPython 3.11): charged as unreadable
                pass
            key = f"[{group}] {project or '(outside llmos/ and workers/)'}"
            self.by_project_line[key] = self.by_project_line.get(key, 0) + delta
            leaf_key = f"[{group}] {leaf}"
            self.by_leaf[leaf_key] = self.by_leaf.get(leaf_key, 0) + delta

    def report(self) -> dict:
        ms = lambda d: {k: round(v / 1e6, 1) for k, v in sorted(d.items(), key=lambda kv: -kv[1])}  # noqa: E731
        return {"cpu_ms_by_thread": ms(self.by_thread), "cpu_ms_by_project_line": ms(self.by_project_line),
                "cpu_ms_by_leaf_function": ms(self.by_leaf)}


class SamplerThread(threading.Thread):
    def __init__(self, interval: float = 0.002) -> None:
        super().__init__(name="bench-profiler", daemon=True)
        self.sampler = StackSampler()
        self.interval = interval
        self.stop_event = threading.Event()
        self.own_cpu_s = 0.0
        self.error: str | None = None

    def run(self) -> None:
        t0 = time.thread_time()
        self.sampler.me = threading.get_ident()
        try:
            self.sampler.tick()  # every thread's clock now: the baseline
            while not self.stop_event.wait(self.interval):
                self.sampler.tick()
            self.sampler.tick()
        except Exception as exc:  # reported, not raised: the process it samples goes on
            self.error = repr(exc)
        self.own_cpu_s = time.thread_time() - t0

    def finish(self) -> dict:
        self.stop_event.set()
        self.join()
        return {**self.sampler.report(), "profiler_cpu_ms": round(self.own_cpu_s * 1000, 1), "error": self.error}


def shim_main(ctl: Path, argv: list[str]) -> None:
    """Run `llmos <argv>` (the worker) with a thread that answers the benchmark through files in `ctl`:
    `cmd` = names | profile-on | profile-off; the answer in `names.json` / `profile.json`, then `ack`."""
    def names() -> dict[int, str]:
        return {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}

    def loop() -> None:
        seen, prof = None, None
        while True:
            try:
                cmd = (ctl / "cmd").read_text().strip()
            except OSError:
                cmd = None
            if cmd and cmd != seen:
                seen = cmd
                verb = cmd.split(":", 1)[0]
                if verb == "names":
                    (ctl / "names.tmp").write_text(json.dumps(names()))
                    os.replace(ctl / "names.tmp", ctl / "names.json")
                elif verb == "profile-on":
                    prof = SamplerThread()
                    prof.start()
                elif verb == "profile-off" and prof is not None:
                    (ctl / "profile.tmp").write_text(json.dumps({**prof.finish(), "names": names()}))
                    os.replace(ctl / "profile.tmp", ctl / "profile.json")
                    prof = None
                (ctl / "ack").write_text(cmd)
            time.sleep(0.2)

    threading.Thread(target=loop, name="bench-shim", daemon=True).start()
    sys.path.insert(0, str(ROOT))
    from llmos.cli import main

    sys.argv = ["llmos", *argv]
    main(argv)


def ask(ctl: Path, cmd: str, answer: str | None, timeout: float = 30.0):
    """Send the shim a command (made unique) and wait for its ack, then read `answer`."""
    token = f"{cmd}:{time.monotonic_ns()}"
    (ctl / "cmd").write_text(token)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if (ctl / "ack").read_text() == token:
                return json.loads((ctl / answer).read_text()) if answer else None
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"the worker shim did not answer {cmd!r}")


# -- the run -----------------------------------------------------------------------------------------
def main() -> None:
    import argparse
    import resource
    import statistics
    import tempfile

    sys.path.insert(0, str(ROOT))
    from benchmarks.run import (Env, make_short_texts, make_texts, subscribe_done,  # noqa: E402
                                wait_done, write_config)

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--wait", choices=["results", "each", "notices"], default="results")
    ap.add_argument("--texts", choices=["short", "long"], default="short")
    ap.add_argument("--profile", action="store_true", help="sample stacks in the worker and here (costs CPU)")
    ap.add_argument("--analyze", action="store_true",
                    help="ANALYZE the task table after the warm-up (this server runs without autovacuum, so "
                         "by default the planner never has statistics of the run's fresh database)")
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    args = ap.parse_args()
    import llmos
    import redis
    from llmos import manager
    from llmos.constants import MAX_JOBS_PER_SUBMIT
    from tests.tiny_models import build_distilbert

    def rusage_s() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="llmos-overhead-") as tmp:
        env = Env(Path(tmp))
        ctl = Path(tmp) / "ctl"
        ctl.mkdir()
        try:
            folder = build_distilbert(Path(tmp) / "tiny", "classifier")
            cfg = write_config(Path(tmp) / "tiny.toml", {"tiny": {
                "source": str(folder), "kind": "classifier", "tasks": ["sentiment"],
                "max_batch_size": args.batch, "max_wait_ms": 5.0}})
            texts = (make_short_texts if args.texts == "short" else make_texts)(args.n)
            tasks = [llmos.SentimentTask(text=t) for t in texts]
            env.reset()
            w = env.worker("tiny", cfg, cmd=[sys.executable, str(Path(__file__).resolve()), SHIM, str(ctl),
                                             "worker", "--model", "tiny"],
                           extra_env={"OMP_NUM_THREADS": "1"})  # one torch thread, no spinning partner
            rclient = redis.Redis.from_url(env.redis_url)
            with llmos.Client(env.settings(cfg)) as client:
                m = client.load_model("tiny")
                m.results(m.submit_many(tasks[:64], batch_id="warm"), timeout=300)
                if args.analyze and env.dbname:
                    import sqlalchemy as sa

                    with client.engine.begin() as c:
                        c.execute(sa.text("ANALYZE jobs"))
                notices = subscribe_done(client.redis) if args.wait == "notices" else None
                time.sleep(1.5)  # Postgres flushes its statistics of the warm-up
                db0 = pg_db_stats(client.engine)
                if args.profile:
                    ask(ctl, "profile-on", None)
                    here = SamplerThread()
                    here.start()
                postmaster = postmaster_of(client.engine)
                pg = PostgresWatch(env.dbname, postmaster)
                pg.begin()
                r0, cmds0, rinfo = redis_stats(rclient)
                p0, t0 = proc_cpu(), thread_ns(w.pid)
                u0, started = rusage_s(), time.perf_counter()
                handles = []
                for i in range(0, args.n, MAX_JOBS_PER_SUBMIT):
                    handles += m.submit_many(tasks[i:i + MAX_JOBS_PER_SUBMIT], batch_id="run")
                u1, submitted = rusage_s(), time.perf_counter()
                if args.wait == "results":
                    m.results(handles, timeout=900)
                elif args.wait == "each":
                    for h in handles:
                        h.result(timeout=900)
                else:
                    wait_done(client.engine, "run", args.n, notices=notices)
                u2, elapsed = rusage_s(), time.perf_counter() - started
                p1, t1 = proc_cpu(), thread_ns(w.pid)
                r1, cmds1, _ = redis_stats(rclient)
                pg_roles = pg.end()
                profile = None
                if args.profile:
                    profile = {"worker": ask(ctl, "profile-off", "profile.json", timeout=60), "producer": here.finish()}
                names = ask(ctl, "names", "names.json")
                names = {int(k): v for k, v in names.items()}
                if notices is not None:
                    notices.close()
                time.sleep(1.5)
                db1 = pg_db_stats(client.engine)
                jobs = list(manager.get_jobs(client.engine, [h.id for h in handles], tenant=manager.ANY_TENANT).values())
            rclient.close()
            env.stop(w)
            bare_s = bare_model_cpu_s(cfg, tasks, args.batch)  # the machine otherwise as during the run
        finally:
            env.close()
    load_end = os.getloadavg()
    n = args.n
    ms = lambda seconds: round(seconds / n * 1000, 3)  # noqa: E731  (CPU seconds → ms per job)

    harness = pg.own_cpu_s + (here.own_cpu_s if args.profile else 0.0)
    by_thread: dict[str, float] = {}
    for tid, ns in t1.items():
        name = _group(names.get(tid, "unnamed (torch or native)"))
        by_thread[name] = by_thread.get(name, 0.0) + (ns - t0.get(tid, 0)) / 1e9
    shim_s = by_thread.get("bench-shim", 0.0) + by_thread.get("bench-profiler", 0.0)
    worker_s = (p1[w.pid][1] - p0[w.pid][1]) / HZ - shim_s
    pg_s = {role: d["ticks"] / HZ for role, d in pg_roles.items()}
    model_s = sum(j.compute_ms / j.batch_size for j in jobs if j.compute_ms and j.batch_size) / 1000
    producer = {"submit": u1 - u0, "wait": u2 - u1 - harness}
    procs = {
        "producer: submit_many": producer["submit"],
        f"producer: wait ({args.wait})": producer["wait"],
        "worker process": worker_s,
        "Redis server (INFO cpu; whole server)": r1 - r0,
        "Postgres backends of this run's database": pg_s.get("ours", 0.0),
        "Postgres background (cluster-wide: walwriter, bgwriter, checkpointer, postmaster)": pg_s.get("background", 0.0),
    }
    total = sum(procs.values())
    busy_others = sorted(((ticks - p0.get(pid, (c, 0))[1]) / HZ, f"{c} ({pid})") for pid, (c, ticks) in p1.items()
                         if pid not in (w.pid, os.getpid()) and pid not in pg.last and c != "redis-server")[::-1][:6]
    redis_cmds = sorted(((cmds1[k][1] - cmds0.get(k, (0, 0))[1], cmds1[k][0] - cmds0.get(k, (0, 0))[0], k)
                         for k in cmds1 if cmds1[k][0] != cmds0.get(k, (0, 0))[0]), reverse=True)
    report = {
        "n": n, "texts": args.texts, "wait": args.wait, "batch": args.batch, "where": env.where,
        "analyzed": args.analyze,
        "elapsed_s": round(elapsed, 2), "jobs_per_s": round(n / elapsed, 1),
        "submit_s": round(submitted - started, 3),
        "mean_batch": round(statistics.mean(j.batch_size for j in jobs), 1),
        "load_average": {"start": load_start, "end": load_end}, "cpu_threads": os.cpu_count(),
        "cpu_ms_per_job": {k: ms(v) for k, v in procs.items()},
        "total_cpu_ms_per_job": ms(total),
        "total_without_pg_background_ms_per_job": ms(total - pg_s.get("background", 0.0)),
        "target_ms_per_job": TARGET_MS,
        "tiny_model_compute_ms_per_job": ms(model_s),
        "bare_model_cpu_ms_per_job": ms(bare_s),
        "llmos_cpu_ms_per_job": ms(total - bare_s),
        "total_less_model_compute_ms_per_job": ms(total - model_s),
        "worker_threads_cpu_ms_per_job": {k: ms(v) for k, v in sorted(by_thread.items(), key=lambda kv: -kv[1]) if v > 0},
        "postgres_processes_seen": {role: d["processes"] for role, d in pg_roles.items()},
        "postgres_other_databases_cpu_ms_per_job_not_counted": ms(pg_s.get("other", 0.0)),
        "postgres_db_stats_per_job": {k: round((db1.get(k, 0) - db0.get(k, 0)) / n, 3) for k in db1
                                      if db1.get(k, 0) != db0.get(k, 0)},
        "redis": {**rinfo, "commands_per_job": {k: round(c / n, 3) for _, c, k in redis_cmds[:12]},
                  "usec_per_job": {k: round(u / n, 2) for u, _, k in redis_cmds[:12]}},
        "busiest_other_processes_cpu_s_not_counted": {name: round(s, 2) for s, name in busy_others if s > 0},
        "harness_cpu_s_excluded": round(harness + shim_s, 3),
    }
    if profile:
        report["profile"] = profile
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    print_report(report)


def print_report(r: dict) -> None:
    print(f"{r['n']} {r['texts']} jobs on the tiny model ({r['where']}{', ANALYZEd' if r['analyzed'] else ''}), "
          f"wait: {r['wait']}; "
          f"{r['elapsed_s']} s = {r['jobs_per_s']} jobs/s (submit {r['submit_s']} s); mean batch {r['mean_batch']}; "
          f"load average {r['load_average']['start'][0]:.2f} -> {r['load_average']['end'][0]:.2f}")
    print("CPU ms per job, by process:")
    for k, v in r["cpu_ms_per_job"].items():
        print(f"  {k:<84} {v:>7}")
    print(f"  {'TOTAL':<84} {r['total_cpu_ms_per_job']:>7}")
    print(f"  {'  without the Postgres background':<84} {r['total_without_pg_background_ms_per_job']:>7}")
    print(f"  {'  the batch compute time per job the table recorded (wall clock of the batches)':<84} "
          f"{r['tiny_model_compute_ms_per_job']:>7}")
    print(f"  {'the bare model: same texts, runner and batches, one torch thread (CPU, this process)':<84} "
          f"{r['bare_model_cpu_ms_per_job']:>7}")
    met = "met" if r["llmos_cpu_ms_per_job"] <= r["target_ms_per_job"] else "NOT met"
    print(f"  {'LLMOS: TOTAL less the bare model':<84} {r['llmos_cpu_ms_per_job']:>7}   "
          f"target <= {r['target_ms_per_job']}: {met} ({r['llmos_cpu_ms_per_job'] / r['target_ms_per_job']:.2f}x)")
    print("worker threads (schedstat), ms per job:")
    for k, v in r["worker_threads_cpu_ms_per_job"].items():
        print(f"    {k:<40} {v:>7}")
    print(f"Postgres per job: {r['postgres_db_stats_per_job']}; processes {r['postgres_processes_seen']}; "
          f"other databases' backends {r['postgres_other_databases_cpu_ms_per_job_not_counted']} ms/job (not counted)")
    print(f"Redis per job: calls {r['redis']['commands_per_job']}")
    print(f"               usec  {r['redis']['usec_per_job']}; connected clients {r['redis']['connected_clients']}")
    print(f"busiest other processes (CPU s, not counted): {r['busiest_other_processes_cpu_s_not_counted']}")
    prof = r.get("profile")
    if prof:
        for side in ("worker", "producer"):
            p = prof[side]
            print(f"\nprofile, {side} (CPU ms; profiler itself {p['profiler_cpu_ms']} ms; error {p.get('error')}): "
                  f"by thread {p['cpu_ms_by_thread']}")
            print("  by deepest llmos/ or workers/ frame:")
            for k, v in list(p["cpu_ms_by_project_line"].items())[:25]:
                print(f"    {v:>8}  {k}")
            print("  by leaf function:")
            for k, v in list(p["cpu_ms_by_leaf_function"].items())[:20]:
                print(f"    {v:>8}  {k}")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == SHIM:
        shim_main(Path(sys.argv[2]), sys.argv[3:])
    else:
        main()
