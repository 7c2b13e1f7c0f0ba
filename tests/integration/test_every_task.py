"""Every task type through a real worker process, on tiny models and an OpenAI-compatible server."""

import subprocess
import sys
import textwrap

import pytest

import llmos
from llmos.jobs import JobStatus
from llmos.sdk import Client
from llmos.settings import Settings
from tests.helpers import REPO, WorkerProcess
from tests.tiny_models import write_config

pytestmark = pytest.mark.integration

MODELS = ["dialogpt", "tiny-bart", "sst2", "squad", "minilm", "gpt3"]


@pytest.fixture(scope="module")
def stack(services, tiny_folders, openai_server, tmp_path_factory):
    settings, env = services
    url, key = openai_server
    cfg = write_config(tmp_path_factory.mktemp("cfg") / "llmos.toml", tiny_folders, openai_url=url)
    env = dict(env, LLMOS_CONFIG=str(cfg), LLMOS_TEST_OPENAI_KEY=key)
    workers = [WorkerProcess(env, model=m) for m in MODELS]  # all start at once
    try:
        for w in workers:
            w.wait_ready(settings.db_url)
        settings = Settings(home=settings.home, database_url=settings.database_url,
                            redis_url=settings.redis_url, config=cfg)
        yield settings, env
    finally:
        for w in workers:
            assert w.stop() == 0, w.log()


@pytest.fixture
def client(stack):
    with Client(stack[0]) as c:
        yield c


CASES = [
    ("dialogpt", llmos.WritingTask(prompt="The cat likes", max_new_tokens=5), "text"),
    ("dialogpt", llmos.DialogueTask(user_utterance="Hello, how are you?"), "response"),
    ("tiny-bart", llmos.SummarizationTask(text="The cat likes a red ball. " * 4, max_length=6, min_length=2), "summary"),
    ("tiny-bart", llmos.TranslationTask(text="Hello, how are you?", source_lang="en", target_lang="de"), "translation"),
    ("tiny-bart", llmos.WritingTask(prompt="Hello", max_new_tokens=4), "text"),
    ("sst2", llmos.SentimentTask(text="What a great day"), "label"),
    ("squad", llmos.QuestionAnsweringTask(question="What is the capital of France?",
                                          context="Paris is the capital of France."), "answer"),
    ("minilm", llmos.SummarizationTask(text="Budgets were cut. Residents objected to the cut. Lunch was pizza.",
                                       max_length=12), "summary"),
    ("minilm", llmos.EmbeddingTask(texts=["one", "two"]), "vectors"),
    ("minilm", llmos.SentimentTask(text="I love it"), "label"),
    ("gpt3", llmos.WritingTask(prompt="The cat likes", max_new_tokens=5), "text"),
    ("gpt3", llmos.DialogueTask(user_utterance="Hi!"), "response"),
    ("gpt3", llmos.SummarizationTask(text="The cat likes a red ball."), "summary"),
    ("gpt3", llmos.TranslationTask(text="Hello", source_lang="en", target_lang="de"), "translation"),
    ("gpt3", llmos.EmbeddingTask(texts=["one", "two"]), "vectors"),
]


@pytest.mark.parametrize("model,task,field", CASES, ids=[f"{m}-{t.task_type}" for m, t, _ in CASES])
def test_task_through_a_worker(client, model, task, field):
    handle = client.load_model(model).submit(task)
    result = handle.result(timeout=120)
    assert isinstance(result, type(task).result_type)
    job = handle.job()
    assert job.status == JobStatus.SUCCEEDED and job.worker_id.startswith(model + "@")
    assert job.compute_ms > 0 and job.batch_size >= 1
    value = getattr(result, field)
    if field in ("text", "response", "summary", "translation"):
        assert isinstance(value, str)
        if model in ("dialogpt", "gpt3") or field == "summary":
            assert value.strip(), result  # min_new_tokens / the server's min 1 token
    if isinstance(result, llmos.QuestionAnsweringResult):
        assert result.answer == task.context[result.start:result.end]
    if isinstance(result, llmos.EmbeddingResult):
        assert len(value) == 2 and result.dim == len(value[0]) > 0
    if model == "minilm" and field == "summary":
        assert all(s.strip(".") in task.text for s in value.split(". "))


