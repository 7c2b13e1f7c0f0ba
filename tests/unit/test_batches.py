"""Files and batches on SQLite with the in-memory dispatcher: line parsing, the lifecycle, limits,
resumption, and the REST routes (tenant isolation, the upload's own body limit)."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

import llmos.batches as B
from llmos import manager
from llmos.api import create_app
from llmos.api.settings import ApiSettings
from llmos.batches import core, store
from llmos.batches.lines import PLAIN, BadLine, BatchShape, GoodLine, parse_line
from llmos.db import batch_lines, batches, file_parts, files
from llmos.dispatch import InMemoryDispatcher
from llmos.errors import LLMOSError, ValidationError
from llmos.jobs import JobStatus
from llmos.registry import Registry
from llmos.sdk import Client

pytestmark = pytest.mark.filterwarnings("ignore::llmos.NoWorkerWarning")


@pytest.fixture
def client(sqlite_settings):
    return Client(sqlite_settings, dispatcher=InMemoryDispatcher())


def emb(cid, text="hello", url="/v1/embeddings", model="minilm", **extra):
    return json.dumps({"custom_id": cid, "method": "POST", "url": url,
                       "body": {"model": model, "input": text}, **extra})


def finish_all(client, batch_id, fail=()):
    """Run every queued job of the batch as a worker would: succeed, or fail those in `fail` (custom ids)."""
    engine = client.engine
    with engine.connect() as conn:
        lines = {str(r.job_id): r.custom_id for r in conn.execute(
            sa.select(batch_lines).where(batch_lines.c.batch_id == batch_id, batch_lines.c.job_id.is_not(None)))}
    ids = [j for j in manager.batch_job_ids(engine, batch_id, tenant=manager.ANY_TENANT)
           if manager.get_job(engine, j, tenant=manager.ANY_TENANT).status == JobStatus.QUEUED]
    claimed, _ = manager.claim(engine, ids, worker_id="w", device="cpu")
    outcomes = []
    for job in claimed:
        if lines.get(job.id) in fail:
            outcomes.append(manager.Outcome(job_id=job.id, worker_id="w", attempt=job.attempts, error="RuntimeError: boom"))
        elif job.task_type == "embed":
            outcomes.append(manager.Outcome(job_id=job.id, worker_id="w", attempt=job.attempts,
                                            result={"vectors": [[0.5, -1.0]], "dim": 2, "tokens": 3}))
        else:
            outcomes.append(manager.Outcome(job_id=job.id, worker_id="w", attempt=job.attempts,
                                            result={"label": "POSITIVE", "score": 0.9}))
    manager.finish(engine, outcomes)


def read(client, file_id, tenant="default"):
    info = store.get_file(client.engine, file_id, tenant=tenant)
    return [json.loads(x) for x in b"".join(store.iter_bytes(client.engine, info.id)).splitlines()]


# --- line parsing ---------------------------------------------------------------------------------

SHAPE = BatchShape(endpoint="/v1/embeddings", priority=1)


@pytest.mark.parametrize("raw,code,custom_id", [
    (b"{not json", "invalid_json", None),
    (b"[1, 2]", "invalid_json", None),
    (emb("a", model="no-such-model").encode(), "model_not_found", "a"),
    (emb("b", url="/v1/chat/completions").encode(), "invalid_url", "b"),
    (json.dumps({"custom_id": "c", "method": "POST", "url": "/v1/embeddings", "body": {"model": "minilm"}}).encode(),
     "invalid_request", "c"),
    (json.dumps({"method": "POST", "url": "/v1/embeddings", "body": {"model": "minilm", "input": "x"}}).encode(),
     "invalid_request", None),
    (emb("d", surprise=1).encode(), "invalid_request", "d"),
    (emb("e", priority="soonish").encode(), "invalid_request", "e"),
])
def test_bad_lines_say_why(raw, code, custom_id, tmp_path):
    registry = Registry.load(__import__("llmos.settings", fromlist=["Settings"]).Settings(home=tmp_path))
    bad = parse_line(raw, 7, SHAPE, registry)
    assert isinstance(bad, BadLine) and bad.code == code and bad.line == 7 and bad.custom_id == custom_id
    assert bad.message


def test_good_lines_carry_their_task_priority_and_deadline(tmp_path):
    from llmos.settings import Settings

    registry = Registry.load(Settings(home=tmp_path))
    good = parse_line(emb("x", text=["a", "b"], priority="normal", deadline=60).encode(), 1, SHAPE, registry)
    assert isinstance(good, GoodLine) and good.custom_id == "x" and good.model == "minilm"
    assert good.task.task_type == "embed" and good.task.texts == ["a", "b"] and good.priority == 5
    assert good.deadline is not None
    plain = parse_line(b'{"id": 3, "text": "great"}', 2, BatchShape(PLAIN, 1, "sentiment", "minilm"), registry)
    assert isinstance(plain, GoodLine) and plain.custom_id == "3" and plain.task.text == "great"
    assert plain.priority == 1 and plain.deadline is None
    wrong = parse_line(b'{"id": 3, "text": "x"}', 2, BatchShape(PLAIN, 1, "translate", "minilm"), registry)
    assert isinstance(wrong, BadLine) and wrong.code == "invalid_request" and "source_lang" in wrong.message
    chat = json.dumps({"custom_id": "q", "method": "POST", "url": "/v1/chat/completions",
                       "body": {"model": "minilm", "messages": [{"role": "user", "content": "hi"}]}}).encode()
    unsupported = parse_line(chat, 4, BatchShape("/v1/chat/completions", 1), registry)
    assert isinstance(unsupported, BadLine) and unsupported.code == "unsupported_task"



# --- lifecycle ------------------------------------------------------------------------------------

def upload(client, text, tenant="default"):
    return core.upload(client, [text.encode()], tenant=tenant, filename="in.jsonl")


def test_a_batch_completes_with_output_in_input_order_and_bad_lines_in_the_error_file(client):
    lines = [emb("a"), "{broken", emb("b", model="nope"), emb("c", url="/v1/completions"), "", emb("a"), emb("d")]
    f = upload(client, "\n".join(lines))
    assert f.lines == 6
    batch = core.create_batch(client, tenant="default", input_file_id=f.id, endpoint="/v1/embeddings",
                              metadata={"priority": "low", "owner": "me"})
    assert batch.status == "in_progress" and batch.priority == 3
    assert batch.request_counts == B.RequestCounts(total=6, completed=0, failed=4)
    jobs = manager.batch_job_ids(client.engine, batch.id, tenant="default")
    assert len(jobs) == 2
    assert {manager.get_job(client.engine, j, tenant="default").priority for j in jobs} == {3}
    finish_all(client, batch.id)
    done = B.batch_info(client, batch.id)
    assert done.status == "completed" and done.completed_at and done.finalizing_at
    assert done.request_counts == B.RequestCounts(total=6, completed=2, failed=4)
    out = read(client, done.output_file_id)
    assert [o["custom_id"] for o in out] == ["a", "d"]
    assert out[0]["response"]["status_code"] == 200 and out[0]["error"] is None
    assert out[0]["response"]["body"]["data"][0]["embedding"] == [0.5, -1.0]
    assert out[0]["response"]["body"]["model"] == "minilm"
    errs = read(client, done.error_file_id)
    assert [(e["custom_id"], e["error"]["line"], e["error"]["code"]) for e in errs] == [
        (None, 2, "invalid_json"), ("b", 3, "model_not_found"), ("c", 4, "invalid_url"),
        ("a", 6, "duplicate_custom_id")]
    assert B.batch_info(client, batch.id) == done  # final: nothing moves


def test_a_file_without_a_good_line_fails_with_errors(client):
    f = upload(client, "{x\n" + emb("a", model="nope") + "\n")
    batch = core.create_batch(client, tenant="default", input_file_id=f.id, endpoint="/v1/embeddings")
    assert batch.status == "failed" and batch.failed_at and batch.output_file_id is None
    assert [e["line"] for e in batch.errors["data"]] == [1, 2]
    assert len(read(client, batch.error_file_id)) == 2
    assert batch.request_counts == B.RequestCounts(total=2, completed=0, failed=2)


def test_cancel_keeps_what_finished_and_cancels_the_rest(client):
    f = upload(client, "\n".join(emb(c) for c in "abcd"))
    batch = core.create_batch(client, tenant="default", input_file_id=f.id, endpoint="/v1/embeddings")
    engine = client.engine
    ids = manager.batch_job_ids(engine, batch.id, tenant="default")
    claimed, _ = manager.claim(engine, ids[:2], worker_id="w", device="cpu")  # two run
    manager.finish(engine, [manager.Outcome(job_id=claimed[0].id, worker_id="w", attempt=1,
                                            result={"vectors": [[1.0]], "dim": 1, "tokens": 1})])
    cancelling = B.cancel(client, batch.id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at  # one still runs
    assert manager.get_job(engine, ids[3], tenant="default").status == JobStatus.CANCELLED
    manager.finish(engine, [manager.Outcome(job_id=claimed[1].id, worker_id="w", attempt=1,
                                            result={"vectors": [[2.0]], "dim": 1, "tokens": 1})])
    cancelled = B.batch_info(client, batch.id)
    assert cancelled.status == "cancelled" and cancelled.cancelled_at
    assert cancelled.request_counts == B.RequestCounts(total=4, completed=2, failed=2)
    assert len(read(client, cancelled.output_file_id)) == 2
    assert {e["error"]["code"] for e in read(client, cancelled.error_file_id)} == {"batch_cancelled"}
    with pytest.raises(B.BatchStateError):
        B.cancel(client, batch.id)


def test_past_its_window_a_batch_expires_and_keeps_what_finished(client):
    f = upload(client, "\n".join(emb(c) for c in "abc"))
    batch = core.create_batch(client, tenant="default", input_file_id=f.id, endpoint="/v1/embeddings")
    engine = client.engine
    with engine.connect() as conn:
        first = str(conn.execute(sa.select(batch_lines.c.job_id).where(
            batch_lines.c.batch_id == batch.id, batch_lines.c.custom_id == "a")).scalar())
    claimed, _ = manager.claim(engine, [first], worker_id="w", device="cpu")
    manager.finish(engine, [manager.Outcome(job_id=first, worker_id="w", attempt=1,
                                            result={"vectors": [[1.0]], "dim": 1, "tokens": 1})])
    with engine.begin() as conn:
        conn.execute(batches.update().where(batches.c.id == batch.id).values(
            expires_at=manager.utcnow() - timedelta(seconds=1)))
    expired = B.batch_info(client, batch.id)
    assert expired.status == "expired" and expired.expired_at
    assert expired.request_counts == B.RequestCounts(total=3, completed=1, failed=2)
    assert [o["custom_id"] for o in read(client, expired.output_file_id)] == ["a"]
    assert [e["error"]["code"] for e in read(client, expired.error_file_id)] == ["batch_expired"] * 2


def test_jobs_of_a_batch_expire_with_its_window(client):
    f = upload(client, emb("a"))
    batch = core.create_batch(client, tenant="default", input_file_id=f.id, endpoint="/v1/embeddings")
    job = manager.get_job(client.engine, manager.batch_job_ids(client.engine, batch.id, tenant="default")[0],
                          tenant="default")
    assert abs((manager.as_utc(job.deadline) - batch.expires_at).total_seconds()) < 1


def test_resume_skips_done_lines_and_retries_failed_ones_only_when_asked(client, tmp_path):
    path = tmp_path / "nightly.jsonl"
    path.write_text("".join(json.dumps({"id": i, "text": f"t{i}"}) + "\n" for i in range(5)))
    first = B.submit_file(client, path, name="nightly", task="sentiment", model="minilm")
    assert first.status == "in_progress" and first.endpoint == PLAIN and first.request_counts.total == 5
    finish_all(client, first.id, fail={"2"})
    assert B.batch_info(client, first.id).status == "completed"
    again = B.submit_file(client, path, name="nightly", task="sentiment", model="minilm")
    assert again.id == first.id and again.status == "completed"
    assert len(manager.batch_job_ids(client.engine, first.id, tenant="default")) == 5
    retried = B.submit_file(client, path, name="nightly", task="sentiment", model="minilm", retry_failed=True)
    assert retried.status == "in_progress" and retried.request_counts == B.RequestCounts(5, 4, 0)
    assert len(manager.batch_job_ids(client.engine, first.id, tenant="default")) == 6
    finish_all(client, first.id)
    assert B.batch_info(client, first.id).request_counts == B.RequestCounts(5, 5, 0)
    out = tmp_path / "out.jsonl"
    assert B.write_results(client, first.id, out) == 5
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["0", "1", "2", "3", "4"] and all(r["result"]["label"] for r in rows)
    assert B.find_batch(client, "nightly").id == first.id and B.find_batch(client, "other") is None
    with open(path, "a") as f:
        f.write(json.dumps({"id": 9, "text": "new"}) + "\n")
    with pytest.raises(ValidationError, match="differs"):
        B.submit_file(client, path, name="nightly", task="sentiment", model="minilm")
    with client.engine.connect() as conn:  # the refused upload was not kept
        assert conn.execute(sa.select(sa.func.count()).select_from(files)).scalar() == 2  # the input and the output (no error left)


def test_a_submit_killed_halfway_is_resumed_without_a_second_job(client, tmp_path, monkeypatch):
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"id": i, "text": f"t{i}"}) + "\n" for i in range(25)))
    monkeypatch.setenv("LLMOS_BATCH_CHUNK_LINES", "10")
    real = core._submit_chunk
    calls = []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second chunk's jobs are written, then the process "dies"
            real(*args, **kwargs)
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(core, "_submit_chunk", dying)
    with pytest.raises(KeyboardInterrupt):
        B.submit_file(client, path, name="n", task="sentiment", model="minilm")
    half = B.find_batch(client, "n")
    assert half.status == "validating" and half.request_counts.total == 10
    monkeypatch.setattr(core, "_submit_chunk", real)
    whole = B.submit_file(client, path, name="n", task="sentiment", model="minilm")
    assert whole.status == "in_progress" and whole.request_counts.total == 25
    assert len(manager.batch_job_ids(client.engine, whole.id, tenant="default")) == 25
    with pytest.raises(B.BatchStateError):
        B.write_results(client, whole.id, tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()


def test_another_process_takes_over_a_submit_whose_lease_passed(client, tmp_path, monkeypatch):
    f = upload(client, "\n".join(emb(str(i)) for i in range(5)))
    monkeypatch.setattr(core, "_submit_lines", lambda *a, **k: None)  # the creator dies before submitting
    batch = core.create_batch(client, tenant="default", input_file_id=f.id, endpoint="/v1/embeddings")
    monkeypatch.undo()
    core.advance_all(client)
    assert B.batch_info(client, batch.id).status == "validating"  # its lease still holds
    with client.engine.begin() as conn:
        conn.execute(batches.update().values(lease_until=manager.utcnow() - timedelta(seconds=1)))
    core.advance_all(client)
    assert B.batch_info(client, batch.id).status == "in_progress"
    assert len(manager.batch_job_ids(client.engine, batch.id, tenant="default")) == 5


# --- limits ---------------------------------------------------------------------------------------

def stored(client):
    with client.engine.connect() as conn:
        return (conn.execute(sa.select(sa.func.count()).select_from(files)).scalar(),
                conn.execute(sa.select(sa.func.count()).select_from(file_parts)).scalar())


def test_limits_refuse_and_keep_nothing(client, monkeypatch):
    monkeypatch.setenv("LLMOS_FILES_MAX_BYTES", "100")
    with pytest.raises(B.FileTooLargeError):
        upload(client, "x" * 101)
    monkeypatch.setenv("LLMOS_FILES_MAX_BYTES", "10000")
    monkeypatch.setenv("LLMOS_BATCH_MAX_LINES", "3")
    with pytest.raises(ValidationError, match="more than 3 lines"):
        upload(client, "{}\n{}\n\n{}\n{}")
    assert stored(client) == (0, 0)
    assert upload(client, "{}\n\n{}\n{}\n").lines == 3


def test_a_file_streams_in_and_out_in_parts(client):
    body = b"".join(b'{"n": %d, "pad": "%s"}\n' % (i, b"p" * 900) for i in range(3000))  # ~2.8 MB
    info = store.put_file(client.engine, [body[i:i + 70_000] for i in range(0, len(body), 70_000)],
                          tenant="t", filename="big.jsonl", purpose="batch", max_bytes=10**8)
    assert info.bytes == len(body) and info.lines == 3000
    assert stored(client)[1] == 3  # 1 MiB parts
    assert b"".join(store.iter_bytes(client.engine, info.id)) == body
    assert [n for n, _ in store.iter_lines(client.engine, info.id)] == list(range(1, 3001))


# --- REST -----------------------------------------------------------------------------------------

@pytest.fixture
def api(client):
    http = TestClient(create_app(api_settings=ApiSettings(rate_limit_storage="memory://", max_body_bytes=4096),
                                 client=client))
    _, a = manager.create_api_key(client.engine, tenant="acme")
    _, b = manager.create_api_key(client.engine, tenant="globex")
    with http:
        yield http, {"Authorization": f"Bearer {a}"}, {"Authorization": f"Bearer {b}"}


def test_files_and_batches_over_rest_are_scoped_by_tenant(api, client):
    http, a, b = api
    body = ("\n".join(emb(f"r{i}", text="x" * 100) for i in range(60)) + "\n").encode()  # over the API's 4 KiB cap
    resp = http.post("/v1/files", files={"file": ("in.jsonl", body)}, data={"purpose": "batch"}, headers=a)
    assert resp.status_code == 200, resp.text
    f = resp.json()
    assert f["object"] == "file" and f["bytes"] == len(body) and f["purpose"] == "batch"
    assert http.get(f"/v1/files/{f['id']}", headers=b).status_code == 404
    assert http.get(f"/v1/files/{f['id']}/content", headers=a).content == body
    assert http.get(f"/v1/files/{f['id']}/content", headers=b).status_code == 404
    assert [x["id"] for x in http.get("/v1/files", headers=a).json()["data"]] == [f["id"]]
    assert http.get("/v1/files", headers=b).json()["data"] == []
    bad = http.post("/v1/files", files={"file": ("in.jsonl", b"{}")}, data={"purpose": "fine-tune"}, headers=a)
    assert bad.status_code == 422
    assert http.post("/v1/batches", json={"input_file_id": f["id"], "endpoint": "/v1/embeddings",
                                          "completion_window": "24h"}, headers=b).status_code == 404
    resp = http.post("/v1/batches", json={"input_file_id": f["id"], "endpoint": "/v1/embeddings",
                                          "completion_window": "24h", "metadata": {"k": "v"}}, headers=a)
    assert resp.status_code == 200, resp.text
    batch = resp.json()
    assert batch["object"] == "batch" and batch["status"] == "in_progress" and batch["metadata"] == {"k": "v"}
    assert batch["request_counts"] == {"total": 60, "completed": 0, "failed": 0}
    assert http.get(f"/v1/batches/{batch['id']}", headers=b).status_code == 404
    assert http.post(f"/v1/batches/{batch['id']}/cancel", headers=b).status_code == 404
    assert http.get("/v1/batches", headers=b).json()["data"] == []
    assert http.delete(f"/v1/files/{f['id']}", headers=a).status_code == 409  # its batch is open
    assert http.get(f"/v1/batches/{batch['id']}/results", headers=a).status_code == 409
    finish_all(client, batch["id"])
    done = http.get(f"/v1/batches/{batch['id']}", headers=a).json()
    assert done["status"] == "completed" and done["request_counts"]["completed"] == 60
    page = http.get("/v1/batches", params={"limit": 1}, headers=a).json()
    assert page["data"][0]["id"] == batch["id"] and page["has_more"] is False
    assert http.get(f"/v1/files/{done['output_file_id']}", headers=b).status_code == 404
    results = http.get(f"/v1/batches/{batch['id']}/results", headers=a)
    assert [json.loads(x)["custom_id"] for x in results.text.splitlines()] == [f"r{i}" for i in range(60)]
    assert http.delete(f"/v1/files/{f['id']}", headers=b).status_code == 404
    assert http.delete(f"/v1/files/{f['id']}", headers=a).json() == {"id": f["id"], "object": "file", "deleted": True}
    assert http.get(f"/v1/files/{f['id']}", headers=a).status_code == 404


def test_an_upload_over_the_files_limit_is_413_and_other_routes_keep_the_api_cap(api, client, monkeypatch):
    http, a, _ = api
    big = http.post("/v1/jobs", content=b"x" * 5000, headers={**a, "Content-Type": "application/json"})
    assert big.status_code == 413
    monkeypatch.setenv("LLMOS_FILES_MAX_BYTES", "6000")
    resp = http.post("/v1/files", files={"file": ("in.jsonl", b"{}\n" * 2001)}, data={"purpose": "batch"}, headers=a)
    assert resp.status_code == 413 and "LLMOS_FILES_MAX_BYTES" in resp.json()["error"]["message"], resp.text
    assert stored(client) == (0, 0)


def test_an_upload_is_read_only_after_its_key_is_checked(api, monkeypatch):
    """A client without a valid key gets its 401 before the server parses (and spools) a byte."""
    from starlette.requests import Request

    http, a, _ = api
    parsed = []
    real_form = Request.form

    def form(self, **kw):
        parsed.append(self.url.path)
        return real_form(self, **kw)

    monkeypatch.setattr(Request, "form", form)
    body = {"files": {"file": ("in.jsonl", b"{}\n" * 100)}, "data": {"purpose": "batch"}}
    for headers in ({}, {"Authorization": "Bearer llmos_nope_nope"}):
        assert http.post("/v1/files", headers=headers, **body).status_code == 401
    assert parsed == []
    missing = http.post("/v1/files", data={"purpose": "batch"}, files={"other": ("x", b"1")}, headers=a)
    assert missing.status_code == 422 and "file: required" in missing.json()["error"]["message"]
    assert parsed == ["/v1/files"]


def test_cli_errors_are_llmos_errors(client, tmp_path):
    with pytest.raises(LLMOSError):
        B.submit_file(client, tmp_path / "missing.jsonl", name="x", task="sentiment", model="minilm")
    empty = tmp_path / "e.jsonl"
    empty.write_text("not json\n")
    with pytest.raises(ValidationError, match="JSON object"):
        B.submit_file(client, empty, name="x", task="sentiment", model="minilm")


def test_a_resubmitted_dialogue_line_finds_its_job_again(client, tmp_path):
    """A chunk whose jobs were written but not its lines (the process died between): the resubmit
    finds each job by its key (a dialogue's conversation id comes from the key, not chance)."""
    path = tmp_path / "talk.jsonl"
    path.write_text("".join(json.dumps({"id": i, "text": f"hello {i}"}) + "\n" for i in range(3)))
    first = B.submit_file(client, path, name="talk", task="dialogue", model="dialogpt")
    before = sorted(manager.batch_job_ids(client.engine, first.id, tenant="default"))
    with client.engine.begin() as conn:
        conn.execute(batch_lines.delete())
        conn.execute(batches.update().values(status="validating", lease_until=None))
    again = B.submit_file(client, path, name="talk", task="dialogue", model="dialogpt")
    assert again.status == "in_progress" and again.request_counts.total == 3
    assert sorted(manager.batch_job_ids(client.engine, first.id, tenant="default")) == before


# --- review findings: bad lines, unstorable text, long lines, the advancer, leases, resumption ------

def chat(cid, role="user", **extra):
    return json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                       "body": {"model": "minilm", "messages": [{"role": role, "content": "hi"}]}, **extra})


