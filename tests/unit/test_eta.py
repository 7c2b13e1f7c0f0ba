"""The ETA estimator and submit admission (llmos.scheduling.eta) on SQLite, with fake demand figures."""

from __future__ import annotations

import warnings
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

import llmos
from llmos import manager
from llmos.api import create_app
from llmos.api.settings import ApiSettings
from llmos.db import get_engine, jobs
from llmos.dispatch import InMemoryDispatcher
from llmos.errors import DeadlineUnmeetableError, DeadlineUnmeetableWarning, ModelTooLargeError
from llmos.registry import ModelSpec, Registry
from llmos.scheduling import eta
from llmos.sdk import Client

pytestmark = pytest.mark.filterwarnings("ignore::llmos.NoWorkerWarning")

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)
SPEC = ModelSpec(name="small", source="x", tasks=("sentiment",), max_batch_size=4, max_wait_ms=10.0)


@pytest.fixture(autouse=True)
def _fresh_rates():
    eta.forget_rates()
    yield
    eta.forget_rates()


def client_for(settings, **changes):
    big = ModelSpec(name="huge", source="x", tasks=("sentiment",), memory_mb=1e12)
    registry = Registry({"small": SPEC, "huge": big})
    return Client(settings.model_copy(update=changes), dispatcher=InMemoryDispatcher(), registry=registry)


def rows(settings):
    with get_engine(settings.db_url).connect() as c:
        return c.execute(sa.select(jobs.c.id, jobs.c.created_at, jobs.c.eta_start_at, jobs.c.eta_finish_at)).all()


def measured_history(settings, *, jobs_n=8, compute_ms=400.0, batch_size=4, worker=True):
    """Finished jobs of `small` (a batch of 4 takes 400 ms: 0.1 s per job per worker) and a live worker."""
    engine = get_engine(settings.db_url)
    new = [manager.NewJob(model="small", task_type="sentiment", input={"text": "x"}, priority=5)
           for _ in range(jobs_n)]
    ids = [j.id for j, _ in manager.create_jobs(engine, new)]
    manager.register_worker(engine, worker_id="w1", host="h", pid=1, model="small", device="cpu")
    claimed, _ = manager.claim(engine, ids, worker_id="w1", device="cpu")
    manager.finish(engine, [manager.Outcome(job_id=j.id, worker_id="w1", attempt=j.attempts, result={"label": "x"},
                                            compute_ms=compute_ms, batch_size=batch_size) for j in claimed])
    if not worker:
        manager.stop_worker(engine, "w1")


# -- the arithmetic ------------------------------------------------------------------------------

def test_predict_from_fake_demand():
    load = eta.Load(now=NOW, ahead=20, running=4, workers=2)
    rate = eta.Rate(service_s=0.1, run_s=0.4, jobs=100)
    adm = eta.predict(SPEC, load, rate, n=3)
    assert adm.slots == 2 * 4  # two workers, each holding a batch of 4 claimed
    # 10 ms of batcher wait, then (20 ahead + 4 running + position + 1 - 8 slots) jobs at 0.1 s / 2 workers
    assert adm.start_in_s(0) == pytest.approx(0.01 + 17 * 0.05)
    assert [round(adm.start_in_s(i) - adm.start_in_s(0), 6) for i in range(3)] == [0.0, 0.05, 0.1]
    # it computes once the 24 + i jobs ahead of it are done, then runs its own batch
    assert adm.finish_in_s(2) == pytest.approx(0.01 + 26 * 0.05 + 0.4)
    assert adm.eta_start_at == NOW + timedelta(seconds=adm.start_in_s(0)) and adm.measured
    idle = eta.predict(SPEC, eta.Load(now=NOW, ahead=0, running=0, workers=1), rate, n=10)
    # an idle worker claims a batch (4) at once; the next ones wait for a slot, 0.1 s apart
    assert [round(idle.start_in_s(i), 6) for i in range(10)] == [0.01] * 4 + [0.11, 0.21, 0.31, 0.41, 0.51, 0.61]
    assert [round(idle.finish_in_s(i), 6) for i in (0, 9)] == [0.41, 1.31]


def test_predict_adds_the_cold_start_when_no_worker_is_warm():
    load = eta.Load(now=NOW, ahead=0, running=0, workers=0)
    guessed = eta.predict(SPEC, load, eta.Rate(service_s=0.1, run_s=0.4, jobs=100, cold_start_s=12.0), n=1)
    assert guessed.start_in_s(0) == pytest.approx(12.01) and not guessed.measured  # cold start not measured
    measured = eta.predict(SPEC, load, eta.Rate(service_s=0.1, run_s=0.4, jobs=100, cold_start_s=12.0,
                                                 cold_start_measured=True), n=1)
    assert measured.measured
    warm = eta.predict(SPEC, eta.Load(now=NOW, ahead=0, running=0, workers=1), eta.Rate(service_s=0.1, run_s=0.4, jobs=1), n=1)
    assert warm.start_in_s(0) == pytest.approx(0.01)


