"""One SDK test module, run against the direct client and the HTTP client (`llmos.connect`).

Both clients act for the same tenant on one Postgres + Redis with one real minilm worker; the
HTTP one goes through a real uvicorn API process. Every test asserts the same for both.
"""

from __future__ import annotations

import math
import uuid
from datetime import datetime, timedelta, timezone

import pytest

import llmos
from llmos import manager, sdk
from llmos.api.errors import AuthError, QuotaExceededError
from llmos.db import get_engine
from llmos.jobs import JobStatus
from llmos.settings import Settings
from tests.integration.test_api import ApiProcess, free_port

pytestmark = pytest.mark.integration

TENANT = "sdk-both"


@pytest.fixture(scope="module")
def local_settings(services) -> Settings:
    """The module's settings, with a short no-worker grace so `execute` on an unserved model is quick."""
    settings, _ = services
    return settings.model_copy(update={"no_worker_grace_s": 0.5})


@pytest.fixture(scope="module")
def api_server(services, request):
    _, env = services
    proc = ApiProcess(env)
    try:
        request.getfixturevalue("pg_worker")  # the worker loads its model meanwhile
        yield proc.wait_ready()
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def api_key(services) -> str:
    settings, _ = services
    return manager.create_api_key(get_engine(settings.db_url), tenant=TENANT)[1]


@pytest.fixture(scope="module")
def direct(local_settings, pg_worker):
    with llmos.Client(local_settings, tenant=TENANT) as client:
        yield client


@pytest.fixture(scope="module")
def http(local_settings, api_server, api_key):
    with llmos.connect(api_server.url, api_key=api_key, settings=local_settings) as client:
        yield client


@pytest.fixture(params=["direct", "http"])
def client(request):
    return request.getfixturevalue(request.param)


def test_execute_sentiment(client):
    result = client.load_model("minilm").execute(llmos.SentimentTask(text="Absolutely wonderful, I love it!"),
                                                 timeout=60)
    assert isinstance(result, llmos.SentimentResult)
    assert result.label == "POSITIVE" and 0.5 < result.score <= 1


def test_submit_status_result_and_job_fields(client):
    model = client.load_model("minilm")
    key = uuid.uuid4().hex
    handle = model.submit(llmos.SentimentTask(text="This was terrible, I hated it."), priority="high",
                          idempotency_key=key, timeout_s=60)
    assert handle.status() in set(JobStatus)
    result = handle.result(timeout=60)
    assert result.label == "NEGATIVE"
    job = handle.job()
    assert isinstance(job, llmos.Job) and job.id == handle.id
    assert (job.model, job.task_type, job.status, job.priority) == ("minilm", "sentiment", JobStatus.SUCCEEDED, 7)
    assert job.input == {"text": "This was terrible, I hated it."} and job.result == result.model_dump()
    assert job.attempts == 1 and job.idempotency_key == key and job.timeout_s == 60 and job.error is None
    assert job.created_at.tzinfo and job.created_at <= job.started_at <= job.finished_at
    assert job.compute_ms > 0 and job.batch_size >= 1
    assert client.job(handle.id) == job
    again = model.submit(llmos.SentimentTask(text="This was terrible, I hated it."), idempotency_key=key)
    assert again.id == handle.id and again.status() == JobStatus.SUCCEEDED


def test_submit_many_results_in_order(client):
    model = client.load_model("minilm")
    texts = ["I love this.", "This is awful.", "What a great day!", "Worst purchase ever.", "Superb work."]
    batch_id = f"batch-{uuid.uuid4().hex[:8]}"
    handles = model.submit_many([llmos.SentimentTask(text=t) for t in texts], priority="low", batch_id=batch_id)
    assert len({h.id for h in handles}) == len(texts)
    results = model.results(handles, timeout=60)
    assert [r.label for r in results] == ["POSITIVE", "NEGATIVE", "POSITIVE", "NEGATIVE", "POSITIVE"]
    assert {client.job(h.id).batch_id for h in handles} == {batch_id}
    assert model.submit_many([]) == []


def test_embed_vectors(client):
    result = client.load_model("minilm").execute(llmos.EmbeddingTask(texts=["a cat", "a dog"]), timeout=60)
    assert isinstance(result, llmos.EmbeddingResult) and result.dim == 384
    assert len(result.vectors) == 2 and all(len(v) == 384 for v in result.vectors)
    assert all(math.isclose(math.hypot(*v), 1.0, rel_tol=1e-3) for v in result.vectors)


def test_cancel_a_queued_job(client):
    gpt2 = client.load_model("gpt2")  # registered; no worker serves it here, so its jobs stay queued
    with pytest.warns(llmos.NoWorkerWarning, match="no live worker serves model 'gpt2'"):
        handle = gpt2.submit(llmos.WritingTask(prompt="Once upon a time"))
    assert handle.status() == JobStatus.QUEUED
    assert handle.cancel() is True
    assert handle.status() == JobStatus.CANCELLED and handle.job().finished_at is not None
    assert handle.cancel() is False  # already ended
    with pytest.raises(llmos.JobFailedError) as failed:
        handle.result(timeout=5)
    assert failed.value.status == "cancelled" and failed.value.job_id == handle.id
    with pytest.raises(llmos.NoWorkerError, match="no live worker serves model 'gpt2'"):
        gpt2.execute(llmos.WritingTask(prompt="Twice"), timeout=30)


def test_a_job_not_final_within_the_timeout(client):
    handle = client.load_model("gpt2").submit(llmos.WritingTask(prompt="Never runs"), priority="batch")
    with pytest.raises(llmos.JobTimeoutError, match="still queued"):
        handle.result(timeout=0.2)
    assert client.wait([handle.id], timeout=0)[handle.id].status == JobStatus.QUEUED
    assert handle.cancel() is True


