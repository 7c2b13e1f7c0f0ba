"""Monitoring: read-only queries over the task table, the workers and the queues.

Owns the Prometheus collector and the dashboard's panel data (`llmos.monitoring.dashboard`).
May import llmos.manager, llmos.dispatch, llmos.transport, llmos.scheduling, llmos.db, llmos.jobs,
llmos.settings, llmos.constants, llmos.errors and llmos.logs; never llmos.api (the API imports it).
Nothing here writes job state: actions go through llmos.manager and the SDK.
"""
