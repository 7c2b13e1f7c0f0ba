"""Monitoring: read-only queries over the task table, the workers and the queues.

Owns (one module each):
- `metrics`: the `prometheus_client` collector that `GET /metrics` renders (docs/monitoring.md);
- `dashboard`: the panels' data, sessions and static page of `/dashboard` (docs/dashboard.md);
- `flower`: the `llmos flower` command, Flower on LLMOS's Celery app behind credentials
  (docs/operations.md).

May import llmos.manager, llmos.dispatch, llmos.transport, llmos.scheduling, llmos.registry, llmos.db,
llmos.jobs, llmos.settings, llmos.constants, llmos.errors, llmos.logs; never llmos.api (the API
imports it). The rollup of finished jobs the collector reads (`job_rollups` behind a watermark,
and the exact totals of a scrape) is `llmos.rollup`, a core module beside llmos.manager (which
keeps it counted when an operator retries a job), not part of this package. Nothing here writes
but the scrape's fold (through `llmos.rollup`); job state is written through llmos.manager only
(the dashboard's actions go through the SDK).
"""
