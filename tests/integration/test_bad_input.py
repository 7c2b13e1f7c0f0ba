"""Bad input through the SDK, on Postgres and on SQLite: only LLMOSErrors escape, and a refused
submit writes no row and sends no message (property-based, with an example per reported input)."""

from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from llmos import manager, migrate
from llmos.constants import MAX_JOBS_PER_SUBMIT
from llmos.db import get_engine, jobs
from llmos.dispatch import InMemoryDispatcher
from llmos.errors import LLMOSError
from llmos.registry import ModelSpec, Registry
from llmos.sdk import Client
from llmos.settings import Settings
from llmos.tasks import TASK_TYPES

pytestmark = pytest.mark.integration

MODELS = {  # one model per task type; nothing runs them (no worker here), so sources are dummies
    "enc": ModelSpec(name="enc", source="x", kind="encoder", tasks=("embed", "sentiment", "summarize"),
                     max_input_chars=300),
    "gen": ModelSpec(name="gen", source="x", kind="causal-lm", tasks=("writing", "chat", "dialogue"),
                     max_input_chars=200),
    "s2s": ModelSpec(name="s2s", source="x", kind="seq2seq", tasks=("translate",), max_input_chars=200,
                     language_pairs=(("en", "de"),)),
    "qa": ModelSpec(name="qa", source="x", kind="qa", tasks=("qa",), max_input_chars=200),
}
SERVES = {t: name for name, spec in MODELS.items() for t in spec.tasks}

ODD = ["", " ", "a\x00b", "\x00", "\ud800", "ok\udfff", "x" * 65, "x" * 257, "²", "٣", "y" * 190]
"""Strings that broke something once: empty, NUL, lone surrogates, just over a column, odd digits."""

junk = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(),
                 st.text(max_size=8), st.sampled_from(ODD), st.lists(st.integers(), max_size=2),
                 st.dictionaries(st.text(max_size=2), st.integers(), max_size=1))


def mostly(good, bad=()):
    """`good` nine times in ten, else one of `bad` or junk: most submits get far enough to be written."""
    worse = st.one_of(st.sampled_from(bad), junk) if bad else junk
    return st.integers(0, 9).flatmap(lambda i: worse if i == 0 else good)


text = mostly(st.text(min_size=1, max_size=40))
count = mostly(st.integers(1, 64), [0, -1, 5000, True])
FIELDS = {
    "text": text, "prompt": text, "user_utterance": text, "system": text, "question": text, "context": text,
    "texts": mostly(st.lists(text, min_size=1, max_size=4), [[], ["a"] * 2049]),
    "stop": mostly(st.lists(text, max_size=3), [["s"] * 9]),
    "messages": mostly(st.lists(st.fixed_dictionaries({
        "role": mostly(st.sampled_from(["system", "user", "assistant"]), ["tool", "developer", ""]),
        "content": mostly(st.text(max_size=40), ["a\x00b", "\ud800", "y" * 190])}), min_size=1, max_size=3),
        [[], [{"role": "user"}], [{"role": "user", "content": "x", "name": "n"}], [{"role": "user", "content": ""}]]),
    "max_length": count, "max_new_tokens": count, "min_length": mostly(st.integers(0, 1), [-1, 5000]),
    "seed": mostly(st.integers(0, 2**32 - 1), [-1, 2**32, True]),
    "temperature": mostly(st.floats(0, 2), [-0.1, 2.5, float("nan"), True]),
    "top_p": mostly(st.floats(0.01, 1), [0, 1.5, float("inf")]),
    "source_lang": mostly(st.just("en"), ["de", "e", "en\x00", "x" * 17]),
    "target_lang": mostly(st.just("de"), ["zh", "d\ud800"]),
    "conversation_id": mostly(st.sampled_from(["user-42", "c" * 64]), ["c" * 65, "bad id", "\x00"]),
    "max_sentences": mostly(st.integers(1, 10), [0, -1, True, 2.5]),
    "ratio": mostly(st.floats(0.05, 0.95), [0, 1, 1.5, float("nan"), True]),
}
OPTIONS = {
    "priority": mostly(st.one_of(st.integers(0, 9), st.sampled_from(["high", "batch", " 5 "])),
                       [-1, 10, "urgent", "²", 5.0]),
    "idempotency_key": mostly(st.one_of(st.sampled_from(["k1", "k2"]), st.lists(st.sampled_from(["k3", "k4", None]),
                                                                                 min_size=1, max_size=3)),
                              ["", "k" * 257, "a\x00", 5, [5]]),
    "tenant": mostly(st.sampled_from(["t1", "t2", "t" * 128]), ["t" * 129, "", "\ud800"]),
    "batch_id": mostly(st.sampled_from(["b1", "b" * 64]), ["b" * 65, ""]),
    "timeout_s": mostly(st.sampled_from([0.5, 3600]), [0, 3601, float("inf"), float("nan"), True]),
    "deadline": mostly(st.one_of(st.sampled_from([30, 0.1, 1e6]),
                                 st.datetimes(timezones=st.sampled_from([timezone.utc, timezone(timedelta(hours=-5))]),
                                              min_value=datetime(2000, 1, 1), max_value=datetime(2030, 1, 1))),
                       [0, -1, 1e12, float("inf"), datetime(2030, 1, 1), datetime(9999, 12, 31, tzinfo=timezone.utc)]),
    "max_attempts": mostly(st.integers(1, 100), [0, 101, True, 3.0]),
}


