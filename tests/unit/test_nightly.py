"""The nightly schedule's layers alone: [[schedule]] parsing, one tick over a fake of the four
batch functions (the batch layer has its own tests, and test_beat runs the whole thing), and
the beat scheduler running ticks in its own process."""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from pathlib import Path

import pytest
from celery.schedules import crontab, schedule as interval

from llmos.errors import ConfigError, LLMOSError
from llmos.nightly import Ticker, load_schedules, parse_schedules
from llmos.nightly.tick import batch_name, input_files, results_path
from llmos.settings import Settings


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "in").mkdir()
    return tmp_path


def parse(folder: Path, body: str):
    path = folder / "llmos.toml"
    path.write_text(body)
    return parse_schedules(tomllib.loads(body), path, Settings(home=folder / "home"))


ENTRY = 'name = "nightly"\ninput_dir = "in"\n'


def test_defaults_and_relative_folders(folder):
    (s,) = parse(folder, f'[[schedule]]\n{ENTRY}every_s = 2\ntask = "sentiment"\nmodel = "minilm"\n')
    assert (s.name, s.every_s, s.cron, s.task, s.model) == ("nightly", 2.0, None, "sentiment", "minilm")
    assert s.input_dir == (folder / "in").resolve() and s.output_dir == s.input_dir  # beside the input
    assert (s.pattern, s.priority, s.options, s.tenant, s.settle_s) == ("*.jsonl", "batch", {}, None, 5.0)
    assert s.celery_schedule() == interval(2.0)


def test_cron_maps_to_celery_crontab_fields(folder):
    (s,) = parse(folder, f'[[schedule]]\n{ENTRY}cron = "30 2 * * mon-fri"\noutput_dir = "out/done"\n'
                         'priority = "low"\noptions = { max_sentences = 2 }\ntenant = "acme"\n')
    assert s.celery_schedule() == crontab(minute="30", hour="2", day_of_month="*", month_of_year="*",
                                          day_of_week="mon-fri")
    assert s.output_dir == (folder / "out" / "done").resolve() and s.output_dir.is_dir()  # made
    assert (s.priority, s.options, s.tenant) == ("low", {"max_sentences": 2}, "acme")


@pytest.mark.parametrize("cron,message", [
    ("0 2 * *", "cron must be 5 fields (minute hour day-of-month month day-of-week)"),
    ("61 2 * * *", "cron '61 2 * * *': its minute field '61' is invalid"),
    ("0 25 * * *", "its hour field '25' is invalid"),
    ("0 2 * * funday", "its day-of-week field 'funday' is invalid"),
    ("0 0 31 2 *", "cron '0 0 31 2 *' is invalid: Invalid crontab: day_of_month '31' never occurs"),
])
def test_bad_cron_is_a_config_error_naming_the_field(folder, cron, message):
    with pytest.raises(ConfigError, match="llmos.toml: \\[\\[schedule\\]\\] 'nightly': ") as err:
        parse(folder, f'[[schedule]]\n{ENTRY}cron = "{cron}"\n')
    assert message in str(err.value)


@pytest.mark.parametrize("extra,message", [
    ("", "give cron (a 5-field cron expression"),
    ('cron = "0 2 * * *"\nevery_s = 5\n', "one of the two"),
    ("every_s = 0\n", "every_s must be a number of seconds above 0, got 0"),
    ("every_s = true\n", "every_s must be a number of seconds above 0, got True"),
    ('every_s = "5"\n', "every_s must be a number of seconds above 0, got '5'"),
    ('every_s = 1\ntask = "poetry"\n', "unknown task 'poetry'; known: chat, dialogue"),
    ('every_s = 1\nmodel = "gpt9"\n', "unknown model 'gpt9'; known models:"),
    ('every_s = 1\nmodel = "minilm"\ntask = "writing"\n', "model 'minilm' cannot run 'writing' tasks"),
    ('every_s = 1\npriority = "urgent"\n', "priority: unknown priority 'urgent'"),
    ('every_s = 1\npriority = "high"\n', "priority: a batch runs at normal (5) or lower, got 'high'"),
    ('every_s = 1\noptions = 3\n', "options must be a table of task options"),
    ('every_s = 1\npattern = "sub/*.jsonl"\n', "pattern must be a file name pattern"),
    ('every_s = 1\nsettle_s = -1\n', "settle_s must be a number of seconds, 0 or more"),
    ('every_s = 1\nfolder = "x"\n', "unknown key(s) folder; known: name, cron, every_s"),
])
def test_bad_entries_are_config_errors(folder, extra, message):
    with pytest.raises(ConfigError) as err:
        parse(folder, f"[[schedule]]\n{ENTRY}{extra}")
    assert message in str(err.value) and "'nightly'" in str(err.value)


