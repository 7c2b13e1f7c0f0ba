"""llmos.openai_protocol: OpenAI request bodies as LLMOS tasks, jobs as OpenAI responses and chunks."""

from __future__ import annotations

import base64
import struct
import uuid
from datetime import datetime, timezone

import pytest

from llmos import openai_protocol as oa
from llmos.errors import ValidationError
from llmos.jobs import Job, JobStatus
from llmos.tasks import ChatTask, EmbeddingTask, WritingTask

MESSAGES = [{"role": "user", "content": "Hi"}]


def job(result: dict, **fields) -> Job:
    return Job(id=str(uuid.UUID(int=7)), model="m", task_type="chat", priority=7, status=JobStatus.SUCCEEDED,
               input={}, result=result, created_at=datetime(2026, 1, 2, tzinfo=timezone.utc), **fields)


def test_chat_request_becomes_one_chat_task():
    req = oa.parse_request(oa.CHAT, {
        "model": "gpt2", "messages": [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]},
            {"role": "assistant", "content": ""}, {"role": "user", "content": "Again", "name": "bob"}],
        "max_tokens": 5, "max_completion_tokens": 9, "temperature": 1, "top_p": 0.5, "stop": "\n",
        "seed": 3, "user": "u1", "presence_penalty": 0, "metadata": {"a": "b"}})
    assert req.endpoint == oa.CHAT and req.model == "gpt2" and not req.stream and len(req.tasks) == 1
    task = req.tasks[0]
    assert isinstance(task, ChatTask)
    assert [(m.role, m.content) for m in task.messages] == [
        ("system", "Be brief."), ("user", "Hello there"), ("assistant", ""), ("user", "Again")]
    assert task.max_new_tokens == 9  # max_completion_tokens wins over the older max_tokens
    assert task.temperature == 1.0 and isinstance(task.temperature, float)
    assert (task.top_p, task.stop, task.seed) == (0.5, ["\n"], 3)


def test_completions_one_task_per_prompt_and_stream_flags():
    req = oa.parse_request(oa.COMPLETIONS, {"model": "gpt2", "prompt": ["a", "b"], "max_tokens": 4,
                                            "stream": True, "stream_options": {"include_usage": True}})
    assert [t.prompt for t in req.tasks] == ["a", "b"] and all(isinstance(t, WritingTask) for t in req.tasks)
    assert all(t.max_new_tokens == 4 for t in req.tasks) and req.stream and req.include_usage
    plain = oa.parse_request(oa.COMPLETIONS, {"model": "gpt2", "prompt": "a", "stream_options": {"include_usage": True}})
    assert not plain.stream and not plain.include_usage  # usage chunks only in a stream


def test_embeddings_request():
    req = oa.parse_request(oa.EMBEDDINGS, {"model": "minilm", "input": "one", "encoding_format": "base64"})
    assert req.tasks == [EmbeddingTask(texts=["one"])] and req.encoding_format == "base64"
    assert oa.parse_request(oa.EMBEDDINGS, {"model": "minilm", "input": ["a", "b"]}).encoding_format == "float"