def test_any_exception_of_a_line_makes_it_a_bad_line_never_a_failed_batch(tmp_path, monkeypatch):
    from llmos import openai_protocol
    from llmos.settings import Settings

    registry = Registry.load(Settings(home=tmp_path))
    odd = parse_line(chat("r", role=["user"]).encode(), 3, BatchShape("/v1/chat/completions", 1), registry)
    assert isinstance(odd, BadLine) and odd.custom_id == "r" and odd.code == "invalid_request"

    def broken(endpoint, body):
        raise TypeError("unhashable type: 'list'")

    monkeypatch.setattr(openai_protocol, "parse_request", broken)
    bad = parse_line(emb("t").encode(), 4, SHAPE, registry)
    assert isinstance(bad, BadLine) and bad.code == "invalid_request" and "TypeError" in bad.message
    for field, value in (("custom_id", "a\ud800b"), ("custom_id", "a\x00b")):
        line = json.dumps({field: value, "method": "POST", "url": "/v1/embeddings",
                           "body": {"model": "minilm", "input": "x"}}).encode()
        unstorable = parse_line(line, 5, SHAPE, registry)
        assert isinstance(unstorable, BadLine) and unstorable.custom_id is None and unstorable.code == "invalid_request"
    plain = parse_line(json.dumps({"id": "x\udc80", "text": "t"}).encode(), 6,
                       BatchShape(PLAIN, 1, "sentiment", "minilm"), registry)
    assert isinstance(plain, BadLine) and plain.custom_id is None


