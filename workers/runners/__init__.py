"""One runner per task type; `runners_for(loaded)` builds those a model serves."""

from __future__ import annotations

from workers.model_cache import LoadedModel
from workers.runners.base import ItemOutcome, Runner
from workers.runners.embed import EmbedRunner
from workers.runners.sentiment import SentimentRunner

RUNNERS: dict[str, type[Runner]] = {r.task_type: r for r in (EmbedRunner, SentimentRunner)}


def runners_for(loaded: LoadedModel) -> dict[str, Runner]:
    return {t: RUNNERS[t](loaded) for t in loaded.spec.tasks}


__all__ = ["ItemOutcome", "Runner", "RUNNERS", "runners_for"]
