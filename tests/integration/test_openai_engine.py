"""The openai engine's client against a real OpenAI-compatible server on loopback."""

import pytest

from llmos.registry import ModelSpec
from llmos.tasks import EmbeddingTask, WritingTask
from tests.conftest import start_openai_server, stop_openai_server
from workers import model_cache
from workers.runners import runners_for

pytestmark = pytest.mark.integration


def writer(url, **options):
    spec = ModelSpec(name="remote", engine="openai", source=url, tasks=("writing", "embed"), max_new_tokens=4,
                     options={"model": "tiny-gpt2", "backoff_s": 0.01, **options})
    return runners_for(model_cache.load(spec, "cpu"))


@pytest.fixture(scope="module")
def flaky_server(tiny_folders):
    proc, url = start_openai_server(tiny_folders["gpt2"], "--fail-first", "3")
    yield url
    stop_openai_server(proc)


def test_429s_are_retried_until_success(flaky_server):
    out = writer(flaky_server, api_key_env="", max_retries=3)["writing"].run([WritingTask(prompt="The cat")])[0]
    assert out.error is None and out.result["tokens"] >= 1  # three 429s, then an answer


def test_retries_give_up_with_the_status(tiny_folders):
    proc, url = start_openai_server(tiny_folders["gpt2"], "--fail-first", "10")
    try:
        out = writer(url, api_key_env="", max_retries=2)["writing"].run([WritingTask(prompt="The cat")])[0]
    finally:
        stop_openai_server(proc)
    assert out.error.startswith(f"{url}/completions answered 429") and "after 3 tries" in out.error


def test_wrong_key_is_not_retried(openai_server, monkeypatch):
    url, _ = openai_server
    monkeypatch.setenv("LLMOS_T_KEY", "wrong")
    r = writer(url, api_key_env="LLMOS_T_KEY")["writing"]
    r.run([WritingTask(prompt="x")])  # uses up the 429s this server starts with, if still there
    out = r.run([WritingTask(prompt="x")])[0]
    assert "answered 401" in out.error and "tries" not in out.error


def test_missing_key_is_a_clear_job_error(openai_server, monkeypatch):
    url, _ = openai_server
    monkeypatch.delenv("LLMOS_T_MISSING", raising=False)
    out = writer(url, api_key_env="LLMOS_T_MISSING")["writing"].run([WritingTask(prompt="x")])[0]
    assert out.error == ("model 'remote' needs an API key: set LLMOS_T_MISSING in the worker's environment "
                         "(or api_key_env = \"\" in llmos.toml for a server without auth)")


def test_unreachable_endpoint_is_a_clear_job_error():
    out = writer("http://127.0.0.1:1/v1", api_key_env="", max_retries=1)["embed"].run(
        [EmbeddingTask(texts=["a"]), EmbeddingTask(texts=["b"])])
    for o in out:
        assert o.error.startswith("cannot reach the OpenAI-compatible endpoint http://127.0.0.1:1/v1/embeddings")


def test_embeddings_keep_the_order_of_inputs(openai_server, monkeypatch):
    url, key = openai_server
    monkeypatch.setenv("LLMOS_T_KEY", key)
    r = writer(url, api_key_env="LLMOS_T_KEY")["embed"]
    both = r.run([EmbeddingTask(texts=["the cat", "a dog"]), EmbeddingTask(texts=["the river"])])
    alone = r.run([EmbeddingTask(texts=["the river"])])[0]
    assert [len(o.result["vectors"]) for o in both] == [2, 1]
    assert both[1].result["vectors"][0] == pytest.approx(alone.result["vectors"][0], abs=1e-5)


def stats(url):
    import httpx

    return httpx.get(url.removesuffix("/v1") + "/stats").json()


def job(task, job_id=None):
    from llmos.jobs import Job, JobStatus, new_ids

    return Job(id=job_id or new_ids(1)[0], model="remote", task_type=task.task_type, priority=0,
               status=JobStatus.RUNNING, input=task.model_dump(), attempts=1)


