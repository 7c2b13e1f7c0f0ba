"""The naive design LLMOS is compared with: one Celery task per request, one forward pass each.

This is what wiring Celery to transformers by hand usually looks like: the model loads lazily in
each worker process, every request is its own task, results go through Celery's Redis result
backend. Run by benchmarks/run.py (`celery -A benchmarks.naive_celery worker`).
"""

from __future__ import annotations

import os

from celery import Celery

app = Celery("naive", broker=os.environ["NAIVE_BROKER"], backend=os.environ["NAIVE_BROKER"])
app.conf.update(task_serializer="json", accept_content=["json"], result_serializer="json",
                worker_prefetch_multiplier=1, task_acks_late=True, worker_hijack_root_logger=False)

_runner = None


def _get_runner():
    global _runner
    if _runner is None:
        from llmos.registry import Registry
        from llmos.settings import Settings
        from workers import model_cache
        from workers.runners import runners_for

        spec = Registry.load(Settings()).get(os.environ.get("NAIVE_MODEL", "minilm"))
        runners = runners_for(model_cache.get(spec, "cpu"))
        _runner = runners
    return _runner


@app.task(name="naive.run")
def run(task_type: str, data: dict) -> dict:
    from llmos.tasks import parse_task

    out = _get_runner()[task_type].run([parse_task(task_type, data)])[0]
    return out.result or {"error": out.error}
