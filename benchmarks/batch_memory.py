"""A 100,000-line batch file uploaded and its batch created: the API process's peak memory.

    .venv/bin/python benchmarks/batch_memory.py [--lines 100000] [--text-words 40] [--out r.json]

One `llmos api` process (uvicorn, one process) on a free loopback port over a fresh Postgres
database and Redis (as benchmarks/run.py's Env: db 12 unless BENCH_REDIS_URL), no worker (the jobs
stay queued: what is measured is the upload and the creation). The official `openai` package, as
a user would: `files.create(purpose="batch")` of a JSONL file of `--lines` embedding requests on
minilm (each input `--text-words` words, about 300 bytes a line, ~30 MB in all), then
`batches.create(endpoint="/v1/embeddings")`, then `batches.retrieve` until the batch leaves
`validating` (every line is then a job in the table and a message in Redis).

Reported: the file's size, upload and creation seconds, the API process's resident memory
(VmRSS) when idle after start and its peak (VmHWM, Linux's high-water mark of resident memory,
read from /proc/PID/status after each step), jobs in the table and in Redis. Target (issue 13):
peak under 300 MB. LLMOS_BATCH_MAX_LINES is raised to `--lines` for the run (the default,
50,000, is OpenAI's). Method and latest figures: docs/batch.md ("Memory").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("BENCH_REDIS_URL", "redis://127.0.0.1:6379/12")

import openai  # noqa: E402
import sqlalchemy as sa  # noqa: E402

from benchmarks.api import start_api  # noqa: E402
from benchmarks.run import Env  # noqa: E402  (run.py clears LLMOS_* first)
from llmos import manager  # noqa: E402
from llmos.db import get_engine, jobs  # noqa: E402

TARGET_MB = 300
WORDS = ("the service was quick and the staff were friendly although the room was small and the "
         "breakfast ran out early on the second day of our stay near the old harbour").split()


def status_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, kB (Linux /proc/PID/status)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def write_file(path: Path, lines: int, words: int) -> int:
    with path.open("w") as f:
        for i in range(lines):
            text = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(words)) + f" {i}"
            f.write(json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": "/v1/embeddings",
                                "body": {"model": "minilm", "input": text}}) + "\n")
    return path.stat().st_size


def run(args: argparse.Namespace, workdir: Path) -> dict:
    env = Env(workdir)
    os.environ["LLMOS_BATCH_MAX_LINES"] = str(args.lines)  # read by the API process (env.env copies os.environ)
    try:
        env.reset()
        api, url = start_api(env, None)
        _, key = manager.create_api_key(get_engine(env.db_url), tenant="bench", name="benchmarks/batch_memory.py")
        idle = status_kb(api.pid)
        path = workdir / "batch.jsonl"
        size = write_file(path, args.lines, args.text_words)
        client = openai.OpenAI(base_url=url + "/v1", api_key=key, timeout=1800, max_retries=0)
        t0 = time.perf_counter()
        with path.open("rb") as f:
            uploaded = client.files.create(file=f, purpose="batch")
        upload_s = time.perf_counter() - t0
        after_upload = status_kb(api.pid)
        t0 = time.perf_counter()
        batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings",
                                      completion_window="24h")
        while batch.status == "validating":
            time.sleep(0.5)
            batch = client.batches.retrieve(batch.id)
        create_s = time.perf_counter() - t0
        after_create = status_kb(api.pid)
        with get_engine(env.db_url).connect() as c:
            in_table = c.execute(sa.select(sa.func.count()).select_from(jobs)
                                 .where(jobs.c.batch_id == batch.id)).scalar_one()
        import redis

        r = redis.Redis.from_url(env.redis_url)
        pending = sum(r.scard(k) for k in r.scan_iter("llmos:pending:*"))
        env.stop(api)
    finally:
        env.close()
    return {
        "lines": args.lines, "file_mb": round(size / 2**20, 1), "upload_s": round(upload_s, 1),
        "create_s": round(create_s, 1), "batch_status": batch.status,
        "request_counts": batch.request_counts.model_dump() if batch.request_counts else None,
        "jobs_in_table": in_table, "jobs_pending_in_redis": pending,
        "rss_idle_mb": round(idle["VmRSS"] / 1024, 1),
        "peak_after_upload_mb": round(after_upload["VmHWM"] / 1024, 1),
        "peak_after_create_mb": round(after_create["VmHWM"] / 1024, 1),
        "target_mb": TARGET_MB, "met": after_create["VmHWM"] / 1024 < TARGET_MB,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lines", type=int, default=100_000)
    p.add_argument("--text-words", type=int, default=40)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory(prefix="llmos-batchmem-") as d:
        result = run(args, Path(d))
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    print(f"\npeak RSS of the API process: {result['peak_after_create_mb']} MB "
          f"(idle {result['rss_idle_mb']} MB; target < {TARGET_MB} MB: {'met' if result['met'] else 'NOT met'}); "
          f"{result['lines']} lines, {result['file_mb']} MB, upload {result['upload_s']} s, "
          f"creation {result['create_s']} s, {result['jobs_in_table']} jobs in the table")


if __name__ == "__main__":
    main()