def test_retry_after_is_honoured(tiny_folders):
    # The server refuses twice with Retry-After: 0.5 and refuses (and counts) any request that
    # comes sooner than it said; the client's own backoff (backoff_s) would be far sooner.
    proc, url = start_openai_server(tiny_folders["gpt2"], "--fail-first", "2", "--retry-after", "0.5")
    try:
        out = writer(url, api_key_env="", max_retries=3, backoff_s=0.001)["writing"].run(
            [WritingTask(prompt="The cat")])[0]
        seen = stats(url)
    finally:
        stop_openai_server(proc)
    assert out.error is None, out.error
    assert seen["early"] == 0 and seen["posts"] == 3  # two 429s, one answer, no early retry
    assert seen["authorization"] is None  # api_key_env = "": no Authorization header at all


def test_one_rejected_job_fails_alone(openai_server, monkeypatch):
    url, key = openai_server
    monkeypatch.setenv("LLMOS_T_KEY", key)
    r = writer(url, api_key_env="LLMOS_T_KEY")["writing"]
    r.run([WritingTask(prompt="x")])  # uses up the 429s this server starts with, if still there
    tasks = [WritingTask(prompt="The cat"), WritingTask(prompt="bad [[400]] prompt"), WritingTask(prompt="A dog")]
    out = r.run(tasks, [job(t) for t in tasks])
    assert out[0].error is None and out[2].error is None and out[0].result["tokens"] >= 1
    assert out[1].error.startswith(f"{url}/completions answered 400") and "rejected" in out[1].error
    assert out[1].transient is False and out[1].result is None


def test_chat_job(openai_server, monkeypatch):
    from llmos.tasks import ChatTask, WritingResult

    url, key = openai_server
    monkeypatch.setenv("LLMOS_T_KEY", key)
    spec = ModelSpec(name="remote", engine="openai", source=url, tasks=("chat",), max_new_tokens=4,
                     options={"model": "tiny-gpt2", "backoff_s": 0.01, "api_key_env": "LLMOS_T_KEY"})
    r = runners_for(model_cache.load(spec, "cpu"))["chat"]
    r.run([ChatTask(messages=[{"role": "user", "content": "x"}])])  # the server's first 429s
    task = ChatTask(messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
                    max_new_tokens=3)
    out = r.run([task], [job(task)])[0]
    assert out.error is None, out.error
    result = WritingResult(**out.result)
    assert result.text and result.tokens == out.tokens_out >= 1 and result.prompt_tokens > 0
    assert result.finish_reason == "length"
    assert stats(url)["authorization"] == f"Bearer {key}"


def subscribe(redis_url, channel, pattern=False):
    """A pub/sub connection on `channel` (or the channels matching it), confirmed subscribed."""
    import redis

    pubsub = redis.Redis.from_url(redis_url).pubsub()
    (pubsub.psubscribe if pattern else pubsub.subscribe)(channel)
    assert pubsub.get_message(timeout=5)["type"] in ("subscribe", "psubscribe")
    return pubsub


def read_streams(pubsub):
    """Every stream message published so far, by job id (whatever comes within a second of another)."""
    import json

    from llmos.constants import STREAM_CHANNEL_PREFIX

    got: dict[str, list] = {}
    for message in iter(lambda: pubsub.get_message(timeout=1), None):
        got.setdefault(message["channel"].decode()[len(STREAM_CHANNEL_PREFIX):], []).append(
            json.loads(message["data"]))
    return got


