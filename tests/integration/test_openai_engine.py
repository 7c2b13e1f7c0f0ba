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