FIVE_SENTENCES = ("The city council met on Monday to review the annual budget. "
                  "The budget for public parks was cut by ten percent. "
                  "Several residents objected to the parks budget cut during the meeting. "
                  "The mayor promised to revisit the parks budget next spring. "
                  "Lunch at the meeting was pizza.")


@pytest.mark.parametrize("model", ["minilm", "tiny-bart"])
def test_default_summary_is_shorter_than_its_input(client, model):
    min_length = 2 if model == "tiny-bart" else 0  # the random tiny BART may stop at once
    task = llmos.SummarizationTask(text=FIVE_SENTENCES, min_length=min_length)
    handle = client.load_model(model).submit(task)
    summary = handle.result(timeout=120).summary
    job = handle.job()
    assert summary.strip() and job.tokens_out < job.tokens_in
    if model == "minilm":  # two of the five sentences (a third, rounded up), in their original order
        picked = [s if s.endswith(".") else s + "." for s in summary.split(". ")]
        assert len(picked) == 2 and len(summary) < len(FIVE_SENTENCES)
        assert all(p in FIVE_SENTENCES for p in picked)
        assert FIVE_SENTENCES.index(picked[0]) < FIVE_SENTENCES.index(picked[1])


@pytest.mark.parametrize("model", ["dialogpt", "gpt3"])
def test_three_turn_dialogue_keeps_history(client, model):
    m = client.load_model(model)
    first = m.execute(llmos.DialogueTask(user_utterance="I want a ticket to Beijing."), timeout=120)
    cid = first.conversation_id
    second = m.execute(llmos.DialogueTask(user_utterance="For next Monday, please.", conversation_id=cid), timeout=120)
    third = m.execute(llmos.DialogueTask(user_utterance="Window seat.", conversation_id=cid), timeout=120)
    assert cid and second.conversation_id == third.conversation_id == cid
    assert (first.history_turns, second.history_turns, third.history_turns) == (0, 1, 2)
    for said in ("I want a ticket to Beijing.", first.response, "For next Monday, please.", second.response):
        assert said in third.prompt
    assert third.prompt.index("I want a ticket") < third.prompt.index("For next Monday") < third.prompt.index("Window seat.")
    other = m.execute(llmos.DialogueTask(user_utterance="New chat"), timeout=120)
    assert other.conversation_id != cid and other.history_turns == 0


def test_unknown_language_pair_is_refused_at_submit(client):
    with pytest.raises(llmos.UnsupportedTaskError, match="cannot translate en->fr; it translates: en->de, en->zh"):
        client.load_model("tiny-bart").submit(llmos.TranslationTask(text="Hi", source_lang="en", target_lang="fr"))


def test_long_prompt_is_trimmed_and_said_in_the_result(client):
    res = client.load_model("dialogpt").execute(
        llmos.WritingTask(prompt=" ".join(["the cat likes a red ball"] * 60), max_new_tokens=4), timeout=120)
    assert res.truncated is True and res.prompt_tokens == 128 - 4


SEED_WRITING = '''
import llmos

model = llmos.load_model("gpt3")

task = llmos.WritingTask(
    prompt="写一篇关于人工智能的博客文章",
    max_length=1000,
)

result = model.execute(task)

print(result.text)
'''

SEED_DIALOGUE = '''
import llmos

model = llmos.load_model("dialogpt")

task = llmos.DialogueTask(
    user_utterance="我想订一张去北京的机票",
)

result = model.execute(task)

print(result.response)
'''


@pytest.mark.parametrize("code", [SEED_WRITING, SEED_DIALOGUE], ids=["writing", "dialogue"])
def test_seed_examples_run_verbatim(stack, code, tmp_path):
    settings, env = stack
    script = tmp_path / "seed.py"
    script.write_text(textwrap.dedent(code))
    run = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                         timeout=180, cwd=REPO)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip(), "the seed example printed nothing"