def test_a_batch_with_odd_lines_runs_its_good_ones(client):
    f = upload(client, "\n".join([emb("a"), chat("x", role=["user"]), json.dumps(
        {"custom_id": "s\ud800", "method": "POST", "url": "/v1/embeddings", "body": {"model": "minilm", "input": "x"}}),
        emb("b")]))
    batch = core.create_batch(client, tenant="default", input_file_id=f.id, endpoint="/v1/embeddings")
    assert batch.status == "in_progress" and batch.request_counts == B.RequestCounts(4, 0, 2)


def test_a_line_the_submit_refuses_is_a_bad_line_and_the_rest_of_its_group_runs(client, monkeypatch):
    real = client._submit

    def refusing(model, tasks, **kw):
        tasks = list(tasks)
        if any("poison" in t.texts for t in tasks):
            raise ValidationError("the model refuses poison")
        return real(model, tasks, **kw)

    monkeypatch.setattr(client, "_submit", refusing)
    f = upload(client, "\n".join([emb("a"), emb("p", text="poison"), emb("b")]))
    batch = core.create_batch(client, tenant="default", input_file_id=f.id, endpoint="/v1/embeddings")
    assert batch.status == "in_progress" and batch.request_counts == B.RequestCounts(3, 0, 1)
    assert len(manager.batch_job_ids(client.engine, batch.id, tenant="default")) == 2
    finish_all(client, batch.id)
    done = B.batch_info(client, batch.id)
    assert done.status == "completed" and done.request_counts == B.RequestCounts(3, 2, 1)
    assert [(e["custom_id"], e["error"]["code"], e["error"]["line"]) for e in read(client, done.error_file_id)] == [
        ("p", "invalid_request", 2)]