def test_missing_input_folder(folder):
    with pytest.raises(ConfigError, match=r"input_dir .*/nope is not a folder \(create it, or fix the path\)"):
        parse(folder, '[[schedule]]\nname = "n"\ninput_dir = "nope"\nevery_s = 1\n')


def test_names_are_required_and_unique(folder):
    with pytest.raises(ConfigError, match=r"\[\[schedule\]\] #1: name must be"):
        parse(folder, '[[schedule]]\ninput_dir = "in"\nevery_s = 1\n')
    with pytest.raises(ConfigError, match="two \\[\\[schedule\\]\\] entries are named 'n'"):
        parse(folder, '[[schedule]]\nname = "n"\ninput_dir = "in"\nevery_s = 1\n' * 2)
    with pytest.raises(ConfigError, match=r"write \[\[schedule\]\], not \[schedule\]"):
        parse(folder, '[schedule]\nname = "n"\n')


def test_load_needs_a_file_with_a_schedule(folder, monkeypatch):
    monkeypatch.chdir(folder)
    with pytest.raises(ConfigError, match="no configuration file"):
        load_schedules(Settings(home=folder / "home"))
    (folder / "llmos.toml").write_text('[models.m]\nsource = "x"\ntasks = ["embed"]\n')
    with pytest.raises(ConfigError, match="has no \\[\\[schedule\\]\\] entry"):
        load_schedules(Settings(home=folder / "home"))
    (folder / "llmos.toml").write_text(f'[[schedule]]\n{ENTRY}every_s = 1\n')
    assert [s.name for s in load_schedules(Settings(home=folder / "home"))] == ["nightly"]


# -- one tick, over a fake of the batch functions --------------------------------------------


@dataclasses.dataclass(frozen=True)
class Info:
    id: str
    name: str
    status: str
    request_counts: dict


class FakeBatches:
    """The four batch functions over a dict: a batch is final once `finish(name)` says so."""

    def __init__(self):
        self.by_name: dict[tuple[str | None, str], Info] = {}
        self.submits: list[tuple[str, dict]] = []
        self.fail_next_submit = False

    def submit_file(self, client, path, *, name, task=None, model=None, priority=None, options=None,
                    tenant=None, retry_failed=False):
        self.submits.append((name, dict(task=task, model=model, priority=priority, options=options,
                                        tenant=tenant)))
        if self.fail_next_submit:
            self.fail_next_submit = False
            raise LLMOSError("database went away")
        lines = len(path.read_text().splitlines())
        info = self.by_name.get((tenant, name)) or Info(f"b{len(self.by_name)}", name, "in_progress",
                                                        {"total": lines, "completed": 0, "failed": 0})
        self.by_name[(tenant, name)] = info
        return info

    def find_batch(self, client, name, *, tenant=None):
        return self.by_name.get((tenant, name))

    def batch_info(self, client, batch_id, *, tenant=None):
        return next(i for i in self.by_name.values() if i.id == batch_id)

    def write_results(self, client, batch_id, out, *, tenant=None):
        info = self.batch_info(client, batch_id)
        assert info.status == "completed"
        out.write_text(json.dumps({"batch": batch_id}) + "\n")
        return 1

    def finish(self, tenant, name, failed=0):
        info = self.by_name[(tenant, name)]
        self.by_name[(tenant, name)] = dataclasses.replace(info, status="completed", request_counts=dict(
            info.request_counts, completed=info.request_counts["total"] - failed, failed=failed))


@pytest.fixture
def sched(folder):
    (s,) = parse(folder, f'[[schedule]]\n{ENTRY}every_s = 1\ntask = "sentiment"\nmodel = "minilm"\n'
                         'tenant = "acme"\nsettle_s = 0\noptions = { x = 1 }\n')
    return s


def drop(folder: Path, name: str, lines: int = 2) -> Path:
    path = folder / "in" / name
    path.write_text("".join(json.dumps({"id": i, "text": f"line {i}"}) + "\n" for i in range(lines)))
    return path


def test_a_file_becomes_one_batch_and_its_results_appear_once(folder, sched):
    fake = FakeBatches()
    ticker = Ticker(client=None, batches=fake)
    path = drop(folder, "a.jsonl", 3)
    first = ticker.tick(sched)
    assert (first.found, first.submitted, first.running, first.written) == (1, 1, 1, 0)
    assert fake.submits == [("nightly:a.jsonl", dict(task="sentiment", model="minilm", priority="batch",
                                                     options={"x": 1}, tenant="acme"))]
    assert ticker.tick(sched).submitted == 0 and len(fake.submits) == 1  # running: not submitted again
    fake.finish("acme", "nightly:a.jsonl", failed=1)
    done = ticker.tick(sched)
    out = results_path(sched, path)
    assert out == folder / "in" / "a.results.jsonl" and json.loads(out.read_text()) == {"batch": "b0"}
    assert (done.finished, done.written, done.lines, done.failed_lines) == (1, 1, 1, 1)
    after = ticker.tick(sched)  # the results file is there: nothing is asked, nothing rewritten
    assert (after.found, after.submitted, after.written, after.running) == (1, 0, 0, 0)
    assert input_files(sched) == [path]  # the results file is never an input


