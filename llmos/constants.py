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

DONE_CHANNEL = "llmos:done"
"""Redis pub/sub channel announcing jobs that reached a final state (payload: their ids joined by
","; one message per recorded batch, see `llmos.notify.publish_done`)."""

STREAM_CHANNEL_PREFIX = "llmos:stream:"
"""Prefix of the pub/sub channel of one job's token stream (`llmos.streaming.stream_channel`)."""

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

MAX_TENANT_CHARS = 128
"""Longest tenant name (the `jobs.tenant` column)."""

MAX_IDEMPOTENCY_KEY_CHARS = 256
"""Longest idempotency key (the `jobs.idempotency_key` column)."""

MAX_BATCH_ID_CHARS = 64
"""Longest batch id (the `jobs.batch_id` column)."""

MAX_CONVERSATION_ID_CHARS = 64
"""Longest conversation id (the `jobs.conversation_id` column)."""

MAX_JOBS_PER_SUBMIT = 10_000
"""Most tasks one `submit_many` call takes (one statement, one send); submit more in chunks."""

MAX_EMBED_TEXTS = 2048
"""Most texts one embed job takes."""

MAX_STOP_STRINGS = 8
"""Most stop strings one writing job takes (they count against the model's max_input_chars)."""

MAX_CHAT_MESSAGES = 1000
"""Most messages in one chat task."""

MAX_DEADLINE_S = 366 * 24 * 3600
"""Furthest a deadline may lie ahead, in seconds (a year); further is surely a mistake."""

MAX_ATTEMPTS = 100
"""Most runs a job may be given (`max_attempts`)."""

MAX_SEED = 2**32 - 1
"""Largest sampling seed a task takes."""

MAX_CLI_JSON_DEPTH = 32
"""Deepest nesting of a JSON value given to `llmos submit --set`."""

WAIT_POLL_S = 1.0
"""A waiter re-reads its pending jobs' statuses after this long without a completion notice."""

WAIT_MAX_POLL_S = 8.0
"""With notices, that quiet pause doubles after each poll up to this (a notice lost is rare)."""
