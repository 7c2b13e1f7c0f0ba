"""Names shared by producers and workers: queues, channels, task names, priorities, limits."""

QUEUE_PREFIX = "llmos."
"""A model's Celery queue is QUEUE_PREFIX + model name; a worker consumes only its own."""

RUN_JOB_TASK = "llmos.run_job"
"""The one Celery task name; its only argument is the job id (JSON)."""

PENDING_SET_PREFIX = "llmos:pending:"
"""Redis set per model of job ids whose message sits in the queue (added before a send,
removed when a worker takes the message); the reconciler re-sends queued jobs missing from it."""

HELD_SET_PREFIX = "llmos:held:"
"""Redis set per worker of job ids whose message it took and has not yet recorded."""

CANCEL_CHANNEL = "llmos:cancel"
"""Redis pub/sub channel announcing the cancel of a running job (payload: its id)."""

DONE_CHANNEL_PREFIX = "llmos:done:"
"""Redis pub/sub channel a worker publishes on when a job reaches a final state."""

PRIORITY_NAMES = {"critical": 9, "high": 7, "normal": 5, "low": 3, "batch": 1}
"""User-facing priority names; 9 is the most urgent."""

DEFAULT_PRIORITY = 5
"""Priority of a job submitted without one ("normal")."""

MIN_PRIORITY, MAX_PRIORITY = 0, 9
"""The user priority scale."""

HEARTBEAT_INTERVAL_S = 5.0
"""How often a worker refreshes its row in the workers table."""

DEFAULT_MAX_JOB_SECONDS = 3600
"""Longest a job may run; the broker's visibility timeout is set above it."""

EMBEDDED_DB_FILE = "llmos.db"
"""SQLite file under LLMOS_HOME used when LLMOS_DATABASE_URL is not set."""

EMBEDDED_REDIS_SOCKET = "redis.sock"
"""Unix socket under LLMOS_HOME of the embedded Redis started by `llmos up`."""

DEFAULT_TENANT = "default"
"""Tenant of a job submitted without one; idempotency keys are unique per tenant."""
