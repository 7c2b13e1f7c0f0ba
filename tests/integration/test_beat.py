"""The nightly schedule end to end: a real `llmos beat` process ticking every second over a
folder, a real minilm worker, Postgres and Redis. A file dropped in the folder becomes one batch
on the next tick and its results appear beside it, every line once; later ticks leave it alone;
a second file gets its own batch."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmos import batches
from llmos.sdk import Client
from tests.helpers import REPO

pytestmark = pytest.mark.integration

TICK = re.compile(r"action=nightly_tick (.*)$")


class Beat:
    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "llmos.cli", "beat"], env=env, cwd=REPO,
                                     stdout=self._log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def ticks(self) -> list[dict[str, str]]:
        """The summary line of every tick so far, as key=value fields."""
        out = []
        for line in self.log().splitlines():
            m = TICK.search(line)
            if m:
                out.append(dict(kv.split("=", 1) for kv in m.group(1).split()))
        return out

    def wait_for(self, what, check, timeout: float = 120.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"beat exited with {self.proc.returncode} waiting for {what}:\n{self.log()}")
            value = check()
            if value:
                return value
            time.sleep(0.2)
        raise AssertionError(f"no {what} after {timeout} s:\n{self.log()[-5000:]}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def drop(folder: Path, name: str, ids: list[str]) -> Path:
    """Write a plain-lines file under a hidden name, then rename it in (as a careful producer does)."""
    tmp = folder / f".{name}.part"
    tmp.write_text("".join(json.dumps({"id": i, "text": f"review {i}: I love it"}) + "\n" for i in ids))
    path = folder / name
    tmp.rename(path)
    return path


def read_results(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def beat(services, pg_worker, tmp_path):
    settings, env = services
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    cfg = tmp_path / "llmos.toml"
    cfg.write_text(f'''
[[schedule]]
name = "nightly"
every_s = 1
input_dir = "{inbox}"
task = "sentiment"
model = "minilm"
settle_s = 0
''')
    home = tmp_path / "beat-home"
    proc = Beat(dict(env, LLMOS_CONFIG=str(cfg), LLMOS_HOME=str(home)), tmp_path / "beat.log")
    try:
        yield proc, inbox, home, settings
    finally:
        proc.stop()


def test_beat_turns_each_new_file_into_one_batch_and_writes_its_results(beat):
    proc, inbox, home, settings = beat
    proc.wait_for("first tick", lambda: proc.ticks())  # beat is up and ticking over an empty folder
    ids = [f"r{i}" for i in range(5)]
    drop(inbox, "a.jsonl", ids)
    results = inbox / "a.results.jsonl"
    proc.wait_for("results of a.jsonl", results.exists)
    records = read_results(results)
    assert [r["id"] for r in records] == ids  # every line once, in input order
    assert all(r["error"] is None and r["result"]["label"] in ("POSITIVE", "NEGATIVE") for r in records), records
    body = results.read_bytes()

    seen = len(proc.ticks())
    proc.wait_for("two more ticks", lambda: len(proc.ticks()) >= seen + 2)
    with Client(settings) as client:
        named = [b for b in batches.list_batches(client, limit=100) if b.name == "nightly:a.jsonl"]
        assert len(named) == 1 and named[0].status == "completed"
        assert named[0].request_counts.total == len(ids) and named[0].request_counts.completed == len(ids)
    assert results.read_bytes() == body  # not written again
    assert all(t["submitted"] == "0" and t["written"] == "0" for t in proc.ticks()[seen:])

    drop(inbox, "b.jsonl", ["s1", "s2"])
    proc.wait_for("results of b.jsonl", (inbox / "b.results.jsonl").exists)
    assert [r["id"] for r in read_results(inbox / "b.results.jsonl")] == ["s1", "s2"]
    with Client(settings) as client:
        names = sorted(b.name for b in batches.list_batches(client, limit=100) if b.name.startswith("nightly:"))
    assert names == ["nightly:a.jsonl", "nightly:b.jsonl"]
    assert results.read_bytes() == body
    summary = proc.ticks()
    assert sum(int(t["submitted"]) for t in summary) == 2 and sum(int(t["written"]) for t in summary) == 2
    assert sorted(p.name for p in inbox.iterdir()) == ["a.jsonl", "a.results.jsonl", "b.jsonl", "b.results.jsonl"]

    assert proc.stop() == 0, proc.log()[-3000:]
    assert any(p.name.startswith("celerybeat-schedule") for p in home.iterdir())  # beat's state under LLMOS_HOME


def test_beat_stops_at_start_on_a_bad_schedule(services, tmp_path):
    _, env = services
    cfg = tmp_path / "llmos.toml"
    cfg.write_text(f'[[schedule]]\nname = "n"\ncron = "0 26 * * *"\ninput_dir = "{tmp_path}"\n')
    done = subprocess.run([sys.executable, "-m", "llmos.cli", "beat"], env=dict(env, LLMOS_CONFIG=str(cfg)),
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "error:" in done.stderr and "its hour field '26' is invalid" in done.stderr