@pytest.mark.filterwarnings("ignore::llmos.NoWorkerWarning")
@pytest.mark.parametrize("call,error,match", [
    (lambda c: c.load_model("nope"), llmos.UnknownModelError, "unknown model 'nope'; known models: .*minilm"),
    (lambda c: c.load_model("minilm").submit(llmos.QuestionAnsweringTask(question="q", context="c")),
     llmos.UnsupportedTaskError, "cannot run 'qa'"),
    (lambda c: c.load_model("minilm").submit(
        llmos.SentimentTask(text="x" * (c.load_model("minilm").spec.max_input_chars + 1))),
     llmos.ValidationError, "over model 'minilm'"),
    (lambda c: c.load_model("minilm").submit(llmos.SentimentTask(text="x"), priority=11),
     llmos.ValidationError, "priority"),
    (lambda c: c.load_model("minilm").submit("just a string"), llmos.ValidationError, "expected a task"),
    (lambda c: c.load_model("minilm").submit(llmos.SentimentTask(text="x"),
                                             deadline=datetime(2030, 1, 1)), llmos.ValidationError,
     "timezone-aware"),
    (lambda c: c.wait([str(uuid.uuid4())], timeout=-1), llmos.ValidationError, "timeout"),
    (lambda c: c.job(str(uuid.uuid4())), llmos.JobNotFoundError, "no job with id"),
    (lambda c: c.job("not-a-uuid"), llmos.JobNotFoundError, "no job with id"),
    (lambda c: c.cancel(str(uuid.uuid4())), llmos.JobNotFoundError, "no job with id"),
    (lambda c: c.wait([str(uuid.uuid4())], timeout=1), llmos.JobNotFoundError, "no job with id"),
], ids=["unknown-model", "unsupported-task", "over-limit", "bad-priority", "not-a-task", "naive-deadline",
        "bad-timeout", "no-job", "not-an-id", "cancel-no-job", "wait-no-job"])
def test_errors_are_the_same_classes(client, call, error, match):
    with pytest.raises(error, match=match):
        call(client)


def test_idempotency_conflict(client):
    model = client.load_model("minilm")
    key = uuid.uuid4().hex
    first = model.submit(llmos.EmbeddingTask(texts=["one"]), idempotency_key=key)
    with pytest.raises(llmos.IdempotencyConflictError):
        model.submit(llmos.EmbeddingTask(texts=["two"]), idempotency_key=key)
    assert first.result(timeout=60).dim == 384


def test_another_tenants_job_is_not_found(client, local_settings):
    with llmos.Client(local_settings, tenant="someone-else") as other:
        foreign = other.load_model("minilm").submit(llmos.EmbeddingTask(texts=["theirs"]))
    with pytest.raises(llmos.JobNotFoundError):
        client.job(foreign.id)
    with pytest.raises(llmos.JobNotFoundError):
        client.cancel(foreign.id)


@pytest.mark.filterwarnings("ignore::llmos.NoWorkerWarning")
def test_http_only_failures_are_llmos_errors(services, api_server, local_settings):
    with llmos.connect(api_server.url, api_key="llmos_nope_nope", settings=local_settings) as bad_key:
        with pytest.raises(AuthError, match="invalid or revoked API key"):
            bad_key.load_model("minilm")
    settings, env = services
    key = manager.create_api_key(get_engine(settings.db_url), tenant="sdk-both-quota")[1]
    tight = ApiProcess(env, LLMOS_API_MAX_QUEUED_JOBS="1").wait_ready()
    try:
        with llmos.connect(tight.url, api_key=key, settings=local_settings) as quota:
            gpt2 = quota.load_model("gpt2")  # no worker: the first job stays queued
            gpt2.submit(llmos.WritingTask(prompt="one"))
            with pytest.raises(QuotaExceededError) as over:
                gpt2.submit(llmos.WritingTask(prompt="two"))
            assert over.value.limit == "max_queued_jobs" and over.value.retry_after_s > 0
    finally:
        tight.stop()
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with llmos.connect(url) as nobody:
        with pytest.raises(llmos.APIUnavailableError, match=f"cannot reach the LLMOS API at {url}"):
            nobody.load_model("minilm")
    with pytest.raises(llmos.ConfigError, match="http:// or https://"):
        llmos.connect("127.0.0.1:8000")


def test_llmos_url_selects_the_http_client(api_server, api_key, monkeypatch):
    monkeypatch.setenv("LLMOS_URL", api_server.url)
    monkeypatch.setenv("LLMOS_API_KEY", api_key)
    monkeypatch.setattr(sdk, "_default", None)
    model = llmos.load_model("minilm")
    assert isinstance(model.client, llmos.HTTPClient)
    assert model.execute(llmos.SentimentTask(text="I love it"), timeout=60).label == "POSITIVE"
    model.client.close()


def test_deadlines_as_seconds_or_times(client):
    model = client.load_model("minilm")
    with pytest.raises(llmos.ValidationError, match="deadline"):
        model.submit(llmos.SentimentTask(text="x"), deadline=-1)
    at = datetime.now(timezone.utc) + timedelta(minutes=10)
    by_time = model.submit(llmos.SentimentTask(text="on time"), deadline=at)
    by_seconds = model.submit(llmos.SentimentTask(text="on time"), deadline=600)
    for handle in (by_time, by_seconds):
        assert handle.result(timeout=60).label in {"POSITIVE", "NEGATIVE"}
        assert abs((handle.job().deadline - at).total_seconds()) < 60
