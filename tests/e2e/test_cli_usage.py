"""The `llmos` command's first minutes, as a user runs it: usage errors, help, tables, --json,
"no worker serves this model", cancel of an ended job, times and durations of `llmos job`."""

import json
import re
import subprocess
import sys

import pytest

from llmos import manager
from llmos.db import get_engine, workers
from tests.helpers import REPO, service_env

pytestmark = pytest.mark.e2e

LLMOS = [sys.executable, "-m", "llmos.cli"]
MODELS = {"minilm", "gpt2", "dialogpt", "distilbart", "opus-mt-en-zh", "opus-mt-en-de", "sst2", "squad", "gpt3"}
ISO_WITH_OFFSET = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?[+-]\d\d:\d\d$")


def run(args, env, timeout=60):
    return subprocess.run(LLMOS + args, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


@pytest.fixture
def home_env(tmp_path):
    """A fresh LLMOS_HOME (embedded settings, nothing started), output piped in 80 columns."""
    return service_env(LLMOS_HOME=str(tmp_path / "home"), COLUMNS="80")


@pytest.fixture
def pg_env(services):
    """The machine's Postgres and Redis (this module's database), no worker running."""
    settings, env = services
    with get_engine(settings.db_url).begin() as conn:  # no worker row of an earlier test
        conn.execute(workers.delete())
    return settings, dict(env, COLUMNS="80")


@pytest.mark.parametrize("args,usage,problem", [
    (["nosuch"], "Usage: llmos [OPTIONS] COMMAND [ARGS]...", "Error: No such command 'nosuch'."),
    (["submit", "sentiment", "hi", "--priority"], "Usage: llmos submit [OPTIONS]",
     "Error: Option '--priority' requires an argument."),
    (["submit", "sentiment", "hi", "--bogus"], "Usage: llmos submit [OPTIONS]", "Error: No such option: --bogus"),
    (["models", "show"], "Usage: llmos models show [OPTIONS] {NAME}", "Error: Missing argument 'NAME'."),
])
def test_a_usage_error_prints_the_usage_line_and_the_problem(home_env, args, usage, problem):
    res = run(args, home_env)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.splitlines()
    assert lines[0].startswith(usage) and lines[-1] == problem, res.stderr
    assert "Traceback" not in res.stderr and "│" not in res.stderr and res.stdout == ""


@pytest.mark.parametrize("args", [["--help"], ["submit", "--help"], ["job", "--help"], ["cancel", "--help"],
                                  ["models", "list", "--help"]])
def test_help_is_clean(home_env, args):
    res = run(args, home_env)
    assert res.returncode == 0, res.stderr
    assert "  --help  " in res.stdout or "  --help   " in res.stdout
    assert "<bool>" not in res.stdout and "Traceback" not in res.stdout
    if args != ["--help"]:
        assert "--json" in res.stdout


def test_models_list_never_cuts_a_name_in_80_columns(home_env):
    res = run(["models", "list"], home_env)
    assert res.returncode == 0, res.stderr
    assert max(len(line) for line in res.stdout.splitlines()) <= 80
    names = [line.split("│")[1].strip() for line in res.stdout.splitlines() if line.startswith("│")]
    names = [n for n in names if n]  # a row's folded lines leave the name cell empty
    assert sorted(names) == sorted(MODELS) and "…" not in res.stdout


def test_models_list_and_show_as_json(home_env):
    res = run(["models", "list", "--json"], home_env)
    assert res.returncode == 0, res.stderr
    assert len(res.stdout.splitlines()) == 1
    entries = {e["name"]: e for e in json.loads(res.stdout)}
    assert set(entries) == MODELS
    assert entries["distilbart"]["source"] == "sshleifer/distilbart-cnn-12-6"
    assert entries["minilm"]["loaded_on"] == [] and entries["minilm"]["memory_need_mb"] > 50
    shown = run(["models", "show", "distilbart", "--json"], home_env)
    assert shown.returncode == 0 and len(shown.stdout.splitlines()) == 1
    assert json.loads(shown.stdout) == entries["distilbart"]


def test_submit_and_job_say_no_worker_serves_the_model(pg_env):
    settings, env = pg_env
    res = run(["submit", "writing", "hi", "-m", "gpt2", "--no-wait", "--json"], env)
    assert res.returncode == 0, res.stderr
    queued = json.loads(res.stdout)
    assert queued["status"] == "queued" and len(res.stdout.splitlines()) == 1
    assert "no live worker serves model 'gpt2'; start one with `llmos worker --model gpt2` (or `llmos up -m gpt2`)" \
        in " ".join(res.stderr.split())
    assert queued["id"] in res.stderr
    shown = run(["job", queued["id"]], env)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["status"] == "queued"
    assert "no live worker serves model 'gpt2'" in shown.stderr
    # once a worker serves gpt2, neither says it
    manager.register_worker(get_engine(settings.db_url), worker_id="w-gpt2", host="h", pid=1,
                            model="gpt2", device="cpu")
    again = run(["submit", "writing", "hi", "-m", "gpt2", "--no-wait"], env)
    assert again.returncode == 0 and again.stderr == ""
    assert run(["job", json.loads(again.stdout)["id"]], env).stderr == ""


def test_job_times_have_an_offset_and_durations_are_rounded(pg_env):
    settings, env = pg_env
    job_id = finished_job(settings, queue_wait_ms=16.136000000000003, compute_ms=2.04999)
    res = run(["job", job_id, "--json"], env)
    assert res.returncode == 0, res.stderr
    assert len(res.stdout.splitlines()) == 1
    row = json.loads(res.stdout)
    assert row["queue_wait_ms"] == 16.1 and row["compute_ms"] == 2.0
    for key in ("created_at", "queued_at", "started_at", "finished_at"):
        assert ISO_WITH_OFFSET.match(row[key]), (key, row[key])
    assert json.loads(run(["job", job_id], env).stdout) == row  # indented, the same values


def test_cancel_says_why_it_did_nothing_and_exits_non_zero(pg_env):
    settings, env = pg_env
    job_id = finished_job(settings)
    res = run(["cancel", job_id, "--json"], env)
    assert res.returncode == 1
    out = json.loads(res.stdout)
    assert out["cancelled"] is False and out["status"] == "succeeded"
    finished = manager.get_job(get_engine(settings.db_url), job_id, tenant=manager.ANY_TENANT).finished_at
    assert out["reason"] == f"already succeeded at {manager.as_utc(finished).isoformat()}"
    assert res.stderr == f"job {job_id} not cancelled: {out['reason']}\n"
    plain = run(["cancel", job_id], env)
    assert plain.returncode == 1 and plain.stdout == "" and plain.stderr == res.stderr
    queued = [json.loads(run(["submit", "sentiment", "hi", "--no-wait"], env).stdout)["id"] for _ in range(2)]
    done = run(["cancel", queued[0], "--json"], env)
    assert done.returncode == 0 and json.loads(done.stdout) == {"id": queued[0], "cancelled": True}
    said = run(["cancel", queued[1]], env)
    assert said.returncode == 0 and said.stdout == f"cancelled job {queued[1]}\n"


def test_submit_json_prints_a_job_not_done_in_time(pg_env):
    settings, env = pg_env
    res = run(["submit", "sentiment", "hi", "--timeout", "0.2", "--json"], env)
    assert res.returncode == 2
    out = json.loads(res.stdout)
    assert out["status"] == "queued" and f"job {out['id']} still queued after 0.2 s" in out["error"]
    assert "error: job " in res.stderr


def finished_job(settings, queue_wait_ms=1.0, compute_ms=1.0) -> str:
    """A sentiment job that succeeded, finished through the manager as a worker would."""
    engine = get_engine(settings.db_url)
    ((job, _),) = manager.create_jobs(engine, [manager.NewJob(model="minilm", task_type="sentiment",
                                                              input={"text": "hi"}, priority=5)])
    manager.claim(engine, [job.id], worker_id="w", device="cpu")
    manager.finish(engine, [manager.Outcome(job_id=job.id, worker_id="w", attempt=1,
                                            result={"label": "POSITIVE", "score": 0.9},
                                            queue_wait_ms=queue_wait_ms, compute_ms=compute_ms)])
    return job.id
