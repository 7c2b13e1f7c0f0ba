"""Jobs through the REST API against the SDK's direct client, side by side in one run.

    .venv/bin/python benchmarks/api.py [--n 2000] [--clients 50] [--seconds 8] [--passes 3]
                                       [--submit-threads 8] [--out results.json]

One `llmos api` process (uvicorn, 1 process) on a free loopback port, Postgres and Redis on
127.0.0.1 (a fresh database, dropped afterwards; Redis db 12, emptied, or BENCH_REDIS_URL),
a tiny random-weight DistilBERT classifier (tests/tiny_models.py) registered in a temp llmos.toml.

- Submit rates, no worker running (rows + messages per second, as run.py's submit_rate):
  `--n` jobs one a request (`POST /v1/jobs` from `--submit-threads` threads sharing one httpx
  pool) against `Model.submit` from as many threads sharing one SDK client; 5 × `--n` jobs in
  requests of 1,000 (`POST /v1/jobs:batch`) against `Model.submit_many` of the same chunks.
- Latency, one real worker: `--clients` asyncio clients (one httpx.AsyncClient) each loop
  submit -> `GET /wait` until final, at most `--n` / `--clients` jobs each and `--seconds`;
  p50/p95 of the end-to-end latency seen by the client and the jobs/s achieved, the table's
  queue wait and compute of the same jobs; then the same load through the direct SDK
  (`--clients` threads looping `Model.submit` -> `result()`, which is `Model.execute`).
- The API process's CPU time per job (/proc), for each of the three API measurements.

Each of `--passes` passes runs every measurement once, the API's next to the SDK's; medians and
per-pass ratios are reported. Prints one JSON object and a small table; method and latest
figures: docs/benchmarks.md ("The REST API").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("BENCH_REDIS_URL", "redis://127.0.0.1:6379/12")
# The worker's torch on one thread: the tiny model's batch takes ~5 ms so, while two threads spin
# at every barrier of a 64-wide model and took 20x longer on a busy 2-core machine. The model is
# meant to be negligible here: what is measured is the path around it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import httpx  # noqa: E402

import llmos  # noqa: E402
from benchmarks.run import Env, pct, write_config  # noqa: E402  (run.py clears LLMOS_* first)
from llmos import manager  # noqa: E402
from llmos.db import get_engine  # noqa: E402
from tests.tiny_models import build_distilbert, corpus  # noqa: E402

MODEL = "sst2"
BATCH = 1000
"""Jobs per `POST /v1/jobs:batch` request and per `submit_many` call."""
FINAL = {"succeeded", "failed", "cancelled", "expired"}
API_ENV = {"LLMOS_API_RATE_LIMIT": "1000000/second",  # counted (one Redis call a request), never hit
           "LLMOS_API_MAX_QUEUED_JOBS": "100000000"}


def texts(n: int) -> list[str]:
    """Short sentences the tiny tokenizer knows, numbered so that no two are equal."""
    base = corpus()
    return [f"{base[i % len(base)]} {i}" for i in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_api(env: Env, config: Path) -> tuple[subprocess.Popen, str]:
    """`llmos api` on a free loopback port, once /readyz answers 200."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    p = env.start([sys.executable, "-m", "llmos.api.cli", "api", "--port", str(port)], {**env.env(config), **API_ENV})
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return p, url
        except httpx.TransportError:
            pass
        if p.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the API did not start")
        time.sleep(0.1)


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def body(text: str) -> dict:
    return {"model": MODEL, "task": "sentiment", "input": {"text": text}}


def api_single(url: str, headers: dict, items: list[str], threads: int) -> float:
    """Jobs/s, one `POST /v1/jobs` a job from `threads` threads sharing one connection pool."""
    limits = httpx.Limits(max_connections=threads, max_keepalive_connections=threads)
    with httpx.Client(base_url=url, headers=headers, limits=limits, timeout=60) as http, \
            ThreadPoolExecutor(threads) as pool:
        def post(text: str) -> None:
            r = http.post("/v1/jobs", json=body(text))
            if r.status_code != 201:
                raise RuntimeError(f"submit answered {r.status_code}: {r.text[:300]}")

        list(pool.map(post, [f"warm {i}" for i in range(threads * 2)]))  # connections, threads
        t0 = time.perf_counter()
        list(pool.map(post, items))
        return round(len(items) / (time.perf_counter() - t0), 1)


