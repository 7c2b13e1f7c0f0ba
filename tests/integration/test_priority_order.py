"""Priorities hold end to end: with one job in flight at a time, higher priorities start first."""

import pytest

import llmos
from llmos.db import get_engine
from llmos.jobs import JobStatus
from llmos.manager import as_utc
from llmos.sdk import Client
from tests.helpers import WorkerProcess, wait_all_final

pytestmark = pytest.mark.integration


def test_backlog_is_served_in_priority_order(services):
    settings, env = services
    priorities = [1, 9, 5, 3, 7, 0, 9, 2, 8, 4, 6, 1, 5, 9, 0, 7, 3, 8, 2, 6, 4, 5, 1, 9]
    with Client(settings) as client:
        model = client.load_model("minilm")
        # the whole backlog is queued before any worker runs
        handles = [model.submit(llmos.SentimentTask(text=f"job {i}"), priority=p)
                   for i, p in enumerate(priorities)]
    worker = WorkerProcess(env, concurrency=1).wait_ready(settings.db_url)
    try:
        jobs = wait_all_final(get_engine(settings.db_url), [h.id for h in handles], timeout=120)
    finally:
        assert worker.stop() == 0, worker.log()
    assert {j.status for j in jobs.values()} == {JobStatus.SUCCEEDED}
    by_start = sorted(jobs.values(), key=lambda j: as_utc(j.started_at))
    started = [j.priority for j in by_start]
    assert started == sorted(priorities, reverse=True), started
    # within one priority, first in first out
    order = {h.id: i for i, h in enumerate(handles)}
    for p in set(priorities):
        same = [order[j.id] for j in by_start if j.priority == p]
        assert same == sorted(same)
