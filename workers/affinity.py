"""CPU placement inside a worker process: the model's thread on its own cores, the rest elsewhere.

On a GPU host the accelerator is the model's and the CPU does the bookkeeping; on a CPU slot
the same shape is one or more cores for the model and the others for everything else. `taskset`
on the whole process cannot give it: the worker's Celery event loop, pool threads and recorder
would share the model's cores, and a torch parallel region waits for its slowest thread. With
`LLMOS_MODEL_CPUS` (for example `1` or `2-3`) the worker pins its main thread, and so every
thread started after it (Celery's pool and event loop, the recorder, the heartbeat), to the
process's other allowed cores, and the batcher thread, which runs the model and starts torch's
intra-op threads, to the given ones, with as many torch threads as it has cores.
Linux only (`os.sched_setaffinity` on a thread id); elsewhere the setting is refused.
"""

from __future__ import annotations

import os

from llmos.errors import ConfigError


def parse_cpus(text: str) -> set[int]:
    """'1', '0,2', '2-3' → a set of core numbers."""
    cpus: set[int] = set()
    for part in str(text).replace(" ", "").split(","):
        if not part:
            continue
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if hi < lo:
                    raise ValueError
                cpus.update(range(lo, hi + 1))
            else:
                cpus.add(int(part))
        except ValueError:
            raise ConfigError(f"LLMOS_MODEL_CPUS: expected core numbers such as 1 or 2-3, got {text!r}") from None
    if not cpus or min(cpus) < 0:
        raise ConfigError(f"LLMOS_MODEL_CPUS: expected core numbers such as 1 or 2-3, got {text!r}")
    return cpus


class Placement:
    """The model's cores and the others', checked against what this process may use."""

    def __init__(self, model_cpus: set[int]) -> None:
        if not hasattr(os, "sched_setaffinity"):
            raise ConfigError("LLMOS_MODEL_CPUS needs Linux (sched_setaffinity)")
        allowed = os.sched_getaffinity(0)
        if not model_cpus <= allowed:
            raise ConfigError(f"LLMOS_MODEL_CPUS {sorted(model_cpus)} is not within this process's "
                              f"cores {sorted(allowed)}")
        self.model = set(model_cpus)
        # with no core left over, the bookkeeping shares the model's (still one torch thread per core)
        self.others = (allowed - self.model) or set(self.model)

    def pin_bookkeeping(self) -> None:
        """The calling thread (the main thread, before it starts the others) off the model's cores."""
        os.sched_setaffinity(0, self.others)

    def pin_model(self) -> None:
        """The calling thread (the batcher's) on the model's cores, torch sized to them."""
        os.sched_setaffinity(0, self.model)
        import torch

        torch.set_num_threads(len(self.model))


def from_setting(text: str | None) -> Placement | None:
    """The placement `LLMOS_MODEL_CPUS` asks for (`Settings.model_cpus`), or None."""
    text = (text or "").strip()
    return Placement(parse_cpus(text)) if text else None