def sdk_single(model: llmos.Model, items: list[str], threads: int) -> float:
    """Jobs/s, one `Model.submit` a job from `threads` threads sharing one SDK client."""
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda t: model.submit(llmos.SentimentTask(text=t)), [f"warm {i}" for i in range(threads * 2)]))
        t0 = time.perf_counter()
        list(pool.map(lambda t: model.submit(llmos.SentimentTask(text=t)), items))
        return round(len(items) / (time.perf_counter() - t0), 1)


def api_batch(url: str, headers: dict, items: list[str]) -> float:
    """Jobs/s, `POST /v1/jobs:batch` of BATCH jobs a request, one after another."""
    with httpx.Client(base_url=url, headers=headers, timeout=120) as http:
        def post(chunk: list[str]) -> None:
            r = http.post("/v1/jobs:batch", json={"model": MODEL, "jobs": [
                {"task": "sentiment", "input": {"text": t}} for t in chunk]})
            if r.status_code != 201:
                raise RuntimeError(f"batch submit answered {r.status_code}: {r.text[:300]}")

        post([f"warm {i}" for i in range(50)])
        t0 = time.perf_counter()
        for i in range(0, len(items), BATCH):
            post(items[i:i + BATCH])
        return round(len(items) / (time.perf_counter() - t0), 1)


def sdk_batch(model: llmos.Model, items: list[str]) -> float:
    """Jobs/s, `Model.submit_many` of BATCH jobs a call, one after another."""
    model.submit_many([llmos.SentimentTask(text=f"warm {i}") for i in range(50)])
    t0 = time.perf_counter()
    for i in range(0, len(items), BATCH):
        model.submit_many([llmos.SentimentTask(text=t) for t in items[i:i + BATCH]])
    return round(len(items) / (time.perf_counter() - t0), 1)


def summary(engine, ids: list[str], lat_ms: list[float], elapsed: float) -> dict:
    """Client-side rate and latency, and the table's split of the same jobs (queue wait, compute)."""
    jobs = manager.get_jobs(engine, ids, tenant=manager.ANY_TENANT).values()
    return {"jobs": len(lat_ms), "jobs_per_s": round(len(lat_ms) / elapsed, 1),
            "p50_ms": pct(lat_ms, 0.5), "p95_ms": pct(lat_ms, 0.95),
            "queue_wait_p50_ms": pct([j.queue_wait_ms for j in jobs], 0.5),
            "compute_p50_ms": pct([j.compute_ms for j in jobs], 0.5),
            "mean_batch_size": round(statistics.mean(j.batch_size for j in jobs), 1)}


async def api_load(engine, url: str, headers: dict, clients: int, per_client: int, seconds: float) -> dict:
    """`clients` concurrent loops of submit -> long poll until final, through one AsyncClient."""
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    lat: list[float] = []
    ids: list[str] = []
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=90) as http:
        stop_at = time.monotonic() + seconds

        async def loop(c: int) -> None:
            for i in range(per_client):
                if time.monotonic() > stop_at:
                    return
                t0 = time.perf_counter()
                r = await http.post("/v1/jobs", json=body(f"client {c} job {i}"))
                if r.status_code != 201:
                    raise RuntimeError(f"submit answered {r.status_code}: {r.text[:300]}")
                job = r.json()
                while job["status"] not in FINAL:
                    job = (await http.get(f"/v1/jobs/{job['id']}/wait", params={"timeout": 60})).json()
                if job["status"] != "succeeded":
                    raise RuntimeError(f"job {job['id']} ended {job['status']}: {job.get('error')}")
                lat.append((time.perf_counter() - t0) * 1000)
                ids.append(job["id"])

        t0 = time.perf_counter()
        await asyncio.gather(*(loop(c) for c in range(clients)))
        elapsed = time.perf_counter() - t0
    return summary(engine, ids, lat, elapsed)