def test_a_batch_stuck_in_validating_expires_at_its_window(client, monkeypatch):
    f = upload(client, "\n".join(emb(str(i)) for i in range(3)))
    monkeypatch.setattr(core, "_submit_lines", lambda *a, **k: None)  # the creator dies before submitting
    batch = core.create_batch(client, tenant="default", input_file_id=f.id, endpoint="/v1/embeddings")
    monkeypatch.undo()
    with client.engine.begin() as conn:
        conn.execute(batches.update().values(expires_at=manager.utcnow() - timedelta(seconds=1),
                                             lease_until=manager.utcnow() - timedelta(seconds=1)))
    core.advance_all(client)
    core.advance_all(client)
    expired = B.batch_info(client, batch.id)
    assert expired.status == "expired" and expired.expired_at
    assert manager.batch_job_ids(client.engine, batch.id, tenant="default") == []


def test_unstorable_names_and_ids_are_refused_cleanly(api, client, tmp_path):
    http, a, _ = api
    f = http.post("/v1/files", files={"file": ("in.jsonl", (emb("a") + "\n").encode())}, data={"purpose": "batch"},
                  headers=a).json()
    base = {"input_file_id": f["id"], "endpoint": "/v1/embeddings", "completion_window": "24h"}
    for change in ({"name": "n\ud800"}, {"name": "n\x00"}, {"input_file_id": "file-\ud800"},
                   {"input_file_id": "file-\x00"}):
        resp = http.post("/v1/batches", content=json.dumps({**base, **change}),  # the escapes \ud800, \u0000
                         headers={**a, "Content-Type": "application/json"})
        assert resp.status_code == 422, (change, resp.text)
    assert http.get("/v1/batches", params={"name": "n\x00"}, headers=a).json()["data"] == []
    with pytest.raises(ValidationError, match="name"):
        B.submit_file(client, _write(tmp_path / "x.jsonl"), name="x\udc80", task="sentiment", model="minilm")
    with pytest.raises(B.BatchNotFoundError):
        B.batch_info(client, "batch_\udc80")


