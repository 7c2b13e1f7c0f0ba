"""The batcher with a fake runner: per-job outcomes, error isolation, no mixing between jobs."""

import threading
from concurrent.futures import ThreadPoolExecutor

from llmos.jobs import Job, JobStatus
from llmos.registry import ModelSpec
from workers.batcher import Batcher
from workers.model_cache import LoadedModel
from workers.runners.base import ItemOutcome, Runner


class EchoRunner(Runner):
    """Upper-cases each text; raises for the whole batch if any text is 'boom'."""

    task_type = "sentiment"
    batches: list[int]

    def __init__(self):
        spec = ModelSpec(name="fake", source="x", tasks=("sentiment",))
        super().__init__(LoadedModel(spec=spec, tokenizer=None, model=None, device="cpu", source="x"))
        self.batches = []

    def preprocess(self, requests, jobs):
        return [r.text for r in requests]

    def forward(self, texts):
        self.batches.append(len(texts))
        if "boom" in texts:
            raise RuntimeError("boom in batch")
        return [t.upper() for t in texts]

    def postprocess(self, outputs, requests):
        return [ItemOutcome(result={"label": o, "score": 1.0}, tokens_in=len(o)) for o in outputs]


def job(i, text):
    return Job(id=f"id-{i}", model="fake", task_type="sentiment", priority=5,
               status=JobStatus.RUNNING, input={"text": text}, attempts=1)


def run_jobs(texts, max_batch_size=8, max_wait_ms=200):
    runner = EchoRunner()
    done, lock = {}, threading.Lock()

    def complete(finished):
        with lock:
            for f in finished:
                done[f.job.id] = f

    batcher = Batcher({"sentiment": runner}, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms,
                      complete=complete).start()
    with ThreadPoolExecutor(len(texts)) as pool:
        futures = [pool.submit(lambda j: batcher.submit(j).result(5), job(i, t)) for i, t in enumerate(texts)]
        for f in futures:
            f.result()
    batcher.stop()
    return runner, done


def test_results_are_never_mixed_between_jobs():
    texts = [f"text number {i}" for i in range(40)]
    runner, done = run_jobs(texts)
    assert len(done) == 40
    for i, t in enumerate(texts):
        assert done[f"id-{i}"].outcome.result["label"] == t.upper()
    assert max(runner.batches) > 1  # jobs really were batched
    assert all(done[f"id-{i}"].batch_size >= 1 for i in range(40))


def test_one_bad_input_fails_only_its_job():
    texts = ["good one", "boom", "good two", "good three"]
    runner, done = run_jobs(texts, max_batch_size=4, max_wait_ms=500)
    assert done["id-1"].outcome.error == "RuntimeError: boom in batch"
    for i in (0, 2, 3):
        assert done[f"id-{i}"].outcome.error is None
        assert done[f"id-{i}"].outcome.result["label"] == texts[i].upper()


def test_unparseable_input_fails_alone():
    runner = EchoRunner()
    got = {}
    batcher = Batcher({"sentiment": runner}, max_batch_size=4, max_wait_ms=0,
                      complete=lambda fs: got.update({f.job.id: f for f in fs}))
    finished = batcher.run_group("sentiment", [job(0, "fine"), job(1, ""), job(2, "also fine")])
    errors = [f.outcome.error for f in finished]
    assert errors[0] is None and errors[2] is None
    assert "invalid sentiment task" in errors[1]
    assert runner.batches == [2]


def test_unknown_task_type_fails_the_job():
    batcher = Batcher({}, max_batch_size=4, max_wait_ms=0, complete=lambda fs: None)
    (f,) = batcher.run_group("embed", [job(0, "x").evolve(task_type="embed", input={"texts": ["x"]})])
    assert "cannot run 'embed'" in f.outcome.error
