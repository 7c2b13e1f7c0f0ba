"""Retrying a failed job (the dashboard's Retry, `Client.retry`, `HTTPClient.retry`, `llmos retry`):
a real minilm worker runs it again and its result is recorded, on Postgres and Redis."""

from __future__ import annotations

import pytest

import llmos
from llmos import manager
from llmos.errors import JobNotFoundError, JobStateError
from llmos.remote import HTTPClient
from llmos.sdk import Client
from tests import helpers
from tests.integration.test_api import ApiProcess

pytestmark = pytest.mark.integration


def failed_job(client: Client) -> str:
    """A minilm job failed by a (pretend) worker elsewhere, as a runner error would leave it."""
    handle = client.load_model("minilm").submit(llmos.SentimentTask(text="I really enjoyed this"))
    engine = client.engine
    # the real worker may take it first: then wait for it and fail a fresh one by claiming it ourselves
    claimed, _ = manager.claim(engine, [handle.id], worker_id="elsewhere", device="cpu")
    if not claimed:
        helpers.wait_all_final(engine, [handle.id])
        with engine.begin() as conn:  # (test set-up only: put a finished job back to failed)
            conn.exec_driver_sql("UPDATE jobs SET status = 'failed', error = 'RuntimeError: boom', attempts = 1, "
                                 "result = NULL WHERE id = %(id)s", {"id": handle.id})
        return handle.id
    assert manager.finish(engine, [manager.Outcome(job_id=handle.id, worker_id="elsewhere", attempt=1,
                                                   error="RuntimeError: boom")]) == 1
    return handle.id


def test_a_retried_job_runs_again_on_a_real_worker(services, pg_worker):
    settings, env = services
    with Client(settings, tenant="acme") as client:
        job_id = failed_job(client)
        assert manager.get_job(client.engine, job_id, tenant="acme").status.value == "failed"
        again = client.retry(job_id)
        assert again.status.value == "queued" and again.error is None and again.max_attempts == 1 + 3
        done = helpers.wait_all_final(client.engine, [job_id])[job_id]
        row = manager.get_job(client.engine, job_id, tenant="acme")
        assert row.status.value == "succeeded", (done, pg_worker.log())
        assert row.result["label"].lower() == "positive" and row.attempts == 2 and row.error is None
        with pytest.raises(JobStateError) as info:
            client.retry(job_id)
        assert info.value.status == "succeeded"
        with pytest.raises(JobNotFoundError):
            Client(settings, tenant="globex").retry(job_id)  # another tenant's job reads as none
        with pytest.raises(JobNotFoundError):
            client.retry("not-a-uuid")

        # the same through the REST API (HTTPClient)
        api = ApiProcess(env).wait_ready()
        try:
            _, key = manager.create_api_key(client.engine, tenant="acme")
            other = failed_job(client)
            http = HTTPClient(api.url, key)
            assert http.retry(other).status.value == "queued"
            helpers.wait_all_final(client.engine, [other])
            assert manager.get_job(client.engine, other, tenant="acme").status.value == "succeeded"
            with pytest.raises(JobStateError):
                http.retry(other)
            http.close()
        finally:
            api.stop()
