"""One runner per task type and model kind; `runners_for(loaded)` builds those a model serves."""

from __future__ import annotations

from typing import Any

from workers.model_cache import LoadedModel
from workers.runners.base import History, ItemError, ItemOutcome, Runner
from workers.runners.embed import EmbedRunner
from workers.runners.extractive import ExtractiveSummaryRunner
from workers.runners.generate import ChatRunner, DialogueRunner, Seq2SeqWritingRunner, WritingRunner
from workers.runners.openai import (OpenAIChatRunner, OpenAIDialogueRunner, OpenAIEmbedRunner, OpenAISummaryRunner,
                                    OpenAITranslationRunner, OpenAIWritingRunner)
from workers.runners.qa import QuestionAnsweringRunner
from workers.runners.sentiment import ClassifierSentimentRunner, EncoderSentimentRunner
from workers.runners.seq2seq import AbstractiveSummaryRunner, TranslationRunner

RUNNERS: dict[tuple[str, str], type[Runner]] = {
    ("encoder", "embed"): EmbedRunner,
    ("encoder", "sentiment"): EncoderSentimentRunner,
    ("encoder", "summarize"): ExtractiveSummaryRunner,
    ("causal-lm", "writing"): WritingRunner,
    ("causal-lm", "chat"): ChatRunner,
    ("causal-lm", "dialogue"): DialogueRunner,
    ("seq2seq", "writing"): Seq2SeqWritingRunner,
    ("seq2seq", "summarize"): AbstractiveSummaryRunner,
    ("seq2seq", "translate"): TranslationRunner,
    ("classifier", "sentiment"): ClassifierSentimentRunner,
    ("qa", "qa"): QuestionAnsweringRunner,
    ("openai", "writing"): OpenAIWritingRunner,
    ("openai", "chat"): OpenAIChatRunner,
    ("openai", "dialogue"): OpenAIDialogueRunner,
    ("openai", "summarize"): OpenAISummaryRunner,
    ("openai", "translate"): OpenAITranslationRunner,
    ("openai", "embed"): OpenAIEmbedRunner,
}
"""(engine or transformers kind, task type) → runner class; the registry's KIND_TASKS agree."""


def runners_for(loaded: LoadedModel, history: History | None = None, redis: Any = None) -> dict[str, Runner]:
    """The runners of the tasks `loaded` serves; `redis` (the worker's client) carries token streams."""
    spec = loaded.spec
    key = "openai" if spec.engine == "openai" else spec.kind
    runners = {t: RUNNERS[(key, t)](loaded, history) for t in spec.tasks}
    for runner in runners.values():
        runner.redis = redis
    return runners


__all__ = ["History", "ItemError", "ItemOutcome", "RUNNERS", "Runner", "runners_for"]
