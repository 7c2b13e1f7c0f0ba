"""The Files and Batch API with the official `openai` package: a real uvicorn API process, a real
minilm worker, Postgres and Redis. Upload, create, poll, download output and error files; cancel;
tenant isolation; files list, retrieve, delete."""

from __future__ import annotations

import base64
import json
import struct
import time

import openai
import pytest

from llmos import manager
from llmos.db import get_engine
from tests.integration.test_api import ApiProcess

pytestmark = pytest.mark.integration

FINAL = {"completed", "failed", "expired", "cancelled"}


@pytest.fixture(scope="module")
def api(services, request):
    settings, env = services
    proc = ApiProcess(env, LLMOS_BATCH_ADVANCE_S="0.5")
    try:
        request.getfixturevalue("pg_worker")  # the worker loads minilm meanwhile
        yield proc.wait_ready(), get_engine(settings.db_url)
    finally:
        proc.stop()


def client_for(api, tenant) -> openai.OpenAI:
    proc, engine = api
    _, key = manager.create_api_key(engine, tenant=tenant)
    return openai.OpenAI(base_url=proc.url + "/v1", api_key=key, max_retries=0, timeout=60)


def line(custom_id, body, url="/v1/embeddings") -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def until_final(client, batch_id, timeout=180):
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in FINAL:
            return batch
        assert time.monotonic() < deadline, f"batch still {batch.status} after {timeout} s: {batch}"
        time.sleep(0.3)


def jsonl(content) -> list[dict]:
    return [json.loads(x) for x in content.text.splitlines() if x.strip()]


def test_a_batch_with_bad_lines_runs_its_good_ones(api):
    client = client_for(api, "acme")
    good = {f"emb-{i}": {"model": "minilm", "input": f"sentence number {i} is fine"} for i in range(6)}
    good["emb-list"] = {"model": "minilm", "input": ["first text", "second text"]}
    good["emb-b64"] = {"model": "minilm", "input": "as base64", "encoding_format": "base64"}
    lines = [line(cid, body) for cid, body in good.items()]
    lines.insert(2, '{"custom_id": "broken", "method": "POST", ')                        # line 3
    lines.insert(4, line("unknown-model", {"model": "no-such-model", "input": "x"}))     # line 5
    lines.insert(6, line("wrong-url", {"model": "minilm", "input": "x"}, url="/v1/completions"))  # line 7
    uploaded = client.files.create(file=("nightly.jsonl", ("\n".join(lines) + "\n").encode()), purpose="batch")
    assert uploaded.purpose == "batch" and uploaded.bytes > 0 and uploaded.filename == "nightly.jsonl"

    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h",
                                  metadata={"run": "nightly"})
    assert batch.status in ("validating", "in_progress") and batch.metadata == {"run": "nightly"}
    done = until_final(client, batch.id)
    assert done.status == "completed", done
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (11, 8, 3)
    assert done.completed_at and done.in_progress_at and done.finalizing_at and done.expires_at

    out = jsonl(client.files.content(done.output_file_id))
    assert [o["custom_id"] for o in out] == list(good)  # each good line once, in input order
    for o in out:
        assert o["error"] is None and o["id"].startswith("batch_req_")
        assert o["response"]["status_code"] == 200 and o["response"]["request_id"]
        body = o["response"]["body"]
        assert body["object"] == "list" and body["model"] == "minilm" and "usage" in body
    by_id = {o["custom_id"]: o["response"]["body"]["data"] for o in out}
    assert len(by_id["emb-0"][0]["embedding"]) == 384
    assert [d["index"] for d in by_id["emb-list"]] == [0, 1]
    packed = base64.b64decode(by_id["emb-b64"][0]["embedding"])
    assert len(struct.unpack(f"<{len(packed) // 4}f", packed)) == 384

    errors = jsonl(client.files.content(done.error_file_id))
    assert [(e["custom_id"], e["error"]["line"], e["error"]["code"]) for e in errors] == [
        (None, 3, "invalid_json"), ("unknown-model", 5, "model_not_found"), ("wrong-url", 7, "invalid_url")]
    assert all(e["response"] is None and e["error"]["message"] for e in errors)

    listed = client.batches.list(limit=10)
    assert done.id in [b.id for b in listed.data]


