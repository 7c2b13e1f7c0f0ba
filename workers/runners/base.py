"""The runner base: preprocess → forward → postprocess over a batch, under inference_mode.

The base owns `torch.inference_mode` and error isolation: if a batch raises, each request is run
alone so one bad input fails only its own job. Runners get the claimed jobs beside the requests
(the dialogue runner reads a conversation's earlier turns through them).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Sequence

from llmos.jobs import Job
from llmos.tasks import Task
from workers.model_cache import LoadedModel

History = Callable[[Job], list[tuple[str, str]]]
"""Earlier (user utterance, response) turns of a dialogue job's conversation, oldest first."""


@dataclasses.dataclass(frozen=True)
class ItemOutcome:
    """One request's result (JSON-ready) or error, with its token counts."""

    result: dict[str, Any] | None = None
    error: str | None = None
    tokens_in: int | None = None
    tokens_out: int | None = None


class ItemError(Exception):
    """An error that belongs to one request (its job fails with this message, the batch goes on)."""


class Runner:
    """Runs one task type on a loaded model, many requests at a time."""

    task_type: ClassVar[str]

    def __init__(self, loaded: LoadedModel, history: History | None = None) -> None:
        self.loaded = loaded
        self.spec = loaded.spec
        self.history = history

    def preprocess(self, requests: Sequence[Task], jobs: Sequence[Job] | None) -> Any:
        raise NotImplementedError

    def forward(self, inputs: Any) -> Any:
        raise NotImplementedError

    def postprocess(self, outputs: Any, requests: Sequence[Task]) -> list[ItemOutcome]:
        raise NotImplementedError

    def run(self, requests: Sequence[Task], jobs: Sequence[Job] | None = None) -> list[ItemOutcome]:
        """Results in request order; a failure in the batch falls back to one request at a time."""
        try:
            return self._run(requests, jobs)
        except ItemError as exc:
            if len(requests) == 1:
                return [ItemOutcome(error=str(exc))]
        except Exception as exc:
            if len(requests) == 1:
                return [ItemOutcome(error=f"{type(exc).__name__}: {exc}")]
        return [self.run([r], [j] if jobs else None)[0] for r, j in zip(requests, jobs or [None] * len(requests))]

    def _run(self, requests: Sequence[Task], jobs: Sequence[Job] | None) -> list[ItemOutcome]:
        import torch

        with torch.inference_mode():
            outputs = self.forward(self.preprocess(requests, jobs))
        out = self.postprocess(outputs, requests)
        if len(out) != len(requests):
            raise RuntimeError(f"{type(self).__name__} returned {len(out)} outcomes for {len(requests)} requests")
        return out
