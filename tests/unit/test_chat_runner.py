"""The chat runner's prompt (chat template, or plain lines) and token streaming from the generation
loop, on the tiny GPT-2 in process; the publishers' Redis is the real one (LLMOS_TEST_REDIS_URL)."""

from __future__ import annotations

import json
import time
import uuid

import pytest
import redis

from llmos import streaming
from llmos.jobs import Job, JobStatus
from llmos.tasks import ChatTask, WritingTask
from workers import model_cache
from workers.runners import runners_for
from workers.runners.generate import CHAT_TURN_STOPS, chat_lines
from workers.runners.generation import GenRequest, generate_causal

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The cat likes"},
            {"role": "assistant", "content": "a red ball."}, {"role": "user", "content": "And the dog?"}]
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


def chat_runner(registry, template: str | None = None):
    spec = registry.get("tiny-gpt2").model_copy(update={"tasks": ("writing", "chat")})
    loaded = model_cache.load(spec, "cpu")  # a copy of its own: the template is set on its tokenizer
    loaded.tokenizer.chat_template = template
    return runners_for(loaded)


def test_plain_lines_without_a_chat_template(tiny_registry):
    runner = chat_runner(tiny_registry)["chat"]
    task = ChatTask(messages=MESSAGES, stop=["zz"])
    text = chat_lines(task.messages)
    assert text == ("System: Be brief.\nUser: The cat likes\nAssistant: a red ball.\nUser: And the dog?\n"
                    "Assistant:")
    ids, stop, lstrip = runner.prompt(task)
    assert ids == runner.loaded.tokenizer.encode(text, add_special_tokens=False)
    assert stop == ["zz", *CHAT_TURN_STOPS] and lstrip is True
    out = runner.run([task])[0]
    assert out.error is None and out.result["prompt_tokens"] == len(ids) == out.tokens_in
    assert out.result["text"] == out.result["text"].lstrip() and "\nUser:" not in out.result["text"]


def test_the_chat_template_when_the_tokenizer_has_one(tiny_registry):
    runner = chat_runner(tiny_registry, TEMPLATE)["chat"]
    ids, stop, lstrip = runner.prompt(ChatTask(messages=MESSAGES))
    assert runner.loaded.tokenizer.decode(ids) == ("<system>Be brief.\n<user>The cat likes\n"
                                                   "<assistant>a red ball.\n<user>And the dog?\n<assistant>")
    assert stop == [] and lstrip is False


def test_a_template_that_refuses_the_messages_fails_that_job_only(tiny_registry):
    strict = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}x"
    runner = chat_runner(tiny_registry, strict)["chat"]
    bad, good = runner.run([ChatTask(messages=MESSAGES), ChatTask(messages=MESSAGES[1:2])])
    assert "chat template refused" in bad.error and "no system role" in bad.error
    assert good.error is None and good.result["tokens"] > 0


def test_chat_generates_as_writing_does(tiny_registry):
    runners = chat_runner(tiny_registry, TEMPLATE)
    task = ChatTask(messages=MESSAGES[:2], max_new_tokens=6, stop=["."])
    prompt = runners["chat"].loaded.tokenizer.decode(runners["chat"].prompt(task)[0])
    chat = runners["chat"].run([task])[0].result
    writing = runners["writing"].run([WritingTask(prompt=prompt, max_new_tokens=6, stop=["."])])[0].result
    assert chat == writing


class Pieces:
    """A publisher that keeps what it is given (TokenPublisher's interface)."""

    def __init__(self) -> None:
        self.text, self.ended, self.broken, self.pieces = "", False, False, []

    def delta(self, text: str) -> None:
        if text:
            self.text += text
            self.pieces.append(text)

    def end(self) -> None:
        self.ended = True


@pytest.mark.parametrize("prompt", ["The cat likes", "My friend", "写一篇关于人工智能", "Hello, how are you?"])
def test_streamed_pieces_join_to_the_final_text(tiny_registry, prompt):
    loaded = model_cache.get(tiny_registry.get("tiny-gpt2"), "cpu")
    ids = loaded.tokenizer.encode(prompt, add_special_tokens=False)
    listened, quiet = Pieces(), Pieces()
    outs = generate_causal(loaded, [GenRequest(ids=ids, max_new_tokens=12, stream=listened),
                                    GenRequest(ids=ids, max_new_tokens=5)])
    assert "".join(listened.pieces) == outs[0].text
    assert not listened.ended  # the runner ends a stream, once the job's outcome is a result
    assert quiet.pieces == [] and outs[1].text == outs[0].text[:len(outs[1].text)]  # its own cap
    # no piece splits a character: the pieces before the end's remainder never hold U+FFFD
    assert all("\ufffd" not in p for p in listened.pieces[:-1])


