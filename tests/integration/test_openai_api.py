"""The OpenAI-compatible endpoints through the official `openai` package: a real uvicorn API, real
worker processes (a tiny GPT-2 serving writing and chat, minilm serving embed), Postgres and Redis."""

from __future__ import annotations

import base64
import json
import socket
import struct
import time
import uuid

import httpx
import openai
import pytest
import redis

from llmos import manager, streaming
from llmos.db import get_engine
from llmos.notify import publish_done
from tests import helpers
from tests.integration.test_api import ApiProcess

pytestmark = pytest.mark.integration

CONFIG = '''
[models.tiny-chat]
source = "{gpt2}"
kind = "causal-lm"
tasks = ["writing", "chat"]
max_new_tokens = 8
max_batch_size = 8
on_overflow = "reject"
options = {{ min_new_tokens = 2 }}

[models.tiny-idle]
source = "{gpt2}"
kind = "causal-lm"
tasks = ["writing", "chat"]
'''
"""tiny-chat has a worker; tiny-idle only a worker row (its jobs stay queued: the disconnect tests,
and the tests that play a worker's part: stream pieces published, then a result recorded)."""

IDLE_WORKER = f"tiny-idle@{socket.gethostname()}:0:fake"


@pytest.fixture(scope="module")
def config(tiny_folders, tmp_path_factory):
    path = tmp_path_factory.mktemp("oai-cfg") / "llmos.toml"
    path.write_text(CONFIG.format(gpt2=tiny_folders["gpt2"]))
    return path


@pytest.fixture(scope="module")
def stack(services, config):
    settings, env = services
    env = {**env, "LLMOS_CONFIG": str(config)}
    api = ApiProcess(env)
    workers = [helpers.WorkerProcess(env, model="tiny-chat"), helpers.WorkerProcess(env, model="minilm")]
    try:
        for w in workers:
            w.wait_ready(settings.db_url)
        api.wait_ready()
        engine = get_engine(settings.db_url)
        manager.register_worker(engine, worker_id=IDLE_WORKER, host="test", pid=0, model="tiny-idle",
                                device="cpu")
        yield api.url, engine
    finally:
        api.stop()
        for w in workers:
            assert w.stop() == 0, w.log()


def key(engine, tenant: str) -> str:
    return manager.create_api_key(engine, tenant=tenant)[1]


@pytest.fixture(scope="module")
def oai(stack):
    url, engine = stack
    secret = key(engine, "acme")
    with openai.OpenAI(base_url=url + "/v1", api_key=secret, max_retries=0, timeout=120) as client:
        yield client, url, engine, secret


def job_of(url: str, secret: str, response_id: str) -> dict:
    """The LLMOS job behind an OpenAI response id (chatcmpl-/cmpl-/embd- and the job id's hex)."""
    job_id = str(uuid.UUID(response_id.split("-", 1)[1]))
    resp = httpx.get(f"{url}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {secret}"}, timeout=30)
    assert resp.status_code == 200, resp.text
    return resp.json()


MESSAGES = [{"role": "system", "content": "You answer briefly."},
            {"role": "user", "content": "The cat likes"}]


def test_chat_completion(oai):
    client, url, _, secret = oai
    out = client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=6)
    job = job_of(url, secret, out.id)
    assert job["task"] == "chat" and job["status"] == "succeeded" and job["priority"] == 7
    assert out.object == "chat.completion" and out.model == "tiny-chat" and len(out.choices) == 1
    choice = out.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == job["result"]["text"]
    assert choice.finish_reason in ("stop", "length")
    assert out.usage.completion_tokens == job["result"]["tokens"] <= 6
    assert out.usage.prompt_tokens == job["result"]["prompt_tokens"] > 0
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    assert [m["role"] for m in job["input"]["messages"]] == ["system", "user"]
    again = client.chat.completions.retrieve(out.id)  # GET /v1/chat/completions/{id}
    assert again.choices[0].message.content == choice.message.content and again.id == out.id


def test_chat_completion_streamed(oai):
    client, url, _, secret = oai
    stream = client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=8, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)  # the package stops at data: [DONE]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1 and {c.object for c in chunks} == {"chat.completion.chunk"}
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    job = job_of(url, secret, chunks[0].id)
    assert "".join(deltas) == job["result"]["text"] and job["result"]["text"]
    assert len(deltas) >= 2  # pieces from the generation loop, not only the end's remainder
    assert finishes == [job["result"]["finish_reason"]]
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == job["result"]["tokens"]
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens


def test_completions_plain_and_streamed(oai):
    client, url, _, secret = oai
    out = client.completions.create(model="tiny-chat", prompt=["The cat likes", "A robot paints"], max_tokens=5)
    assert out.object == "text_completion" and [c.index for c in out.choices] == [0, 1]
    first = job_of(url, secret, out.id)
    assert first["task"] == "writing" and out.choices[0].text == first["result"]["text"]
    assert out.usage.completion_tokens >= first["result"]["tokens"]
    texts: dict[int, str] = {0: "", 1: ""}
    finished: dict[int, str] = {}
    for c in client.completions.create(model="tiny-chat", prompt=["The cat likes", "A robot paints"],
                                       max_tokens=5, stream=True):
        for choice in c.choices:
            texts[choice.index] += choice.text
            if choice.finish_reason:
                finished[choice.index] = choice.finish_reason
    # greedy decoding: the streamed texts are the plain answer's
    assert texts == {0: out.choices[0].text, 1: out.choices[1].text}
    assert finished == {0: out.choices[0].finish_reason, 1: out.choices[1].finish_reason}


def test_embeddings_float_and_base64(oai):
    client, url, _, secret = oai
    texts = ["a red ball", "the blue door"]
    floats = client.embeddings.create(model="minilm", input=texts)
    assert [d.index for d in floats.data] == [0, 1] and len(floats.data[0].embedding) == 384
    job = httpx.get(f"{url}/v1/jobs", params={"task": "embed", "limit": 1},  # OpenAI's shape has no id
                    headers={"Authorization": f"Bearer {secret}"}).json()["jobs"][0]
    assert job["input"]["texts"] == texts and job["priority"] == 7
    assert floats.usage.prompt_tokens == job["result"]["tokens"] == job["tokens_in"] > len(texts)
    raw = httpx.post(f"{url}/v1/embeddings", headers={"Authorization": f"Bearer {secret}"}, timeout=60,
                     json={"model": "minilm", "input": texts, "encoding_format": "base64"}).json()
    decoded = [list(struct.unpack(f"<{384}f", base64.b64decode(d["embedding"]))) for d in raw["data"]]
    for got, want in zip(decoded, floats.data):
        assert max(abs(a - b) for a, b in zip(got, want.embedding)) < 1e-6
    # the package asks for base64 itself when no format is given, and decodes it
    assert len(client.embeddings.create(model="minilm", input="one text").data[0].embedding) == 384


def test_models_list(oai):
    client, _, _, _ = oai
    models = {m.id: m for m in client.models.list()}
    assert {"tiny-chat", "minilm", "gpt2"} <= set(models)
    chat = models["tiny-chat"]
    assert chat.object == "model" and chat.owned_by == "llmos" and chat.created > 0
    extra = chat.model_extra  # LLMOS's own fields ride along
    assert extra["tasks"] == ["writing", "chat"] and extra["served"] is True and extra["workers"] >= 1
    assert client.models.retrieve("minilm").id == "minilm"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_errors(oai):
    client, url, engine, secret = oai
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert unknown.value.code == "model_not_found" and "no-such-model" in unknown.value.message
    with pytest.raises(openai.UnprocessableEntityError) as two:
        client.chat.completions.create(model="tiny-chat", messages=MESSAGES, n=2)
    assert "n: only 1" in two.value.message and two.value.type == "invalid_request_error"
    with pytest.raises(openai.UnprocessableEntityError) as role:
        client.chat.completions.create(model="tiny-chat", messages=[{"role": "tool", "content": "x",
                                                                       "tool_call_id": "1"}])
    assert "messages[0]" in role.value.message
    with pytest.raises(openai.UnprocessableEntityError) as unsupported:
        client.embeddings.create(model="tiny-chat", input="x")  # tiny-chat does not embed
    assert unsupported.value.code == "unsupported_task"
    with pytest.raises(openai.UnprocessableEntityError) as refused:  # over the window, on_overflow = "reject"
        client.completions.create(model="tiny-chat", prompt=" ".join(["the cat likes a red ball"] * 60))
    assert refused.value.code == "input_refused" and "context window" in refused.value.message
    assert refused.value.body["details"]["status"] == "failed"
    with pytest.raises(openai.APIError) as streamed:  # streamed: the error comes as the stream's last event
        with client.completions.create(model="tiny-chat", prompt=" ".join(["the cat likes"] * 80),
                                       stream=True) as stream:
            for _ in stream:
                pass
    assert "context window" in streamed.value.message and streamed.value.body["code"] == "input_refused"
    with pytest.raises(openai.InternalServerError) as no_worker:  # 503: nothing serves the built-in gpt2
        client.completions.create(model="gpt2", prompt="Hello")
    assert no_worker.value.status_code == 503 and no_worker.value.code == "no_worker"
    with openai.OpenAI(base_url=url + "/v1", api_key="llmos_nope", max_retries=0) as stranger:
        with pytest.raises(openai.AuthenticationError):
            stranger.models.list()