# -- the reads and the rows --------------------------------------------------------------------

def test_rate_is_measured_from_finished_jobs_and_cached(sqlite_settings):
    engine = get_engine(sqlite_settings.db_url)
    assert not eta.read_rate(engine, "small").measured  # nothing finished: the priors
    measured_history(sqlite_settings)
    assert not eta.read_rate(engine, "small").measured  # cached for RATE_TTL_S
    rate = eta.read_rate(engine, "small", ttl_s=0)
    assert rate.jobs == 8 and rate.service_s == pytest.approx(0.1) and rate.run_s == pytest.approx(0.4)
    assert rate.mean_batch == pytest.approx(4)


def test_bulk_submit_gets_successive_positions_stored_on_the_rows(sqlite_settings):
    measured_history(sqlite_settings)
    client = client_for(sqlite_settings)
    hs = client.load_model("small").submit_many([llmos.SentimentTask(text=f"t{i}") for i in range(12)])
    stored = {r.id: r for r in rows(sqlite_settings)}
    starts = [manager.as_utc(stored[h.id].eta_start_at) for h in hs]
    finishes = [manager.as_utc(stored[h.id].eta_finish_at) for h in hs]
    assert [h.eta_start_at for h in hs] == starts and [h.eta_finish_at for h in hs] == finishes
    gaps = [round((b - a).total_seconds(), 5) for a, b in zip(starts, starts[1:])]
    assert gaps == [0.0] * 3 + [0.1] * 8  # a batch of 4 claimed at once by the idle worker, then 0.1 s per job
    gaps = [round((b - a).total_seconds(), 5) for a, b in zip(finishes, finishes[1:])]
    assert gaps == [0.1] * 11
    for h in hs:
        r = stored[h.id]
        assert manager.as_utc(r.eta_finish_at) > manager.as_utc(r.eta_start_at) >= manager.as_utc(r.created_at)
    # the next submit at the same priority queues behind those 12; a higher priority does not
    later = client.load_model("small").submit(llmos.SentimentTask(text="later"))
    urgent = client.load_model("small").submit(llmos.SentimentTask(text="urgent"), priority=9)
    assert (later.eta_start_at - manager.as_utc(later.job().created_at)).total_seconds() \
        == pytest.approx(0.01 + (12 + 1 - 4) * 0.1, abs=1e-3)
    assert (urgent.eta_start_at - manager.as_utc(urgent.job().created_at)).total_seconds() == pytest.approx(0.01, abs=1e-3)


def test_ahead_is_counted_up_to_the_cap_then_bounded_by_the_pending_set(sqlite_settings, monkeypatch):
    engine = get_engine(sqlite_settings.db_url)
    manager.create_jobs(engine, [manager.NewJob(model="small", task_type="sentiment", input={"text": "x"},
                                                priority=5) for _ in range(8)])
    monkeypatch.setattr(eta, "AHEAD_CAP", 5)
    load = eta.read_load(engine, "small", 5, dead_after_s=30)
    assert (load.ahead, load.ahead_capped, load.running, load.workers) == (5, True, 0, 0)

    class Pending:  # the SCARD of the model's pending set, as Redis answers it
        def scard(self, key):
            assert key == "llmos:pending:small"
            return 1000

    assert eta.read_load(engine, "small", 5, dead_after_s=30, redis_conn=Pending()).ahead == 1000
    assert eta.read_load(engine, "small", 6, dead_after_s=30).ahead == 0


# -- admission ---------------------------------------------------------------------------------

def test_a_deadline_the_measured_eta_cannot_meet_is_refused(sqlite_settings):
    measured_history(sqlite_settings)
    client = client_for(sqlite_settings)
    model = client.load_model("small")
    model.submit_many([llmos.SentimentTask(text=f"t{i}") for i in range(50)])  # 5 s of work ahead
    before = len(rows(sqlite_settings))
    with pytest.raises(DeadlineUnmeetableError, match=r"predicted start in 4\.\d s \(ETA 20") as err:
        model.submit(llmos.SentimentTask(text="hurry"), deadline=2.0)
    assert isinstance(err.value, llmos.ValidationError) and err.value.eta_start_s > err.value.deadline_in_s
    with pytest.raises(DeadlineUnmeetableError, match="of the 3 jobs"):
        model.submit_many([llmos.SentimentTask(text="a")] * 3,
                          deadline=datetime.now(timezone.utc) + timedelta(seconds=2))
    assert len(rows(sqlite_settings)) == before  # nothing written
    assert model.submit(llmos.SentimentTask(text="patient"), deadline=60.0).job().deadline is not None