@pytest.mark.parametrize("endpoint, body, says", [
    (oa.CHAT, {"messages": MESSAGES}, "model: required"),
    (oa.CHAT, {"model": "m", "messages": MESSAGES, "n": 2}, "n: only 1"),
    (oa.CHAT, {"model": "m", "messages": MESSAGES, "tools": [{"type": "function"}]}, "tools"),
    (oa.CHAT, {"model": "m", "messages": MESSAGES, "logprobs": True}, "logprobs"),
    (oa.CHAT, {"model": "m", "messages": MESSAGES, "frequency_penalty": 0.5}, "frequency_penalty"),
    (oa.CHAT, {"model": "m", "messages": MESSAGES, "response_format": {"type": "json_object"}}, "response_format"),
    (oa.CHAT, {"model": "m", "messages": MESSAGES, "stream_options": {"x": 1}}, "stream_options"),
    (oa.CHAT, {"model": "m", "messages": MESSAGES, "stream": "yes"}, "stream"),
    (oa.CHAT, {"model": "m", "messages": MESSAGES, "frobnicate": 1}, "frobnicate"),
    (oa.CHAT, {"model": "m", "messages": []}, "messages"),
    (oa.CHAT, {"model": "m", "messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    (oa.CHAT, {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "text parts"),
    (oa.CHAT, {"model": "m", "messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "tool_calls"),
    (oa.CHAT, {"model": "m", "messages": MESSAGES, "max_tokens": 0}, "max_new_tokens"),
    (oa.CHAT, {"model": "m", "messages": MESSAGES, "temperature": 3}, "temperature"),
    (oa.COMPLETIONS, {"model": "m", "prompt": [1, 2]}, "token ids"),
    (oa.COMPLETIONS, {"model": "m", "prompt": "x", "echo": True}, "echo"),
    (oa.COMPLETIONS, {"model": "m", "prompt": "x", "suffix": "y"}, "suffix"),
    (oa.EMBEDDINGS, {"model": "m", "input": "x", "dimensions": 8}, "dimensions"),
    (oa.EMBEDDINGS, {"model": "m", "input": "x", "encoding_format": "hex"}, "encoding_format"),
    (oa.EMBEDDINGS, {"model": "m", "input": []}, "input"),
    ("/v1/audio", {"model": "m"}, "unknown endpoint"),
])
def test_what_cannot_be_honoured_is_refused_by_name(endpoint, body, says):
    with pytest.raises(ValidationError, match=None) as exc:
        oa.parse_request(endpoint, body)
    assert says in str(exc.value), str(exc.value)


def test_chat_response_and_usage():
    req = oa.parse_request(oa.CHAT, {"model": "gpt2", "messages": MESSAGES})
    j = job({"text": "Hello!", "tokens": 3, "prompt_tokens": 5, "finish_reason": "stop"})
    body = oa.response_body(req, [j])
    assert body["id"] == "chatcmpl-" + "0" * 31 + "7" and body["object"] == "chat.completion"
    assert body["created"] == int(datetime(2026, 1, 2, tzinfo=timezone.utc).timestamp())
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "Hello!"},
                                "finish_reason": "stop", "logprobs": None}]
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}


def test_completions_response_sums_usage_over_prompts():
    req = oa.parse_request(oa.COMPLETIONS, {"model": "gpt2", "prompt": ["a", "b"]})
    jobs = [job({"text": "x", "tokens": 2, "prompt_tokens": 1, "finish_reason": "length"}),
            job({"text": "y", "tokens": 4, "prompt_tokens": 3, "finish_reason": "stop"})]
    body = oa.response_body(req, jobs)
    assert [(c["index"], c["text"], c["finish_reason"]) for c in body["choices"]] == [(0, "x", "length"),
                                                                                   (1, "y", "stop")]
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 6, "total_tokens": 10}


def test_embeddings_response_float_and_base64():
    vectors = [[0.5, -1.25, 3.0], [0.0, 1.0, 2.0]]
    j = job({"vectors": vectors, "dim": 3, "tokens": 9})
    for fmt in ("float", "base64"):
        req = oa.parse_request(oa.EMBEDDINGS, {"model": "minilm", "input": ["a", "b"], "encoding_format": fmt})
        body = oa.response_body(req, [j])
        assert body["object"] == "list" and body["usage"] == {"prompt_tokens": 9, "total_tokens": 9}
        got = [d["embedding"] for d in body["data"]]
        if fmt == "base64":
            got = [list(struct.unpack("<3f", base64.b64decode(g))) for g in got]
        assert got == vectors and [d["index"] for d in body["data"]] == [0, 1]


def test_encode_vector_is_little_endian_float32():
    assert base64.b64decode(oa.encode_vector([1.0, -2.0])) == struct.pack("<2f", 1.0, -2.0)
    assert oa.encode_vector([]) == ""