def _write(path, lines=2):
    path.write_text("".join(json.dumps({"id": i, "text": f"t{i}"}) + "\n" for i in range(lines)))
    return path


def test_a_file_name_that_is_not_utf8_makes_a_batch_under_a_text_name(client, tmp_path):
    import os

    from llmos.batches.cli import default_name

    path = _write(tmp_path / os.fsdecode(b"caf\xe9-" + b"x" * 240 + b".jsonl"))
    name = default_name(path)
    assert "\ufffd" in name and len(name) <= core.MAX_NAME_CHARS
    info = B.submit_file(client, path, name=name, task="sentiment", model="minilm")
    assert info.status == "in_progress" and info.name == name
    assert "\ufffd" in store.get_file(client.engine, info.input_file_id, tenant="default").filename


def test_a_line_over_the_line_limit_is_a_bad_line_never_held_whole(client, monkeypatch):
    monkeypatch.setenv("LLMOS_BATCH_MAX_LINE_BYTES", "2000")
    long_line = emb("big", text="x" * 3_000_000)
    f = upload(client, "\n".join([emb("a"), long_line, "", " " * 5000, emb("b")]) + "\n")
    batch = core.create_batch(client, tenant="default", input_file_id=f.id, endpoint="/v1/embeddings")
    assert batch.request_counts == B.RequestCounts(3, 0, 1)
    finish_all(client, batch.id)
    done = B.batch_info(client, batch.id)
    assert [(e["error"]["line"], e["error"]["code"]) for e in read(client, done.error_file_id)] == [(2, "line_too_long")]
    assert [o["custom_id"] for o in read(client, done.output_file_id)] == ["a", "b"]
    body = b"a\n" + b"y" * 5000 + b"\n\n" + b" " * 5000 + b"\nb"
    chunks = [body[i:i + 700] for i in range(0, len(body), 700)]
    assert list(store._lines(iter(chunks), 1000)) == [(1, b"a"), (2, None), (5, b"b")]
    assert list(store._lines(iter([b"z" * 3000]), 1000)) == [(1, None)]