def test_warn_mode_accepts_with_a_warning_and_off_does_not_check(sqlite_settings):
    measured_history(sqlite_settings)
    client = client_for(sqlite_settings, deadline_admission="warn")
    model = client.load_model("small")
    model.submit_many([llmos.SentimentTask(text=f"t{i}") for i in range(50)])
    with pytest.warns(DeadlineUnmeetableWarning, match="accepted"):
        h = model.submit(llmos.SentimentTask(text="hurry"), deadline=2.0)
    assert h.job().eta_start_at > h.job().deadline
    off = client_for(sqlite_settings, deadline_admission="off").load_model("small")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeadlineUnmeetableWarning)
        off.submit(llmos.SentimentTask(text="hurry"), deadline=2.0)


def test_a_guessed_eta_never_refuses(sqlite_settings):
    client = client_for(sqlite_settings)  # nothing finished yet, no worker: priors only
    model = client.load_model("small")
    h = model.submit(llmos.SentimentTask(text="first"), deadline=1.0)
    assert (h.eta_start_at - manager.as_utc(h.job().created_at)).total_seconds() > 1.0  # the prior cold start
    measured_history(sqlite_settings, worker=False)  # measured service, but no cold start measured
    eta.forget_rates()
    assert model.submit(llmos.SentimentTask(text="second"), deadline=1.0).eta_start_at is not None


def test_a_model_that_fits_on_no_device_is_refused(sqlite_settings):
    client = client_for(sqlite_settings)
    with pytest.raises(ModelTooLargeError, match=r"model 'huge' needs about .* GiB .* largest cpu device has"):
        client.load_model("huge").submit(llmos.SentimentTask(text="hi"))
    assert rows(sqlite_settings) == []


def test_declared_devices_decide_what_fits(sqlite_settings, tmp_path):
    """With [[device]] entries in llmos.toml the submit refuses as the planner would (their sizes),
    and accepts a model that fits one of them."""
    config = tmp_path / "llmos.toml"
    config.write_text('[[device]]\nname = "cuda:0"\nkind = "cuda"\nmemory_mb = 1000\n'
                      '[[device]]\nname = "cpu"\nkind = "cpu"\nmemory_mb = 2000\n')
    big = ModelSpec(name="mid", source="x", tasks=("sentiment",), memory_mb=1500)
    huge = ModelSpec(name="huge", source="x", tasks=("sentiment",), memory_mb=5000)
    client = Client(sqlite_settings.model_copy(update={"config": config}), dispatcher=InMemoryDispatcher(),
                    registry=Registry({"mid": big, "huge": huge}))
    with pytest.raises(ModelTooLargeError, match=r"model 'huge' needs 5,000 MiB .* largest device, cpu .* 2,000 MiB"):
        client.load_model("huge").submit(llmos.SentimentTask(text="hi"))
    assert rows(sqlite_settings) == []
    client.load_model("mid").submit(llmos.SentimentTask(text="hi"))  # 1,500 MiB: fits the 2,000 MiB CPU
    assert len(rows(sqlite_settings)) == 1


def test_api_answers_422_with_the_error_codes(sqlite_settings):
    client = client_for(sqlite_settings)
    http = TestClient(create_app(api_settings=ApiSettings(rate_limit_storage="memory://"), client=client))
    _, key = manager.create_api_key(get_engine(sqlite_settings.db_url), tenant="acme")
    auth = {"Authorization": f"Bearer {key}"}
    with http:
        resp = http.post("/v1/jobs", json={"model": "huge", "task": "sentiment", "input": {"text": "x"}}, headers=auth)
        assert resp.status_code == 422 and resp.json()["error"]["code"] == "model_too_large", resp.text
        ok = http.post("/v1/jobs", json={"model": "small", "task": "sentiment", "input": {"text": "x"}}, headers=auth)
        assert ok.status_code == 201 and ok.json()["eta_start_at"] >= ok.json()["created_at"]
        measured_history(sqlite_settings)
        eta.forget_rates()
        http.post("/v1/jobs:batch", json={"model": "small", "jobs": [{"task": "sentiment", "input": {"text": "x"}}] * 40},
                  headers=auth)
        late = http.post("/v1/jobs", json={"model": "small", "task": "sentiment", "input": {"text": "x"},
                                           "deadline": 1.0}, headers=auth)
        assert late.status_code == 422 and late.json()["error"]["code"] == "deadline_unmeetable", late.text
        assert "ETA" in late.json()["error"]["message"]


def test_eta_vs_actual_gives_the_errors_in_seconds():
    job = llmos.Job(id="x", model="m", task_type="sentiment", priority=5, status=llmos.JobStatus.SUCCEEDED, input={},
                    eta_start_at=NOW, started_at=NOW + timedelta(seconds=1.5),
                    eta_finish_at=NOW + timedelta(seconds=2), finished_at=NOW + timedelta(seconds=1.75))
    shown = eta.eta_vs_actual(job)
    assert shown["start_error_s"] == 1.5 and shown["finish_error_s"] == -0.25
    assert eta.eta_vs_actual(job.evolve(started_at=None, finished_at=None))["start_error_s"] is None