@st.composite
def cases(draw):
    """One submit: a task type with its fields (mostly valid, else odd or junk), how many, and the options."""
    task_type = draw(st.sampled_from(sorted(TASK_TYPES)))
    fields = TASK_TYPES[task_type].model_fields
    required = {f: mostly(FIELDS[f]) for f, info in fields.items() if info.is_required()}
    optional = {f: mostly(FIELDS[f]) for f, info in fields.items() if not info.is_required()}
    values = draw(st.fixed_dictionaries(required, optional=optional))
    if draw(st.integers(0, 19)) == 0:  # now and then a required field missing, or an unknown one
        if draw(st.booleans()):
            values.pop(next(iter(required)))
        else:
            values["unknown_field"] = 1
    return dict(
        task_type=task_type, fields=values, n=draw(st.integers(0, 3)), twice=draw(st.booleans()),
        model=draw(mostly(st.just(SERVES[task_type]), [*MODELS, "nope"])),
        options=draw(st.fixed_dictionaries({}, optional=OPTIONS)),
    )


def case(task_type="sentiment", n=1, twice=False, model=None, **options):
    """An @example: `fields` and submit options given as keywords (fields as f_<name>)."""
    fields = {k[2:]: options.pop(k) for k in list(options) if k.startswith("f_")}
    fields = fields or {next(iter(TASK_TYPES[task_type].model_fields)): "fine"}
    return dict(task_type=task_type, fields=fields, n=n, twice=twice, model=model or SERVES[task_type],
                options=options)


@pytest.fixture(scope="module", params=["postgres", "sqlite"])
def client(request, tmp_path_factory):
    home = tmp_path_factory.mktemp("bad-input")
    if request.param == "postgres":
        url = request.getfixturevalue("pg_url")
    else:
        url = f"sqlite:///{home / 'bad.db'}"
        migrate.upgrade(url)
    c = Client(Settings(home=home, database_url=url, redis_url="redis://127.0.0.1:1/0"),
               dispatcher=InMemoryDispatcher(), registry=Registry(dict(MODELS)))
    yield c
    c.close()


def rows(engine):
    with engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(jobs)).scalar_one()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(c=cases())
