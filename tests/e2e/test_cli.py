"""The `llmos` command as a user runs it: demo, up + submit from another process, errors."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from llmos.settings import Settings
from tests.helpers import REPO, service_env

pytestmark = pytest.mark.e2e

LLMOS = [sys.executable, "-m", "llmos.cli"]


def run(args, env, timeout=300, cwd=None):
    return subprocess.run(LLMOS + args, env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=cwd or REPO)


def test_demo_prints_sensible_labels(tmp_path):
    env = service_env(LLMOS_HOME=str(tmp_path / "home"), COLUMNS="250")
    res = run(["demo"], env)
    assert res.returncode == 0, res.stdout + res.stderr
    rows = {}
    for line in res.stdout.splitlines():
        cells = [c.strip() for c in line.split("│")]
        if len(cells) > 5 and cells[1].isdigit():
            rows[int(cells[1])] = cells
    assert len(rows) == 36
    assert rows[1][2] == "POSITIVE" and rows[1][5].startswith("I absolutely love this phone")
    assert rows[2][2] == "NEGATIVE" and rows[2][5].startswith("Terrible customer service")
    assert "72 jobs (36 sentiment + 36 embed, 384-dim vectors)" in res.stdout
    # the stack was shut down: no socket left
    assert not Settings(home=tmp_path / "home").redis_socket.exists()


def test_demo_against_postgres_and_redis(services, tmp_path):
    settings, env = services
    env = dict(env, LLMOS_HOME=str(tmp_path / "h"), COLUMNS="250")
    res = run(["demo"], env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "72 jobs" in res.stdout and "POSITIVE" in res.stdout and "NEGATIVE" in res.stdout
    assert not (tmp_path / "h" / "llmos.db").exists()  # the Postgres table was used, not SQLite


def test_up_then_submit_from_another_terminal(tmp_path):
    home = tmp_path / "home"
    env = service_env(LLMOS_HOME=str(home))
    up = subprocess.Popen(LLMOS + ["up", "--no-api"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, cwd=REPO)
    try:
        seen = ""
        deadline = time.monotonic() + 180
        while "Ctrl-C stops everything" not in seen:
            line = up.stdout.readline()
            assert line or up.poll() is None, seen
            seen += line
            assert time.monotonic() < deadline, seen
        assert "embedded" in seen and "minilm" in seen
        # another process, same LLMOS_HOME, no other setting
        res = run(["submit", "sentiment", "This is the best purchase I have made all year!"], env)
        assert res.returncode == 0, res.stderr
        out = json.loads(res.stdout)
        assert out["status"] == "succeeded" and out["result"]["label"] == "POSITIVE"
        shown = run(["job", out["id"]], env)
        row = json.loads(shown.stdout)
        assert row["status"] == "succeeded" and row["batch_size"] >= 1 and row["compute_ms"] > 0
        queued = json.loads(run(["submit", "embed", "one", "two", "--no-wait"], env).stdout)
        assert queued["status"] == "queued"
    finally:
        up.send_signal(signal.SIGINT)
        rest, _ = up.communicate(timeout=60)
    assert up.returncode == 0, seen + rest
    assert "stopped" in rest
    assert not Settings(home=home).redis_socket.exists()


@pytest.mark.parametrize("args,message", [
    (["submit", "sentiment", "hi", "--model", "gpt9"], "unknown model 'gpt9'; known models: dialogpt, distilbart"),
    (["submit", "poetry", "hi"], "unknown task type 'poetry'"),
    (["submit", "writing", "hi", "--set", "max_new_tokens=0"], "max_new_tokens"),
    (["submit", "sentiment", "hi", "--set", "nope"], "--set takes key=value"),
    (["submit", "sentiment", ""], "invalid sentiment task: text"),
    (["submit", "sentiment", "hi", "--priority", "urgent"], "unknown priority 'urgent'"),
    (["submit", "sentiment", "hi", "--priority", "²"], "unknown priority '²'"),
    (["submit", "writing", "hi", "--set", "stop=" + "[" * 50_000 + "]" * 50_000],
     "--set stop: the JSON value is nested more than 32 levels deep"),
    (["submit", "writing", "hi", "--set", "stop=" + "[" * 33 + "]" * 33], "nested more than 32 levels deep"),
    (["submit", "sentiment", b"caf\xe9"], "text: Value error, contains U+DCE9 at position 3, which cannot be stored"),
    (["submit", "sentiment", "hi"], "cannot reach Redis at unix://"),
    (["up", "--model", "nope"], "unknown model 'nope'"),
])
def test_bad_input_is_one_clear_line(tmp_path, args, message):
    res = run(args, service_env(LLMOS_HOME=str(tmp_path / "home"), COLUMNS="300"), timeout=60)
    assert res.returncode == 2
    assert message in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_worker_with_unreachable_database_exits_with_clear_error(tmp_path, redis_url):
    env = service_env(LLMOS_HOME=str(tmp_path), LLMOS_REDIS_URL=redis_url, COLUMNS="300",
                      LLMOS_DATABASE_URL="postgresql://postgres@127.0.0.1:1/none")
    res = run(["worker", "--model", "minilm"], env, timeout=60)
    assert res.returncode == 2
    assert "cannot reach the database at postgresql+psycopg://postgres@127.0.0.1:1/none" in res.stderr


def test_models_list_shows_builtin_and_configured(tmp_path):
    (tmp_path / "llmos.toml").write_text('[models.my-encoder]\nsource = "/srv/models/enc"\ntasks = ["embed"]\n')
    res = run(["models", "list"], service_env(LLMOS_HOME=str(tmp_path / "h"), COLUMNS="250"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    names = {line.split("│")[1].strip() for line in res.stdout.splitlines() if line.startswith("│")}
    assert names == {"minilm", "gpt2", "dialogpt", "distilbart", "opus-mt-en-zh", "opus-mt-en-de",
                     "sst2", "squad", "gpt3", "my-encoder"}
    assert "sshleifer/distilbart-cnn-12-6" in res.stdout and "(not configured)" in res.stdout


def test_models_show_and_where_loaded(services, tmp_path, pg_worker):
    settings, env = services
    res = run(["models", "show", "minilm"], dict(env, COLUMNS="250"))
    data = json.loads(res.stdout)
    assert data["tasks"] == ["embed", "sentiment", "summarize"] and data["memory_need_mb"] > 50
    assert data["loaded_on"] == [f"cpu@{os.uname().nodename}:{pg_worker.proc.pid}"]


def test_models_pull_offline_says_how_to_use_a_folder(tmp_path):
    res = run(["models", "pull", "gpt2"], service_env(LLMOS_HOME=str(tmp_path), COLUMNS="400"))
    assert res.returncode == 2
    assert "cannot download 'distilbert/distilgpt2' for model 'gpt2': the Hugging Face hub cannot be reached" in res.stderr
    assert 'set source = "/path/to/folder" under [models.gpt2] in llmos.toml' in res.stderr


def test_gpt3_unconfigured_is_refused_at_submit(tmp_path):
    res = run(["submit", "writing", "hello", "--model", "gpt3"], service_env(LLMOS_HOME=str(tmp_path), COLUMNS="400"))
    assert res.returncode == 2 and "has no OpenAI-compatible endpoint configured" in res.stderr
    assert "LLMOS_OPENAI_BASE_URL" in res.stderr