def test_one_failing_batch_does_not_stop_the_advancer_which_walks_every_open_batch(client, monkeypatch):
    made = []
    for i in range(5):
        f = upload(client, emb(f"l{i}"))
        made.append(core.create_batch(client, tenant="default", input_file_id=f.id, endpoint="/v1/embeddings").id)
        finish_all(client, made[-1])
    real, poisoned = core.advance_one, sorted(made)[0]

    def advance(client, batch_id, *, tenant):
        if batch_id == poisoned:
            raise RuntimeError("this batch is broken")
        return real(client, batch_id, tenant=tenant)

    cleaned = []
    monkeypatch.setattr(core, "advance_one", advance)
    monkeypatch.setattr(store, "delete_stale_uploads", lambda engine: cleaned.append(1) or 0)
    assert core.advance_all(client, limit=2) == 5
    assert cleaned == [1]
    with client.engine.connect() as conn:
        states = dict(conn.execute(sa.select(batches.c.id, batches.c.status)).all())
    assert states.pop(poisoned) == "in_progress" and set(states.values()) == {"completed"}


def test_files_are_written_under_a_renewed_lease_and_published_only_with_the_batch(client, monkeypatch):
    f = upload(client, "\n".join([emb(str(i)) for i in range(6)] + ["{bad"]))
    batch = core.create_batch(client, tenant="default", input_file_id=f.id, endpoint="/v1/embeddings")
    finish_all(client, batch.id)
    monkeypatch.setattr(core, "RENEW_EVERY", 2)
    renewals, states = [], []
    real_renew, real_write = core._renew, core._write_file

    def renew(engine, batch_id, token, bs, status="validating"):
        renewals.append(status)
        return real_renew(engine, batch_id, token, bs, status)

    def write(client_, row, **kw):
        file_id = real_write(client_, row, **kw)
        with client.engine.connect() as conn:
            states.append(conn.execute(sa.select(files.c.status).where(files.c.id == file_id)).scalar())
        return file_id

    monkeypatch.setattr(core, "_renew", renew)
    monkeypatch.setattr(core, "_write_file", write)
    done = B.batch_info(client, batch.id)
    assert done.status == "completed" and renewals.count("finalizing") >= 4
    assert states == ["uploading", "uploading"]  # an orphan of a crash here is a stale upload
    assert store.get_file(client.engine, done.output_file_id, tenant="default").status == "processed"
    assert store.get_file(client.engine, done.error_file_id, tenant="default").status == "processed"