def sdk_load(model: llmos.Model, clients: int, per_client: int, seconds: float) -> dict:
    """The same load through the direct SDK: `clients` threads looping submit -> `result()`.

    (What `Model.execute` does when a worker serves the model, keeping the job's id.)
    """
    lat: list[float] = []
    ids: list[str] = []
    stop_at = time.monotonic() + seconds

    def loop(c: int) -> None:
        for i in range(per_client):
            if time.monotonic() > stop_at:
                return
            t0 = time.perf_counter()
            handle = model.submit(llmos.SentimentTask(text=f"client {c} job {i}"))
            handle.result(timeout=60)  # raises unless it succeeded
            lat.append((time.perf_counter() - t0) * 1000)
            ids.append(handle.id)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(loop, range(clients)))  # re-raises the first failure
    return summary(model.client.engine, ids, lat, time.perf_counter() - t0)


def median_ratio(a: list[float], b: list[float]) -> float:
    return round(statistics.median(x / y for x, y in zip(a, b)), 3)


def run(args: argparse.Namespace, workdir: Path) -> dict:
    import transformers

    transformers.utils.logging.disable_progress_bar()
    folder = build_distilbert(workdir / "tiny-sst2", "classifier")
    config = write_config(workdir / "llmos.toml", {MODEL: {"source": str(folder), "kind": "classifier",
                                                           "tasks": ["sentiment"]}})
    env = Env(workdir)
    try:
        env.reset()
        api, url = start_api(env, config)
        _, key = manager.create_api_key(get_engine(env.db_url), tenant="bench", name="benchmarks/api.py")
        headers = {"Authorization": f"Bearer {key}"}
        single, many = texts(args.n), texts(5 * args.n)
        sub = {k: [] for k in ("api_single", "sdk_single", "api_batch", "sdk_batch")}
        cpu = {"single": [], "batch": [], "load": []}  # the API process's CPU ms per job
        with llmos.Client(env.settings(config)) as client, warnings.catch_warnings():
            warnings.simplefilter("ignore", llmos.NoWorkerWarning)  # no worker, on purpose
            model = client.load_model(MODEL)
            for _ in range(args.passes):
                env.reset()
                c0 = cpu_s(api.pid)
                sub["api_single"].append(api_single(url, headers, single, args.submit_threads))
                cpu["single"].append((cpu_s(api.pid) - c0) * 1000 / (len(single) + 2 * args.submit_threads))
                env.reset()
                sub["sdk_single"].append(sdk_single(model, single, args.submit_threads))
                env.reset()
                c0 = cpu_s(api.pid)
                sub["api_batch"].append(api_batch(url, headers, many))
                cpu["batch"].append((cpu_s(api.pid) - c0) * 1000 / (len(many) + 50))
                env.reset()
                sub["sdk_batch"].append(sdk_batch(model, many))

        env.reset()
        worker = env.worker(MODEL, config)
        per_client = max(1, args.n // args.clients)
        lat = {"api": [], "sdk": []}
        with llmos.Client(env.settings(config)) as client:
            model = client.load_model(MODEL)
            asyncio.run(api_load(client.engine, url, headers, args.clients, 2, 30))  # warm: the worker, both paths
            sdk_load(model, args.clients, 2, 30)
            for _ in range(args.passes):
                c0 = cpu_s(api.pid)
                lat["api"].append(asyncio.run(api_load(client.engine, url, headers, args.clients, per_client, args.seconds)))
                cpu["load"].append((cpu_s(api.pid) - c0) * 1000 / lat["api"][-1]["jobs"])
                lat["sdk"].append(sdk_load(model, args.clients, per_client, args.seconds))
        env.stop(worker)
        env.stop(api)
    finally:
        env.close()

    def med(rows: list[dict], key: str) -> float:
        return round(statistics.median(r[key] for r in rows), 1)

    out = {"where": env.where, "cpu_threads": os.cpu_count(), "n": args.n, "batch_n": 5 * args.n,
           "batch_size": BATCH, "submit_threads": args.submit_threads, "clients": args.clients,
           "seconds": args.seconds, "passes": args.passes, "model": "tiny DistilBERT classifier (random weights)"}
    for k, v in sub.items():
        out[f"{k}_jobs_per_s"] = round(statistics.median(v), 1)
        out[f"{k}_passes"] = v
    out["single_ratio_api_vs_sdk"] = median_ratio(sub["api_single"], sub["sdk_single"])
    out["batch_ratio_api_vs_sdk"] = median_ratio(sub["api_batch"], sub["sdk_batch"])
    for side, rows in lat.items():
        out[f"{side}_latency"] = {**{k: med(rows, k) for k in rows[0] if k != "jobs"}, "passes": rows}
    for k, v in cpu.items():
        out[f"api_cpu_ms_per_job_{k}"] = round(statistics.median(v), 2)
    out["load_ratio_api_vs_sdk"] = median_ratio([r["jobs_per_s"] for r in lat["api"]],
                                                [r["jobs_per_s"] for r in lat["sdk"]])
    return out


def print_table(r: dict) -> None:
    rows = [("", "REST API", "direct SDK", "API / SDK"),
            (f"submit, 1 job a call ({r['submit_threads']} threads), jobs/s", r["api_single_jobs_per_s"],
             r["sdk_single_jobs_per_s"], r["single_ratio_api_vs_sdk"]),
            (f"submit, {r['batch_size']} jobs a call, jobs/s", r["api_batch_jobs_per_s"],
             r["sdk_batch_jobs_per_s"], r["batch_ratio_api_vs_sdk"])]
    a, s = r["api_latency"], r["sdk_latency"]
    rows += [(f"{r['clients']} clients submit+wait, jobs/s", a["jobs_per_s"], s["jobs_per_s"], r["load_ratio_api_vs_sdk"]),
             ("  end-to-end latency p50, ms", a["p50_ms"], s["p50_ms"], ""),
             ("  end-to-end latency p95, ms", a["p95_ms"], s["p95_ms"], ""),
             ("  queue wait p50 (table), ms", a["queue_wait_p50_ms"], s["queue_wait_p50_ms"], ""),
             ("  compute p50 (table), ms", a["compute_p50_ms"], s["compute_p50_ms"], ""),
             ("  mean batch size", a["mean_batch_size"], s["mean_batch_size"], ""),
             ("API process CPU ms a job: 1 a call / batch / submit+wait",
              f"{r['api_cpu_ms_per_job_single']} / {r['api_cpu_ms_per_job_batch']} / {r['api_cpu_ms_per_job_load']}", "", "")]
    width = max(len(row[0]) for row in rows)
    print(f"\n{r['where']}, {r['cpu_threads']} CPU threads, {r['model']}, medians of {r['passes']} passes, "
          f"{r['wall_s']} s in all")
    for name, *cells in rows:
        print(f"{name:<{width}}  " + "  ".join(f"{str(c):>10}" for c in cells))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000,
                    help="jobs submitted one a request (5x in batches); most jobs of a latency run (default 2000)")
    ap.add_argument("--clients", type=int, default=50, help="concurrent clients of the latency runs (default 50)")
    ap.add_argument("--seconds", type=float, default=8.0, help="longest latency run, each (default 8)")
    ap.add_argument("--passes", type=int, default=3, help="API/SDK pairs of each measurement (default 3)")
    ap.add_argument("--submit-threads", type=int, default=8, help="threads of the one-job submits (default 8)")
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    args = ap.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="llmos-bench-api-") as tmp:
        report = run(args, Path(tmp))
    report["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    print_table(report)


if __name__ == "__main__":
    main()