@pytest.mark.parametrize("kind", ["writing", "chat"])
def test_streamed_job_relays_the_remote_stream(openai_server, redis_url, monkeypatch, kind):
    from llmos.streaming import stream_channel
    from llmos.tasks import ChatTask

    url, key = openai_server
    monkeypatch.setenv("LLMOS_T_KEY", key)
    monkeypatch.setenv("LLMOS_REDIS_URL", redis_url)  # the worker's settings: where streams go
    spec = ModelSpec(name="remote", engine="openai", source=url, tasks=("writing", "chat"), max_new_tokens=6,
                     options={"model": "tiny-gpt2", "backoff_s": 0.01, "api_key_env": "LLMOS_T_KEY"})
    runner = runners_for(model_cache.load(spec, "cpu"))[kind]
    make = (lambda p: WritingTask(prompt=p, max_new_tokens=6)) if kind == "writing" else \
        (lambda p: ChatTask(messages=[{"role": "user", "content": p}], max_new_tokens=6))
    runner.run([make("warm up")])  # the server's first 429s
    tasks = [make("The cat sat on"), make("A dog ran to")]
    jobs = [job(t) for t in tasks]
    listener = subscribe(redis_url, stream_channel(jobs[0].id))  # only the first job has a subscriber
    everything = subscribe(redis_url, stream_channel("*"), pattern=True)  # a pattern: PUBSUB NUMSUB does not count it
    out = runner.run(tasks, jobs)
    got = read_streams(listener)[jobs[0].id]
    published = read_streams(everything)
    assert all(o.error is None for o in out), [o.error for o in out]
    deltas = [m["delta"] for m in got if "delta" in m]
    assert got[-1] == {"a": 1, "i": len(got) - 1, "end": True} and [m["i"] for m in got] == list(range(len(got)))
    assert {m["a"] for m in got} == {jobs[0].attempts}
    assert len(deltas) >= 1 and "".join(deltas) == out[0].result["text"]
    assert out[0].result["tokens"] >= len(deltas) and out[0].result["prompt_tokens"] > 0  # the usage chunk
    assert set(published) == {jobs[0].id}  # the job nobody listens to went unstreamed
    assert out[1].result["text"]


def test_a_key_change_closes_the_old_client_once_unused(monkeypatch):
    from workers.runners.openai import OpenAIClient

    spec = ModelSpec(name="remote", engine="openai", source="http://127.0.0.1:1/v1", tasks=("writing",),
                     options={"api_key_env": "LLMOS_T_ROTATED"})
    client = OpenAIClient(spec)
    monkeypatch.setenv("LLMOS_T_ROTATED", "old-key")
    with client.using() as old:  # a call in flight on the old key
        monkeypatch.setenv("LLMOS_T_ROTATED", "new-key")
        new = client.api()
        assert new is not old and new.api_key == "new-key"
        assert not old.is_closed()  # still in use: closing it would break that call
    assert old.is_closed() and not new.is_closed()
    monkeypatch.setenv("LLMOS_T_ROTATED", "newer-key")
    newest = client.api()  # nothing uses `new`: closed at once
    assert new.is_closed() and not newest.is_closed()


@pytest.mark.parametrize("kind", ["writing", "chat"])
def test_a_stream_that_breaks_off_ends_nothing(openai_server, redis_url, monkeypatch, kind):
    """The remote stream breaks after two pieces (a retryable transport error): the job fails as
    transient with its pieces published under its attempt, and no `end`, since it may run again."""
    import dataclasses

    from llmos.streaming import stream_channel
    from llmos.tasks import ChatTask

    url, key = openai_server
    monkeypatch.setenv("LLMOS_T_KEY", key)
    monkeypatch.setenv("LLMOS_REDIS_URL", redis_url)
    spec = ModelSpec(name="remote", engine="openai", source=url, tasks=("writing", "chat"), max_new_tokens=6,
                     options={"model": "tiny-gpt2", "backoff_s": 0.01, "api_key_env": "LLMOS_T_KEY",
                              "max_retries": 0})
    runner = runners_for(model_cache.load(spec, "cpu"))[kind]
    prompt = "[[break]] The cat sat on"
    task = WritingTask(prompt=prompt, max_new_tokens=6) if kind == "writing" else \
        ChatTask(messages=[{"role": "user", "content": prompt}], max_new_tokens=6)
    runner.run([task])  # the server's first 429s, if still there (max_retries = 0: one a run)
    runner.run([task])
    listened = dataclasses.replace(job(task), attempts=2)  # its second attempt
    listener = subscribe(redis_url, stream_channel(listened.id))
    out = runner.run([task], [listened])[0]
    got = read_streams(listener).get(listened.id, [])
    assert out.error and "RemoteProtocolError" in out.error and out.transient, out.error
    assert [m["i"] for m in got] == list(range(len(got))) and len(got) >= 1
    assert all(m["a"] == 2 and "delta" in m for m in got), got  # the attempt in each; no end
