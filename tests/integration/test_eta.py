"""ETA against what happened (issue 14, Done-when 3): a real minilm worker on Postgres + Redis under
a seeded Poisson load of single submits, with two bulk bursts; every job's predicted start is
compared with its actual start.

Prints the predicted and measured waits and the ETA error (median and p90 of |predicted - actual|
start); docs/scheduling.md ("ETA and admission") records the figures. Asserts only what cannot
flake: every job has an ETA, none before its creation, every error finite. No timing assertions.

    PYTHONPATH=$PWD python -m pytest -p no:cacheprovider -q -s tests/integration/test_eta.py
"""

from __future__ import annotations

import math
import random
import statistics
import time

import pytest

import llmos
from llmos.db import get_engine
from llmos.jobs import JobStatus
from llmos.manager import as_utc
from llmos.scheduling import eta
from llmos.sdk import Client
from tests.helpers import wait_all_final

pytestmark = pytest.mark.integration

SEED = 14
RATE_PER_S = 6.0  # single submits arrive at exponential gaps of mean 1/RATE_PER_S
DURATION_S = 30.0
BURSTS = {8.0: 150, 18.0: 150}  # at these seconds in, one bulk submit of this many jobs


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def test_eta_against_actual_under_poisson_load(services, pg_worker):
    settings, _ = services
    engine = get_engine(settings.db_url)
    rng = random.Random(SEED)
    eta.forget_rates()
    ids: list[str] = []
    with Client(settings) as client:
        model = client.load_model("minilm")
        warm = model.submit_many([llmos.SentimentTask(text=f"warm-up {i}") for i in range(32)])
        model.results(warm, timeout=120)  # a measured rate before the load starts
        eta.forget_rates()
        start = time.monotonic()
        at, bursts = 0.0, dict(BURSTS)
        i = 0
        while at < DURATION_S:
            at += rng.expovariate(RATE_PER_S)
            for when in [w for w in bursts if w <= at]:
                n = bursts.pop(when)
                ids += [h.id for h in model.submit_many(
                    [llmos.SentimentTask(text=f"burst {when} {k} " + "word " * rng.randint(1, 30)) for k in range(n)])]
            time.sleep(max(0.0, start + at - time.monotonic()))
            ids.append(model.submit(llmos.SentimentTask(text=f"job {i} " + "word " * rng.randint(1, 30)),
                                    priority=rng.choice([5, 5, 5, 7])).id)
            i += 1
        jobs = wait_all_final(engine, ids, timeout=300)

    assert {j.status for j in jobs.values()} == {JobStatus.SUCCEEDED}
    predicted, measured, errors = [], [], []
    for j in jobs.values():
        assert j.eta_start_at is not None and j.eta_finish_at is not None, j
        created, eta_start, eta_finish = as_utc(j.created_at), as_utc(j.eta_start_at), as_utc(j.eta_finish_at)
        assert eta_start >= created and eta_finish >= eta_start
        predicted.append((eta_start - created).total_seconds())
        measured.append((as_utc(j.started_at) - created).total_seconds())
        errors.append(abs((as_utc(j.started_at) - eta_start).total_seconds()))
    assert all(math.isfinite(e) for e in errors) and len(errors) == len(ids)
    finish_errors = [abs((as_utc(j.finished_at) - as_utc(j.eta_finish_at)).total_seconds()) for j in jobs.values()]
    print(f"\nETA under Poisson load: {len(ids)} jobs ({RATE_PER_S}/s singles for {DURATION_S:.0f} s, bursts "
          f"{BURSTS}, seed {SEED}), 1 minilm worker")
    print(f"  wait to start, predicted: mean {statistics.mean(predicted):.3f} s, median {statistics.median(predicted):.3f} s, "
          f"p90 {pct(predicted, 0.9):.3f} s, max {max(predicted):.3f} s")
    print(f"  wait to start, measured:  mean {statistics.mean(measured):.3f} s, median {statistics.median(measured):.3f} s, "
          f"p90 {pct(measured, 0.9):.3f} s, max {max(measured):.3f} s")
    print(f"  |predicted - actual| start: median {statistics.median(errors):.3f} s, p90 {pct(errors, 0.9):.3f} s, "
          f"max {max(errors):.3f} s")
    signed = [(as_utc(j.started_at) - as_utc(j.eta_start_at)).total_seconds() for j in jobs.values()]
    rate = eta.read_rate(engine, "minilm", ttl_s=0)
    span = (max(as_utc(j.finished_at) for j in jobs.values()) - min(as_utc(j.started_at) for j in jobs.values()))
    print(f"  actual - predicted start: mean {statistics.mean(signed):+.3f} s; measured service "
          f"{rate.service_s * 1000:.1f} ms/job at mean batch {rate.mean_batch:.1f} (throughput over the whole run "
          f"{len(ids) / span.total_seconds():.1f} jobs/s, idle gaps included)")
    print(f"  |predicted - actual| finish: median {statistics.median(finish_errors):.3f} s, "
          f"p90 {pct(finish_errors, 0.9):.3f} s")
