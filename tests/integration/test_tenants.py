"""Tenants on Postgres: another tenant's job, batch or conversation is not found, not cancellable,
not counted, and never enters a prompt (real dialogue jobs through a real worker process)."""

import pytest

import llmos
from llmos import manager
from llmos.errors import JobNotFoundError
from llmos.jobs import JobStatus
from llmos.sdk import Client
from llmos.settings import Settings
from tests.helpers import WorkerProcess

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(services, tiny_config):
    """A tiny GPT-2 dialogue worker; `tiny-bart` has none, so its jobs stay queued."""
    settings, env = services
    worker = WorkerProcess(dict(env, LLMOS_CONFIG=str(tiny_config)), model="tiny-gpt2").wait_ready(settings.db_url)
    yield Settings(home=settings.home, database_url=settings.database_url, redis_url=settings.redis_url,
                   config=tiny_config)
    assert worker.stop() == 0, worker.log()


@pytest.fixture
def tenants(stack):
    with Client(stack, tenant="tenant-a") as a, Client(stack, tenant="tenant-b") as b:
        yield a, b


def test_another_tenants_jobs_and_batch_are_not_found_cancellable_or_counted(tenants):
    a, b = tenants
    handles = a.load_model("tiny-bart").submit_many(
        [llmos.WritingTask(prompt="Hello"), llmos.WritingTask(prompt="Hi")], batch_id="batch-a")
    ids = [h.id for h in handles]
    for attempt in (lambda: b.job(ids[0]), lambda: b.wait(ids, timeout=1), lambda: b.cancel(ids[0]),
                    lambda: b.wait([ids[1]], timeout=1)):
        with pytest.raises(JobNotFoundError, match="no job with id"):
            attempt()
    engine = a.engine
    assert manager.status_counts(engine, ids, tenant="tenant-b") == {}
    assert manager.batch_status_counts(engine, "batch-a", tenant="tenant-b") == {}
    assert manager.job_statuses(engine, ids, tenant="tenant-b") == {}
    assert manager.cancel(engine, ids[0], tenant="tenant-b") is False
    # tenant A's view: both still queued (B's cancel did nothing), and A may cancel them
    assert manager.batch_status_counts(engine, "batch-a", tenant="tenant-a") == {JobStatus.QUEUED: 2}
    assert manager.status_counts(engine, ids, tenant="tenant-a") == {JobStatus.QUEUED: 2}
    assert a.job(ids[0]).status == JobStatus.QUEUED
    assert handles[0].cancel() is True and a.cancel(ids[1]) is True


def test_idempotency_keys_are_per_tenant(tenants):
    a, b = tenants
    task = llmos.WritingTask(prompt="Hello")
    ha = a.load_model("tiny-bart").submit(task, idempotency_key="order-1")
    hb = b.load_model("tiny-bart").submit(task, idempotency_key="order-1")
    assert ha.id != hb.id and ha.job().tenant == "tenant-a" and hb.job().tenant == "tenant-b"
    assert a.load_model("tiny-bart").submit(task, idempotency_key="order-1").id == ha.id
    assert b.load_model("tiny-bart").submit(task, idempotency_key="order-1").id == hb.id
    for h in (ha, hb):
        h.cancel()


def test_a_conversation_never_enters_another_tenants_prompt(tenants):
    a, b = tenants
    chat_a, chat_b = a.load_model("tiny-gpt2"), b.load_model("tiny-gpt2")
    said = "I want a ticket to Beijing."
    follow = "For next Monday, please."

    def turn(model, utterance, cid):
        handle = model.submit(llmos.DialogueTask(user_utterance=utterance, conversation_id=cid))
        return handle.result(timeout=120), handle.job()

    first_a, _ = turn(chat_a, said, "user-42")
    second_a, second_a_job = turn(chat_a, follow, "user-42")
    b_turn, b_job = turn(chat_b, follow, "user-42")  # B's conversation of the same id
    fresh, fresh_job = turn(chat_b, follow, "fresh-conversation")
    third_a, _ = turn(chat_a, "Window seat.", "user-42")

    assert second_a.history_turns == 1 and said in second_a.prompt
    assert b_turn.history_turns == 0 and said not in b_turn.prompt and first_a.response not in b_turn.prompt
    assert b_turn.conversation_id == "user-42" and b_job.tenant == "tenant-b"
    # the worker gave B's turn exactly what a first turn gets; A's second turn carried its history
    assert b_job.tokens_in == fresh_job.tokens_in < second_a_job.tokens_in
    assert fresh.history_turns == 0
    assert third_a.history_turns == 2  # nor did B's turn enter A's conversation
