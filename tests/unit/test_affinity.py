"""LLMOS_MODEL_CPUS: the model's thread on its cores, the worker's other threads on the rest."""

import os
import threading

import pytest

from llmos.errors import ConfigError
from workers import affinity
from workers.batcher import Batcher


@pytest.mark.parametrize("text, want", [("1", {1}), ("0,2", {0, 2}), ("2-4", {2, 3, 4}), (" 1 , 3-3 ", {1, 3})])
def test_parse_cpus(text, want):
    assert affinity.parse_cpus(text) == want


@pytest.mark.parametrize("text", ["", "a", "3-1", "-1", "1-", ",,"])
def test_bad_cpus_are_a_config_error(text):
    with pytest.raises(ConfigError, match="LLMOS_MODEL_CPUS"):
        affinity.parse_cpus(text)


def test_cores_outside_the_process_are_refused():
    beyond = max(os.sched_getaffinity(0)) + 1
    with pytest.raises(ConfigError, match="not within"):
        affinity.Placement({beyond})


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores to split")
def test_the_batcher_thread_runs_on_the_model_cores_and_new_threads_on_the_others():
    import torch

    allowed = os.sched_getaffinity(0)
    model = {max(allowed)}
    placement = affinity.Placement(model)
    seen: dict[str, set[int]] = {}
    threads = torch.get_num_threads()

    def main_side():
        placement.pin_bookkeeping()  # as the worker's main thread does before starting the others
        child = threading.Thread(target=lambda: seen.__setitem__("child", os.sched_getaffinity(0)))
        child.start()
        child.join()
        b = Batcher({}, max_batch_size=1, max_wait_ms=1, claim=lambda ids, fresh: [],
                    complete=lambda f: None,
                    on_start=lambda: (placement.pin_model(), seen.__setitem__("model", os.sched_getaffinity(0))))
        b.start()
        b.submit("x").result(5)
        b.stop()

    t = threading.Thread(target=main_side)
    t.start()
    t.join()
    try:
        assert seen["model"] == model
        assert seen["child"] == allowed - model
        assert os.sched_getaffinity(0) == allowed  # this thread was never touched
    finally:
        torch.set_num_threads(threads)
