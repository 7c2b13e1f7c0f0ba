"""Monitoring: read-only queries over the task table, the workers and the queues.

Owns (one module each):
- `rollup`: the fold of finished jobs into `job_rollups` (per UTC day, model, task, tenant and
  status: counts, sums, histogram buckets) behind a watermark, and the exact totals a scrape
  reports (the rollup below the watermark + a live aggregate of the small tail above it);
- `metrics`: the `prometheus_client` collector that `GET /metrics` renders (docs/monitoring.md);
- `dashboard`: the panels' data, sessions and static page of `/dashboard` (docs/dashboard.md);
- `flower`: the `llmos flower` command, Flower on LLMOS's Celery app behind credentials
  (docs/operations.md).

May import llmos.manager, llmos.dispatch, llmos.transport, llmos.scheduling, llmos.registry, llmos.db,
llmos.jobs, llmos.settings, llmos.constants, llmos.errors, llmos.logs; never llmos.api (the API
imports it). The only writes here are the rollup's own tables; job state is written through
llmos.manager only (the dashboard's actions go through the SDK).
"""