def test_cancel_and_tenant_isolation(api):
    acme, globex = client_for(api, "acme-2"), client_for(api, "globex")
    # gpt2 is a registry model no worker of this test serves: its jobs wait queued until cancelled
    lines = [line(f"c{i}", {"model": "gpt2", "prompt": f"once upon a time {i}", "max_tokens": 4},
                  url="/v1/completions") for i in range(20)]
    uploaded = acme.files.create(file=("c.jsonl", "\n".join(lines).encode()), purpose="batch")
    batch = acme.batches.create(input_file_id=uploaded.id, endpoint="/v1/completions", completion_window="24h")
    assert batch.status == "in_progress" and batch.request_counts.total == 20

    with pytest.raises(openai.NotFoundError):
        globex.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):
        globex.batches.cancel(batch.id)
    with pytest.raises(openai.NotFoundError):
        globex.files.retrieve(uploaded.id)
    with pytest.raises(openai.NotFoundError):
        globex.files.content(uploaded.id)
    with pytest.raises(openai.NotFoundError):
        globex.batches.create(input_file_id=uploaded.id, endpoint="/v1/completions", completion_window="24h")
    assert globex.batches.list().data == [] and globex.files.list().data == []

    cancelling = acme.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at
    cancelled = until_final(acme, batch.id, timeout=60)
    assert cancelled.status == "cancelled" and cancelled.cancelled_at
    assert (cancelled.request_counts.completed, cancelled.request_counts.failed) == (0, 20)
    assert cancelled.output_file_id is None
    errors = jsonl(acme.files.content(cancelled.error_file_id))
    assert [e["custom_id"] for e in errors] == [f"c{i}" for i in range(20)]
    assert {e["error"]["code"] for e in errors} == {"batch_cancelled"}
    with pytest.raises(openai.ConflictError):
        acme.batches.cancel(batch.id)


def test_files_list_retrieve_and_delete(api):
    client = client_for(api, "files-tenant")
    a = client.files.create(file=("a.jsonl", b'{"x": 1}\n'), purpose="batch")
    b = client.files.create(file=("b.jsonl", b'{"x": 2}\n{"x": 3}\n'), purpose="batch")
    assert [f.id for f in client.files.list().data] == [b.id, a.id]  # newest first
    got = client.files.retrieve(a.id)
    assert (got.id, got.bytes, got.filename) == (a.id, 9, "a.jsonl")
    assert client.files.content(b.id).content == b'{"x": 2}\n{"x": 3}\n'
    deleted = client.files.delete(a.id)
    assert deleted.deleted is True and deleted.id == a.id
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(a.id)
    assert [f.id for f in client.files.list().data] == [b.id]
    with pytest.raises(openai.UnprocessableEntityError):
        client.files.create(file=("c.jsonl", b"{}\n"), purpose="fine-tune")


def test_llmos_batch_over_http(api, services, tmp_path):
    """`llmos batch` with LLMOS_URL: the file goes up through /v1/files, the batch through /v1/batches."""
    import subprocess
    import sys

    from tests.helpers import REPO, service_env

    proc, engine = api
    _, key = manager.create_api_key(engine, tenant="http-cli")
    env = service_env(LLMOS_URL=proc.url, LLMOS_API_KEY=key, LLMOS_HOME=str(tmp_path / "home"))
    path = tmp_path / "plain.jsonl"
    path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n"
                            for i, t in enumerate(["I love it", "I hate it", "Wonderful", "Dreadful"])) + "oops\n")
    llmos = [sys.executable, "-m", "llmos.cli", "batch"]
    run = subprocess.run(llmos + ["submit", str(path), "--task", "sentiment", "--name", "http-run", "--wait", "--json"],
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    summary = json.loads(run.stdout)
    assert (summary["status"], summary["total"], summary["completed"], summary["failed"]) == ("completed", 5, 4, 1)
    again = subprocess.run(llmos + ["submit", str(path), "--task", "sentiment", "--name", "http-run", "--json"],
                           env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and json.loads(again.stdout)["id"] == summary["id"], again.stderr
    out = tmp_path / "out.jsonl"
    res = subprocess.run(llmos + ["results", "http-run", "-o", str(out)], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["0", "1", "2", "3", None]
    assert [r["result"]["label"] for r in rows[:4]] == ["POSITIVE", "NEGATIVE", "POSITIVE", "NEGATIVE"]
    assert rows[4]["error"]["code"] == "invalid_json" and rows[4]["error"]["line"] == 5
    files = openai.OpenAI(base_url=proc.url + "/v1", api_key=key).files.list().data
    assert [f.purpose for f in files].count("batch") == 1  # the second upload was not kept
    listed = subprocess.run(llmos + ["list", "--json"], env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert [b["name"] for b in json.loads(listed.stdout)] == ["http-run"]