def test_another_tenant_cannot_see_the_answer(oai):
    client, url, engine, secret = oai
    out = client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=3)
    other = key(engine, "globex")
    with openai.OpenAI(base_url=url + "/v1", api_key=other, max_retries=0) as theirs:
        with pytest.raises(openai.NotFoundError):
            theirs.chat.completions.retrieve(out.id)
    job_id = str(uuid.UUID(out.id.removeprefix("chatcmpl-")))
    resp = httpx.get(f"{url}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {other}"})
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "not_found"
    assert client.chat.completions.retrieve(out.id).id == out.id  # its own tenant still can


def test_a_stream_closed_early_cancels_its_job(oai):
    client, url, engine, secret = oai
    stream = client.chat.completions.create(model="tiny-idle", messages=MESSAGES, stream=True)
    first = next(iter(stream))  # the role chunk; the job waits queued (tiny-idle's worker is a row only)
    assert first.choices[0].delta.role == "assistant"
    job_id = str(uuid.UUID(first.id.removeprefix("chatcmpl-")))
    stream.close()  # the connection closes: the API sees the client leave
    deadline = time.monotonic() + 30
    while (status := manager.job_statuses(engine, [job_id], tenant="acme")[job_id].value) != "cancelled":
        assert time.monotonic() < deadline, f"job still {status} after the client left"
        time.sleep(0.2)


def play_worker(engine, job_id: str, text: str) -> None:
    """Record `text` as the tiny-idle job's result, as its worker would, and announce it."""
    claimed, _ = manager.claim(engine, [job_id], worker_id=IDLE_WORKER, device="cpu", model="tiny-idle")
    assert [j.id for j in claimed] == [job_id]
    manager.finish(engine, [manager.Outcome(job_id=job_id, worker_id=IDLE_WORKER, attempt=claimed[0].attempts,
                                            result={"text": text, "tokens": 3, "prompt_tokens": 5,
                                                    "finish_reason": "stop"})])
    publish_done(redis.Redis.from_url(helpers.REDIS_URL), [job_id])


def test_a_retried_stream_is_not_spliced(oai):
    """Pieces of two attempts (a job retried on another worker): the older attempt's late pieces
    are dropped, the retry's text is sent only past what the client already has."""
    client, url, engine, secret = oai
    stream = client.chat.completions.create(model="tiny-idle", messages=MESSAGES, stream=True)
    chunks = iter(stream)
    job_id = str(uuid.UUID(next(chunks).id.removeprefix("chatcmpl-")))  # the role chunk: subscribed
    publish = redis.Redis.from_url(helpers.REDIS_URL)
    channel = streaming.stream_channel(job_id)
    for message in ({"a": 1, "i": 0, "delta": "Hello"}, {"a": 2, "i": 0, "delta": "Hel"},
                    {"a": 1, "i": 1, "delta": " stale"}, {"a": 2, "i": 1, "delta": "lo there"}):
        publish.publish(channel, json.dumps(message))
    assert next(chunks).choices[0].delta.content == "Hello"
    assert next(chunks).choices[0].delta.content == " there"
    play_worker(engine, job_id, "Hello there!")
    rest = list(chunks)
    assert [c.choices[0].delta.content for c in rest] == ["!", None]
    assert rest[-1].choices[0].finish_reason == "stop"