def test_stream_chunks():
    chat = oa.parse_request(oa.CHAT, {"model": "gpt2", "messages": MESSAGES, "stream": True,
                                      "stream_options": {"include_usage": True}})
    j = job({})
    first = oa.chunk(chat, j, delta={"role": "assistant", "content": ""})
    assert first["object"] == "chat.completion.chunk" and first["id"] == oa.response_id(chat, j)
    assert first["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                 "finish_reason": None, "logprobs": None}]
    assert oa.chunk(chat, j, finish_reason="length")["choices"][0]["delta"] == {}
    usage = oa.chunk(chat, j, usage={"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3})
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] == 3
    comp = oa.parse_request(oa.COMPLETIONS, {"model": "gpt2", "prompt": ["a", "b"], "stream": True})
    piece = oa.chunk(comp, j, text="hi", index=1)
    assert piece["object"] == "text_completion" and piece["choices"][0]["text"] == "hi"
    assert piece["choices"][0]["index"] == 1


@pytest.mark.parametrize("status, error, code", [
    (JobStatus.FAILED, "prompt of 300 tokens does not fit model 'm''s context window of 128 tokens", "input_refused"),
    (JobStatus.FAILED, "model 'm''s chat template refused these messages: TemplateError: roles must alternate",
     "input_refused"),
    (JobStatus.FAILED, "RuntimeError: CUDA error: device-side assert triggered", "job_failed"),
    (JobStatus.FAILED, "worker lost during attempt 3 of 3 (it died or stopped heartbeating)", "worker_unavailable"),
    (JobStatus.FAILED, "out of memory even alone: CUDA out of memory", "worker_unavailable"),
    (JobStatus.FAILED, "timeout: ran over its 300 s limit", "timeout"),
    (JobStatus.EXPIRED, "expired: its deadline passed before it started", "timeout"),
    (JobStatus.CANCELLED, "cancelled by user", "job_cancelled"),
    (JobStatus.RUNNING, None, "timeout"),  # still not final when the wait ran out
])
def test_a_failed_job_answers_by_why(status, error, code):
    from llmos.api.errors import error_status
    from llmos.api.routes.openai import job_error

    j = Job(id=str(uuid.UUID(int=1)), model="m", task_type="chat", priority=7, status=status, input={}, error=error)
    err = job_error(j, j.id)
    assert error_status(err)[1] == code and err.details["job_id"] == j.id
    assert error_status(err)[0] < 500 if code in ("input_refused", "job_cancelled") else error_status(err)[0] >= 500


# -- any JSON value in any field: a ValidationError, never another exception ----------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                    max_leaves=8)
"""Any value a JSON body can hold (NaN and infinities too: Python's json module reads them)."""

MESSAGE = st.fixed_dictionaries({}, optional={"role": JSON | st.sampled_from(["user", "system", "tool"]),
                                             "content": JSON | st.just([{"type": "text", "text": JSON}]),
                                             "name": JSON})
GOOD = {oa.CHAT: {"model": "m", "messages": MESSAGES}, oa.COMPLETIONS: {"model": "m", "prompt": "x"},
        oa.EMBEDDINGS: {"model": "m", "input": "x"}}
FIELDS = {e: sorted(oa._FIELDS[e] | oa._TOLERATED | oa._ZERO_ONLY) for e in oa.ENDPOINTS}


@st.composite
def bodies(draw):
    """A body for an endpoint: a valid one with up to two of its fields (or an unknown name) set to
    arbitrary JSON, a chat's messages often a list of arbitrary message objects; now and then the
    body itself arbitrary JSON."""
    endpoint = draw(st.sampled_from(oa.ENDPOINTS))
    if draw(st.integers(0, 9)) == 0:
        return endpoint, draw(JSON)
    body = dict(GOOD[endpoint])
    for name in draw(st.lists(st.sampled_from(FIELDS[endpoint] + ["frobnicate"]), max_size=2)):
        body[name] = draw(JSON)
    if endpoint == oa.CHAT and draw(st.booleans()):
        body["messages"] = draw(st.lists(MESSAGE, min_size=1, max_size=3) | JSON)
    if draw(st.booleans()):
        body["stream"] = True
        if draw(st.booleans()):
            body["stream_options"] = {"include_usage": draw(JSON)}
    return endpoint, body


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bodies())
def test_any_json_in_any_field_is_a_validation_error_or_a_request(case):
    endpoint, body = case
    try:
        req = oa.parse_request(endpoint, body)
    except ValidationError:
        return
    assert req.endpoint == endpoint and req.tasks and isinstance(req.stream, bool)
    assert isinstance(req.include_usage, bool) and req.encoding_format in ("float", "base64")


@pytest.mark.parametrize("endpoint, body", [
    (oa.CHAT, {"model": "m", "messages": [{"role": ["user"], "content": "x"}]}),
    (oa.CHAT, {"model": "m", "messages": [{"role": {"a": 1}, "content": "x"}]}),
    (oa.CHAT, {"model": "m", "messages": MESSAGES, "stream": 1}),
    (oa.CHAT, {"model": "m", "messages": MESSAGES, "n": True}),
    (oa.CHAT, {"model": "m", "messages": MESSAGES, "presence_penalty": False}),
    (oa.CHAT, {"model": "m", "messages": MESSAGES, "stream": True, "stream_options": {"include_usage": "no"}}),
    (oa.EMBEDDINGS, {"model": "m", "input": "x", "encoding_format": []}),
])
def test_values_of_the_wrong_type_are_refused(endpoint, body):
    with pytest.raises(ValidationError):
        oa.parse_request(endpoint, body)


def test_a_refused_field_takes_its_own_type_only():
    base = {"model": "m", "messages": MESSAGES}
    assert oa.parse_request(oa.CHAT, {**base, "logprobs": False, "top_logprobs": 0, "tools": []}).tasks
    for field, value in (("logprobs", 0), ("top_logprobs", False), ("tool_choice", ["none"])):
        with pytest.raises(ValidationError, match=field):
            oa.parse_request(oa.CHAT, {**base, field: value})


# -- token streams: attempts told apart (llmos.streaming.Relay) ----------------------------------

from llmos import streaming  # noqa: E402


def piece(a: int, i: int, delta: str | None = None) -> dict:
    return {"a": a, "i": i, **({"delta": delta} if delta is not None else {"end": True})}


def test_a_relay_drops_an_older_attempt_and_sends_a_retry_only_past_what_was_sent():
    r = streaming.Relay()
    assert r.feed(piece(1, 0, "Hello")) == "Hello"
    assert r.feed(piece(2, 0, "Hel")) == ""  # the retry (another worker) catching up
    assert r.feed(piece(1, 1, " stale")) == ""  # the first attempt's last piece, arriving late
    assert r.feed(piece(2, 1, "lo there")) == " there"
    assert r.feed(piece(1, 2)) == "" and not r.ended  # an older attempt's end ends nothing
    assert r.feed(piece(2, 2)) == "" and r.ended
    assert r.sent == "Hello there" and r.rest("Hello there!") == "!"


def test_a_retry_whose_text_differs_is_not_spliced_and_the_rest_says_so():
    r = streaming.Relay()
    assert r.feed(piece(1, 0, "The cat")) == "The cat"
    assert r.feed(piece(2, 0, "A dog")) == ""  # sampled again (temperature > 0): another text
    assert r.feed(piece(2, 1, " ran off")) == ""
    assert r.sent == "The cat"
    assert r.rest("A dog ran off") is None  # the client must be told, not left with "The cat"
    assert r.rest("The cat sat.") == " sat."


def test_a_lost_piece_stops_the_relay_of_that_attempt_until_the_rest():
    r = streaming.Relay()
    assert r.feed(piece(1, 0, "a")) == "a"
    assert r.feed(piece(1, 2, "c")) == ""  # piece 1 lost
    assert r.rest("abc") == "bc"


def test_stream_messages_carry_the_attempt():
    assert streaming.parse_message('{"a": 1, "i": 0, "delta": "x"}') == {"a": 1, "i": 0, "delta": "x"}
    assert streaming.parse_message('{"a": 2, "i": 3, "end": true}') == {"a": 2, "i": 3, "end": True}
    for bad in ('{"i": 0, "delta": "x"}', '{"a": true, "i": 0, "delta": "x"}', '{"a": 1, "i": 0}',
                '[1]', 'nope', '{"a": 1, "i": "0", "delta": "x"}'):
        assert streaming.parse_message(bad) is None, bad
    assert streaming.remainder("ab", "abc") == "c" and streaming.remainder("ax", "abc") is None