def test_nothing_past_a_stop_string_is_published(tiny_registry):
    loaded = model_cache.get(tiny_registry.get("tiny-gpt2"), "cpu")
    ids = loaded.tokenizer.encode("the river opens", add_special_tokens=False)
    free = generate_causal(loaded, [GenRequest(ids=ids, max_new_tokens=12)])[0].text
    stop = free[-2:]  # " opens opensPaPa...": the stop first comes after two pieces
    assert free.find(stop) > 6, free
    pieces = Pieces()
    out = generate_causal(loaded, [GenRequest(ids=ids, max_new_tokens=12, stop=[stop], stream=pieces)])[0]
    assert out.text == free[:free.find(stop)] and out.finish_reason == "stop"
    assert "".join(pieces.pieces) == out.text and len(pieces.pieces) > 1


def test_only_listened_jobs_are_published(tiny_registry, redis_url):
    client = redis.Redis.from_url(redis_url)
    runner = runners_for(model_cache.get(tiny_registry.get("tiny-gpt2"), "cpu"), redis=client)["writing"]
    jobs = [Job(id=str(uuid.uuid4()), model="tiny-gpt2", task_type="writing", priority=5,
                status=JobStatus.RUNNING, input={}, attempts=3) for _ in range(2)]
    sub = client.pubsub(ignore_subscribe_messages=True)
    sub.subscribe(streaming.stream_channel(jobs[0].id))
    sub.psubscribe(streaming.stream_channel("*"))  # a pattern is not a listener (NUMSUB counts channels)
    tasks = [WritingTask(prompt="The cat likes", max_new_tokens=6), WritingTask(prompt="Hello", max_new_tokens=6)]
    outs = runner.run(tasks, jobs)
    mine, published_on = [], set()  # the channel's messages; every channel the pattern saw
    deadline = time.monotonic() + 2.0  # every message published is in the socket by now
    while time.monotonic() < deadline:
        m = sub.get_message(timeout=0.2)
        if m and m["type"] == "message":
            mine.append(json.loads(m["data"]))
        elif m and m["type"] == "pmessage":
            published_on.add(m["channel"].decode())
    sub.close()
    assert published_on == {streaming.stream_channel(jobs[0].id)}  # nothing for the job nobody listens to
    assert [m["i"] for m in mine] == list(range(len(mine))) and mine[-1] == {"a": 3, "i": len(mine) - 1, "end": True}
    assert {m["a"] for m in mine} == {3}  # the job's attempt
    assert "".join(m.get("delta", "") for m in mine) == outs[0].result["text"]


def read_channel(sub) -> list[dict]:
    """The messages of a subscription so far (whatever comes within a second of another)."""
    return [json.loads(m["data"]) for m in iter(lambda: sub.get_message(timeout=1.0), None)
            if m["type"] == "message"]


def test_an_attempt_that_fails_after_its_pieces_ends_nothing(tiny_registry, redis_url):
    """Pieces published, then the job fails (here the runner's postprocess raises, alone too): its
    stream gets no `end`, since the job may run again as a new attempt."""
    from workers.runners.generate import WritingRunner

    class Failing(WritingRunner):
        def postprocess(self, outputs, requests):
            raise RuntimeError("a bug after generation")

    client = redis.Redis.from_url(redis_url)
    runner = Failing(model_cache.get(tiny_registry.get("tiny-gpt2"), "cpu"))
    runner.redis = client
    job = Job(id=str(uuid.uuid4()), model="tiny-gpt2", task_type="writing", priority=5, status=JobStatus.RUNNING,
              input={}, attempts=1)
    sub = client.pubsub()
    sub.subscribe(streaming.stream_channel(job.id))
    assert sub.get_message(timeout=5)["type"] == "subscribe"
    out = runner.run([WritingTask(prompt="The cat likes", max_new_tokens=6)], [job])[0]
    got = read_channel(sub)
    sub.close()
    assert out.error == "RuntimeError: a bug after generation"
    assert got and all(m["a"] == 1 and "delta" in m for m in got), got  # pieces, and no end
