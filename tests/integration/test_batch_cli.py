"""`llmos batch` as a user runs it on a nightly file: a 10,000-line plain file through
`llmos batch submit --wait` (a real CLI process, a real minilm worker, Postgres and Redis), the CLI
SIGKILLed halfway, the same command run again, and `llmos batch results` has every line once."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import sqlalchemy as sa

from llmos import manager
from llmos.db import batch_lines, batches, get_engine
from tests.helpers import REPO

pytestmark = pytest.mark.integration

LINES = 10_000
LLMOS = [sys.executable, "-m", "llmos.cli"]


def lines_recorded(engine, name) -> tuple[str | None, int]:
    """(the batch's id, its lines recorded so far) by its name."""
    with engine.connect() as conn:
        batch_id = conn.execute(sa.select(batches.c.id).where(batches.c.name == name)).scalar()
        if batch_id is None:
            return None, 0
        return batch_id, conn.execute(sa.select(sa.func.count()).select_from(batch_lines)
                                      .where(batch_lines.c.batch_id == batch_id)).scalar()


def test_a_killed_submit_run_again_has_every_line_once(services, pg_worker, tmp_path):
    settings, env = services
    engine = get_engine(settings.db_url)
    env = {**env, "LLMOS_BATCH_CHUNK_LINES": "500", "COLUMNS": "200"}
    moods = ["I love this, it works great", "Terrible, it broke on day one", "Pretty good value overall",
             "Awful support, never again"]
    path = tmp_path / "reviews.jsonl"
    with open(path, "w") as f:
        for i in range(LINES):
            f.write(json.dumps({"id": f"r{i}", "text": f"{moods[i % 4]} (#{i})"}) + "\n")
    command = LLMOS + ["batch", "submit", str(path), "--task", "sentiment", "--model", "minilm",
                       "--priority", "batch", "--name", "nightly-reviews", "--wait"]

    first = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    batch_id, recorded = None, 0
    while recorded < LINES // 2:  # halfway through its lines
        assert first.poll() is None, f"the CLI ended before it was killed: {first.communicate()}"
        assert time.monotonic() < deadline, "the CLI did not get halfway in 120 s"
        time.sleep(0.05)
        batch_id, recorded = lines_recorded(engine, "nightly-reviews")
    first.kill()  # SIGKILL: no cleanup of any kind
    first.communicate()
    assert first.returncode == -9

    again = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "completed" in again.stdout and batch_id in again.stdout, again.stdout

    out = tmp_path / "results.jsonl"
    res = subprocess.run(LLMOS + ["batch", "results", "nightly-reviews", "-o", str(out)], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(LINES)]  # every line once, in input order
    assert all(r["error"] is None and r["result"]["label"] in ("POSITIVE", "NEGATIVE") for r in rows)
    assert rows[0]["result"]["label"] == "POSITIVE" and rows[1]["result"]["label"] == "NEGATIVE"
    assert len(manager.batch_job_ids(engine, batch_id, tenant=manager.ANY_TENANT)) == LINES  # no job twice

    status = subprocess.run(LLMOS + ["batch", "status", batch_id, "--json"], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    summary = json.loads(status.stdout)
    assert (summary["status"], summary["total"], summary["completed"], summary["failed"]) == (
        "completed", LINES, LINES, 0)

    not_yet = subprocess.run(LLMOS + ["batch", "results", "no-such-batch", "-o", str(tmp_path / "x")], env=env,
                             cwd=REPO, capture_output=True, text=True, timeout=60)
    assert not_yet.returncode == 2 and "Traceback" not in not_yet.stderr and "no batch" in not_yet.stderr