def test_a_stream_that_differs_from_the_result_ends_with_an_error(oai):
    client, url, engine, secret = oai
    stream = client.chat.completions.create(model="tiny-idle", messages=MESSAGES, stream=True)
    chunks = iter(stream)
    job_id = str(uuid.UUID(next(chunks).id.removeprefix("chatcmpl-")))
    redis.Redis.from_url(helpers.REDIS_URL).publish(streaming.stream_channel(job_id),
                                                    json.dumps({"a": 1, "i": 0, "delta": "The cat"}))
    assert next(chunks).choices[0].delta.content == "The cat"
    play_worker(engine, job_id, "A dog ran off.")  # the recorded text does not start with it
    with pytest.raises(openai.APIError) as wrong:
        list(chunks)
    assert wrong.value.body["code"] == "stream_mismatch" and wrong.value.body["details"]["job_id"] == job_id
    assert client.chat.completions.retrieve(f"chatcmpl-{job_id.replace('-', '')}").choices[0].message.content \
        == "A dog ran off."


def test_a_client_gone_before_the_stream_starts_leaves_nothing(oai):
    """A client that sends a streamed request and closes at once (the response never starts, nor
    its body): its job is cancelled and nothing stays subscribed to its channel."""
    _, url, engine, _ = oai
    secret = key(engine, "initech")  # a tenant of its own: its one job is this request's
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"model": "tiny-idle", "messages": MESSAGES, "stream": True}).encode()
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + secret.encode() + b"\r\nContent-Length: "
                     + str(len(body)).encode() + b"\r\n\r\n" + body)
    listener = redis.Redis.from_url(helpers.REDIS_URL)
    deadline = time.monotonic() + 30
    while True:
        jobs = httpx.get(f"{url}/v1/jobs", headers={"Authorization": f"Bearer {secret}"}).json()["jobs"]
        channel = streaming.stream_channel(jobs[0]["id"]) if jobs else None
        subscribers = dict(listener.pubsub_numsub(channel)).get(channel.encode(), 0) if channel else 1
        if jobs and jobs[0]["status"] == "cancelled" and subscribers == 0:
            break
        assert time.monotonic() < deadline, f"after the client left: {jobs}, {subscribers} subscriber(s)"
        time.sleep(0.2)
    assert len(jobs) == 1 and jobs[0]["model"] == "tiny-idle"


def test_a_response_that_never_starts_still_cancels_and_unsubscribes(oai, services, config):
    """An ASGI server of spec 2.4 raises OSError from `send` once the client is gone, so the
    response's start fails and its body never runs (no `finally` of its own): the app, in
    process on the same services, still cancels the job and closes the subscription."""
    import asyncio

    from llmos.api import create_app
    from llmos.api.routes import openai as routes

    _, url, engine, _ = oai
    secret = key(engine, "hooli")
    manager.register_worker(engine, worker_id=IDLE_WORKER, host="test", pid=0, model="tiny-idle", device="cpu")
    settings, _ = services
    app = create_app(settings.model_copy(update={"config": config}))
    body = json.dumps({"model": "tiny-idle", "messages": MESSAGES, "stream": True}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
             "root_path": "", "query_string": b"", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
             "headers": [(b"authorization", f"Bearer {secret}".encode()), (b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode())]}
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        raise OSError("the client is gone")

    async def run():
        with pytest.raises(Exception):
            await app(scope, receive, send)
        listener = redis.Redis.from_url(helpers.REDIS_URL)
        deadline = time.monotonic() + 30
        while True:
            jobs = await asyncio.to_thread(lambda: manager.list_jobs(engine, tenant="hooli", limit=5))
            channel = streaming.stream_channel(jobs[0].id) if jobs else "none"
            subscribers = dict(listener.pubsub_numsub(channel)).get(channel.encode(), 0)
            if jobs and jobs[0].status.value == "cancelled" and subscribers == 0:
                return jobs
            assert time.monotonic() < deadline, f"after the client left: {jobs}, {subscribers} subscriber(s)"
            await asyncio.sleep(0.2)

    async def main():
        try:
            return await run()
        finally:
            await routes.shutdown(app)
            app.state.client.close()

    jobs = asyncio.run(main())
    assert len(jobs) == 1 and jobs[0].model == "tiny-idle"