def test_a_file_still_being_written_waits(folder, sched):
    fake = FakeBatches()
    path = drop(folder, "a.jsonl")
    later = dataclasses.replace(sched, settle_s=3600)
    assert Ticker(None, fake).tick(later).waiting == 1 and fake.submits == []
    os.utime(path, (path.stat().st_mtime - 7200,) * 2)
    assert Ticker(None, fake).tick(later).submitted == 1


def test_a_failed_submit_is_resumed_on_the_next_tick(folder, sched):
    fake = FakeBatches()
    ticker = Ticker(None, fake)
    drop(folder, "a.jsonl")
    drop(folder, "b.jsonl")
    fake.fail_next_submit = True
    first = ticker.tick(sched)
    assert (first.errors, first.submitted) == (1, 1)  # a.jsonl failed, b.jsonl went on
    fake.by_name[("acme", "nightly:a.jsonl")] = Info("half", "nightly:a.jsonl", "in_progress",
                                                     {"total": 1, "completed": 0, "failed": 0})
    second = ticker.tick(sched)  # the half-made batch exists: its submit is done again, once
    assert (second.resumed, second.submitted) == (1, 0)
    assert [n for n, _ in fake.submits] == ["nightly:a.jsonl", "nightly:b.jsonl", "nightly:a.jsonl"]
    assert ticker.tick(sched).resumed == 0


def test_any_error_of_one_file_is_counted_and_the_next_file_goes_on(folder, sched):
    class Broken(FakeBatches):
        def submit_file(self, client, path, **kw):
            if path.name == "a.jsonl":
                raise RuntimeError("not an LLMOSError")
            return super().submit_file(client, path, **kw)

    fake = Broken()
    drop(folder, "a.jsonl")
    drop(folder, os.fsdecode(b"caf\xe9.jsonl"))  # not UTF-8: no batch can be named after it
    drop(folder, "c.jsonl")
    summary = Ticker(None, fake).tick(sched)
    assert (summary.found, summary.errors, summary.submitted) == (3, 2, 1)
    assert [n for n, _ in fake.submits] == ["nightly:c.jsonl"]
    with pytest.raises(LLMOSError, match="not UTF-8"):
        batch_name(sched, folder / "in" / os.fsdecode(b"caf\xe9.jsonl"))


def test_a_new_beat_resubmits_unfinished_batches_once(folder, sched):
    fake = FakeBatches()
    drop(folder, "a.jsonl")
    Ticker(None, fake).tick(sched)
    restarted = Ticker(None, fake)  # a beat killed mid-submit, started again
    assert restarted.tick(sched).resumed == 1 and restarted.tick(sched).resumed == 0
    assert [n for n, _ in fake.submits] == ["nightly:a.jsonl"] * 2


def test_batch_names_come_from_the_schedule_and_the_file(sched):
    assert batch_name(sched, Path("/x/2024-06-01.jsonl")) == "nightly:2024-06-01.jsonl"
    assert results_path(sched, Path("/x/2024-06-01.jsonl")).name == "2024-06-01.results.jsonl"


def test_beat_scheduler_runs_ticks_in_process_and_keeps_state_under_home(folder, sched):
    from llmos.nightly.beat import STATE_FILE, make_service

    class Counting:
        def __init__(self):
            self.ticks = []

        def tick(self, schedule):
            self.ticks.append(schedule.name)
            if len(self.ticks) == 1:
                raise RuntimeError("a tick's failure is logged, beat goes on")

    home = folder / "home"
    counting = Counting()
    fast = dataclasses.replace(sched, every_s=0.05)
    service = make_service(Settings(home=home), [fast], counting)
    scheduler = service.scheduler
    assert scheduler.producer is None  # never connects to a broker
    import time

    deadline = time.monotonic() + 30
    while len(counting.ticks) < 2 and time.monotonic() < deadline:
        time.sleep(max(0.0, min(scheduler.tick(), 0.05)))
    scheduler.close()
    assert counting.ticks == ["nightly", "nightly"]
    assert any(p.name.startswith(STATE_FILE) for p in home.iterdir())
