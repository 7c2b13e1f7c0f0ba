"""What LLMOS itself costs per job: CPU by process (and by worker thread), with a model so small
that the pipeline, not the model, is the work.

    .venv/bin/python benchmarks/overhead.py [--n 4000] [--batch 32]

A tiny random DistilBERT classifier (built on the spot) serves N sentiment jobs submitted with
one `submit_many`; the worker runs with one torch thread. CPU time is read from /proc before
and after, for the worker process, Postgres, Redis and this client; with py-spy installed
(`pip install py-spy`) the worker's threads are named (event loop, pool, batcher, recorder...).
Linux only. Used in docs/benchmarks.md ("Where the encoder's gap goes").
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.run import Env, make_texts, subscribe_done, wait_done, write_config  # noqa: E402

HZ = os.sysconf("SC_CLK_TCK")


def proc_cpu() -> dict[int, tuple[str, int]]:
    """pid → (command, user+system ticks) for every process."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        out[int(pid)] = (stat[stat.index("(") + 1:stat.rindex(")")], int(fields[11]) + int(fields[12]))
    return out


def thread_cpu(pid: int) -> dict[int, int]:
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        out[int(tid)] = int(fields[11]) + int(fields[12])
    return out


def thread_names(pid: int) -> dict[int, str]:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        return {}
    dump = subprocess.run([spy, "dump", "-p", str(pid)], capture_output=True, text=True).stdout
    names = {}
    for m in re.finditer(r'Thread (0x[0-9A-Fa-f]+|\d+) .*?"(.*)"', dump):
        tid = int(m.group(1), 16) if m.group(1).startswith("0x") else int(m.group(1))
        names[tid] = m.group(2)
    return names


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    import llmos
    from llmos import manager
    from tests.tiny_models import build_distilbert

    with tempfile.TemporaryDirectory(prefix="llmos-overhead-") as tmp:
        env = Env(Path(tmp))
        try:
            folder = build_distilbert(Path(tmp) / "tiny", "classifier")
            cfg = write_config(Path(tmp) / "tiny.toml", {"tiny": {
                "source": str(folder), "kind": "classifier", "tasks": ["sentiment"],
                "max_batch_size": args.batch, "max_wait_ms": 5.0}})
            tasks = [llmos.SentimentTask(text=t) for t in make_texts(args.n)]
            env.reset()
            os.environ["OMP_NUM_THREADS"] = "1"  # the worker's torch: one thread, no spinning partner
            w = env.worker("tiny", cfg)
            with llmos.Client(env.settings(cfg)) as client:
                m = client.load_model("tiny")
                m.submit_many(tasks[:64], batch_id="warm")
                wait_done(client.engine, "warm", 64)
                notices = subscribe_done(client.redis)
                p0, t0 = proc_cpu(), thread_cpu(w.pid)
                started = time.perf_counter()
                handles = m.submit_many(tasks, batch_id="run")
                wait_done(client.engine, "run", args.n, notices=notices)
                elapsed = time.perf_counter() - started
                p1, t1 = proc_cpu(), thread_cpu(w.pid)
                names = thread_names(w.pid)
                notices.close()
                jobs = list(manager.get_jobs(client.engine, [h.id for h in handles], tenant=manager.ANY_TENANT).values())
            env.stop(w)
        finally:
            env.close()
    per_job = lambda ticks: round(ticks / HZ / args.n * 1000, 3)  # noqa: E731
    by_proc: dict[str, int] = {}
    for pid, (comm, ticks) in p1.items():
        name = "worker" if pid == w.pid else "client (this process)" if pid == os.getpid() else comm
        by_proc[name] = by_proc.get(name, 0) + ticks - p0.get(pid, (comm, 0))[1]
    by_thread: dict[str, int] = {}
    for tid, ticks in t1.items():
        name = names.get(tid, "unnamed (torch or native)")
        name = "Celery pool threads" if name.startswith("ThreadPoolExecutor") else name
        by_thread[name] = by_thread.get(name, 0) + ticks - t0.get(tid, 0)
    print(f"{args.n} jobs in {elapsed:.2f} s = {args.n / elapsed:.0f} jobs/s; mean batch "
          f"{statistics.mean(j.batch_size for j in jobs):.1f}; CPU ms per job:")
    for name, ticks in sorted(by_proc.items(), key=lambda kv: -kv[1])[:5]:
        print(f"  {name:<28} {per_job(ticks)}")
    if names:
        for name, ticks in sorted(by_thread.items(), key=lambda kv: -kv[1]):
            if ticks:
                print(f"    worker thread {name:<22} {per_job(ticks)}")


if __name__ == "__main__":
    main()