@example(c=case(idempotency_key="", twice=True))  # raw IntegrityError
@example(c=case(priority="²"))  # ValueError
@example(c=case(priority=True))
@example(c=case(deadline=1e12))  # OverflowError
@example(c=case(deadline=float("inf")))
@example(c=case(deadline=float("nan")))
@example(c=case(deadline=datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=5)))))  # OverflowError in astimezone
@example(c=case(f_text="a\x00b"))  # DataError
@example(c=case(f_text="a\ud800b"))
@example(c=case("translate", f_text="hi", f_source_lang="en\x00", f_target_lang="de"))
@example(c=case("dialogue", f_user_utterance="hi", f_system="be \x00 brief"))
@example(c=case(tenant="t" * 200))  # DataError
@example(c=case(tenant="\x00"))
@example(c=case(idempotency_key=5))  # TypeError
@example(c=case(idempotency_key=["k"]))
@example(c=case(idempotency_key="k" * 257))
@example(c=case("writing", f_prompt="p" * 150, f_stop=["s" * 10] * 8))  # stop strings count: 230 > 200
@example(c=case(n=MAX_JOBS_PER_SUBMIT + 1))
@example(c=case("embed", f_texts=["a"] * 2049))
@example(c=case(timeout_s=float("inf")))
@example(c=case(timeout_s=float("nan")))
@example(c=case(timeout_s=3601))  # over settings.max_job_seconds
@example(c=case(timeout_s=True))
@example(c=case(max_attempts=True))
@example(c=case("writing", f_prompt="p", f_seed=True))
@example(c=case(batch_id="b" * 65))
@example(c=case("dialogue", f_user_utterance="hi", f_conversation_id="c" * 65))
@example(c=case(model=["not", "a", "name"]))
def test_only_llmos_errors_escape_and_a_refusal_leaves_no_trace(client, c):
    engine, sent = get_engine(client.settings.db_url), client.dispatcher.sent
    before_rows, before_sent = rows(engine), len(sent)
    handles, refused = [], False
    try:
        for _ in range(2 if c["twice"] else 1):
            task = TASK_TYPES[c["task_type"]](**c["fields"])
            handles += client.submit(c["model"], [task] * c["n"], **c["options"])
    except LLMOSError:
        refused = True
    new_ids = [job_id for _, job_id, _ in sent[before_sent:]]
    event("refused" if refused else "accepted, new jobs" if new_ids else "accepted, none new")
    assert rows(engine) == before_rows + len(new_ids)  # a row for each message, and no other
    if refused and not c["twice"]:
        assert new_ids == []
    # an accepted submit sent exactly its new jobs, once each, and every handle names a stored job
    assert len(set(new_ids)) == len(new_ids) and set(new_ids) <= {h.id for h in handles}
    stored = manager.get_jobs(engine, [h.id for h in handles], tenant=manager.ANY_TENANT)
    assert set(stored) == {h.id for h in handles}


def test_output_the_database_cannot_store_is_stored_with_replacement_characters(pg_url):
    engine = get_engine(pg_url)
    new = manager.NewJob(model="gen", task_type="writing", input={"prompt": "hi"}, priority=5)
    (a, _), (b, _) = manager.create_jobs(engine, [new, new])
    manager.claim(engine, [a.id, b.id], worker_id="w", device="cpu")
    applied = manager.finish(engine, [
        manager.Outcome(job_id=a.id, worker_id="w", attempt=1,
                        result={"text": "a\x00b \ud83d \\u0000 😀", "tokens": 3}),
        manager.Outcome(job_id=b.id, worker_id="w", attempt=1, error="runner said \x00 and \udc80"),
    ])
    assert applied == 2  # Postgres refused both before: "unsupported Unicode escape sequence"
    got = manager.get_jobs(engine, [a.id, b.id], tenant=manager.ANY_TENANT)
    assert got[a.id].result == {"text": "a\ufffdb \ufffd \\u0000 😀", "tokens": 3}
    assert got[b.id].error == "runner said \ufffd and \ufffd"