def test_a_writer_that_loses_its_lease_keeps_nothing_and_another_finishes(client, monkeypatch):
    f = upload(client, "\n".join(emb(str(i)) for i in range(4)))
    batch = core.create_batch(client, tenant="default", input_file_id=f.id, endpoint="/v1/embeddings")
    finish_all(client, batch.id)
    monkeypatch.setattr(core, "RENEW_EVERY", 2)
    real_records = core.result_records

    def records(client_, row, chunk=500):
        for i, item in enumerate(real_records(client_, row, chunk)):
            if i == 1:  # another process takes the batch over meanwhile
                with client.engine.begin() as conn:
                    conn.execute(batches.update().values(lease_owner="other"))
            yield item

    monkeypatch.setattr(core, "result_records", records)
    assert B.batch_info(client, batch.id).status == "finalizing"
    with client.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(files)).scalar() == 1  # the input only
    monkeypatch.undo()
    with client.engine.begin() as conn:
        conn.execute(batches.update().values(lease_until=manager.utcnow() - timedelta(seconds=1)))
    assert B.batch_info(client, batch.id).status == "completed"


def test_a_submitter_that_lost_its_lease_stops_and_leaves_the_lease_alone(client, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMOS_BATCH_CHUNK_LINES", "1")
    real = core._submit_chunk
    calls = []

    def taken_over(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            with client.engine.begin() as conn:
                conn.execute(batches.update().values(lease_owner="other",
                                                     lease_until=manager.utcnow() + timedelta(seconds=60)))
        return real(*args, **kwargs)

    monkeypatch.setattr(core, "_submit_chunk", taken_over)
    info = B.submit_file(client, _write(tmp_path / "in.jsonl", 3), name="n", task="sentiment", model="minilm")
    assert info.status == "validating" and len(calls) == 1
    with client.engine.connect() as conn:
        row = conn.execute(sa.select(batches)).one()
    assert row.lease_owner == "other" and row.lease_until is not None


def test_a_retry_takes_the_lease_as_it_goes_back_to_validating(client, tmp_path, monkeypatch):
    path = _write(tmp_path / "in.jsonl", 3)
    first = B.submit_file(client, path, name="n", task="sentiment", model="minilm")
    finish_all(client, first.id, fail={"1"})
    with client.engine.begin() as conn:  # one job still runs: the batch stays in_progress
        conn.execute(batches.update().values(status="in_progress", lease_until=None, lease_owner=None))
    seen = []

    def spy(client_, batch_id, tenant, token, **kw):
        with client.engine.connect() as conn:
            seen.append(conn.execute(sa.select(batches.c.status, batches.c.lease_owner, batches.c.lease_until)).one())
        seen.append(token)

    monkeypatch.setattr(core, "_submit_lines", spy)
    B.submit_file(client, path, name="n", task="sentiment", model="minilm", retry_failed=True)
    (status, owner, until), token = seen
    assert status == "validating" and owner == token and until is not None


def test_refused_custom_ids_count_the_same_on_a_resume(client, tmp_path, monkeypatch):
    """Line 1 names "b" and is refused, line 3 names "b" again: a duplicate on the first pass and
    on a resume alike, so a resume after a crash leaves no job without its line."""
    monkeypatch.setenv("LLMOS_BATCH_CHUNK_LINES", "1")
    f = upload(client, "\n".join([emb("b", model="nope"), emb("a"), emb("b"), emb("c")]))
    real = core._submit_chunk
    calls = []

    def dying(*args, **kwargs):
        calls.append(1)
        out = real(*args, **kwargs)
        if len(calls) == 3:  # line 3's chunk: its jobs (if any) written, then the process "dies"
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(core, "_submit_chunk", dying)
    with pytest.raises(KeyboardInterrupt):
        core.create_batch(client, tenant="default", input_file_id=f.id, endpoint="/v1/embeddings", name="r")
    monkeypatch.setattr(core, "_submit_chunk", real)
    again = core.create_batch(client, tenant="default", input_file_id=f.id, endpoint="/v1/embeddings", name="r")
    assert again.status == "in_progress"
    finish_all(client, again.id)
    done = B.batch_info(client, again.id)
    assert done.request_counts == B.RequestCounts(4, 2, 2)
    assert len(manager.batch_job_ids(client.engine, again.id, tenant="default")) == 2


def test_a_resume_compares_the_kept_sha256_even_once_the_input_is_deleted(client, tmp_path):
    path = _write(tmp_path / "in.jsonl", 2)
    first = B.submit_file(client, path, name="n", task="sentiment", model="minilm")
    with client.engine.connect() as conn:
        assert conn.execute(sa.select(batches.c.input_sha256)).scalar() == store.get_file(
            client.engine, first.input_file_id, tenant="default").sha256
    finish_all(client, first.id)
    assert B.batch_info(client, first.id).status == "completed"
    core.delete_file(client, first.input_file_id, tenant="default")
    with pytest.raises(ValidationError, match="differs"):
        B.submit_file(client, _write(tmp_path / "in.jsonl", 3), name="n", task="sentiment", model="minilm")
    same = B.submit_file(client, _write(tmp_path / "in.jsonl", 2), name="n", task="sentiment", model="minilm")
    assert same.id == first.id and same.status == "completed"


def test_a_batch_whose_jobs_all_ended_in_time_completes_even_when_advanced_late(client):
    f = upload(client, "\n".join(emb(c) for c in "ab"))
    batch = core.create_batch(client, tenant="default", input_file_id=f.id, endpoint="/v1/embeddings")
    finish_all(client, batch.id)
    with client.engine.begin() as conn:
        conn.execute(batches.update().values(expires_at=manager.utcnow() - timedelta(seconds=1)))
    done = B.batch_info(client, batch.id)
    assert done.status == "completed" and done.request_counts == B.RequestCounts(2, 2, 0)


def test_the_advancer_s_queries_name_their_partial_indexes_statuses_as_literals(client):
    f = upload(client, emb("a"))
    core.create_batch(client, tenant="default", input_file_id=f.id, endpoint="/v1/embeddings")
    statements = []

    def capture(conn, cursor, statement, parameters, context, executemany):
        statements.append(statement)

    sa.event.listen(client.engine, "before_cursor_execute", capture)
    try:
        core.advance_all(client)
    finally:
        sa.event.remove(client.engine, "before_cursor_execute", capture)
    sql = "\n".join(statements)
    assert "batches.status IN ('validating', 'in_progress', 'finalizing', 'cancelling')" in sql
    assert "jobs.status IN ('queued', 'running')" in sql
    assert "files.status = 'uploading'" in sql
    assert "GROUP BY jobs.status" not in sql  # an in_progress batch's open jobs: counted, not grouped
    with client.engine.connect() as conn:
        plans = {s: " ".join(str(r) for r in conn.exec_driver_sql(
            "EXPLAIN QUERY PLAN " + s, (manager.utcnow(),) * s.count("?")).all())
            for s in statements if s.startswith("SELECT") and "files.status = 'uploading'" in s}
    assert plans and all("ix_files_uploading" in p for p in plans.values()), plans


def test_a_batch_runs_at_normal_priority_at_most(api, client):
    http, a, _ = api
    f = http.post("/v1/files", files={"file": ("in.jsonl", "\n".join(
        [emb("a"), emb("b", priority="critical"), emb("c", priority=5)]).encode())},
        data={"purpose": "batch"}, headers=a).json()
    base = {"input_file_id": f["id"], "endpoint": "/v1/embeddings", "completion_window": "24h"}
    for change in ({"priority": 7}, {"priority": "high"}, {"metadata": {"priority": "critical"}}):
        resp = http.post("/v1/batches", json={**base, **change}, headers=a)
        assert resp.status_code == 422 and "normal" in resp.json()["error"]["message"], resp.text
    batch = http.post("/v1/batches", json={**base, "priority": "normal"}, headers=a).json()
    assert batch["priority"] == 5 and batch["request_counts"] == {"total": 3, "completed": 0, "failed": 1}


def test_the_batch_client_side_never_imports_the_api():
    import subprocess
    import sys

    code = ("import sys, httpx\n"
            "import llmos.batches, llmos.batches.http, llmos.batches.cli, llmos.remote\n"
            "from llmos.remote import _error\n"
            "e = _error(httpx.Response(401, json={'error': {'code': 'unauthorized', 'message': 'no'}}), 'u')\n"
            "assert type(e).__name__ == 'AuthError', e\n"
            "print(sorted(m for m in sys.modules if m.startswith('llmos.api')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
