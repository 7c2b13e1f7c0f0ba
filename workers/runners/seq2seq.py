"""`summarize` and `translate` on encoder-decoder models (BART, Marian, T5), our own `generate` loop.

transformers 5 removed the summarization and translation pipelines; these runners call the
Auto model's `generate` directly. Prefixes (T5's "summarize: ", "translate English to German: ")
come from the registry entry's options `summarize_prefix` and `translate_prefix`. A summary's
`max_new_tokens` is sized from its input (`summary_tokens`), so it is shorter than the text.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from llmos.jobs import Job
from llmos.tasks import SummarizationTask, Task, TranslationTask
from workers.runners.base import ItemOutcome, Runner
from workers.runners.extractive import split_sentences
from workers.runners.generation import generate_seq2seq

LANGUAGE_NAMES = {"en": "English", "de": "German", "fr": "French", "zh": "Chinese", "es": "Spanish",
                  "ro": "Romanian", "ja": "Japanese", "it": "Italian", "ru": "Russian", "pt": "Portuguese"}


MIN_SUMMARY_TOKENS = 10  # a default-sized summary of a short text still gets a few words
TOKEN_STEP = 8  # sizes over two steps round down to a multiple, so similar texts share a generate


def summary_tokens(task: SummarizationTask, input_tokens: int) -> int:
    """New tokens for a summary of `input_tokens`: the task's share of its sentences, of the
    input's tokens (rounded down to a TOKEN_STEP), at least MIN_SUMMARY_TOKENS (or the input's
    length) and `min_length`, at most `max_length`."""
    share = math.ceil(task.fraction(len(split_sentences(task.text))) * input_tokens)
    wanted = max(share, min(MIN_SUMMARY_TOKENS, input_tokens))
    if wanted > 2 * TOKEN_STEP:
        wanted -= wanted % TOKEN_STEP
    return max(task.min_length, min(wanted, task.max_length))


class AbstractiveSummaryRunner(Runner):
    task_type = "summarize"

    def preprocess(self, requests: Sequence[Task], jobs: Sequence[Job] | None) -> Any:
        prefix = self.spec.options.get("summarize_prefix", "")
        tasks = [r for r in requests if isinstance(r, SummarizationTask)]
        texts = [prefix + r.text for r in tasks]
        window = self.loaded.context_window
        lengths = [min(len(ids), window) for ids in self.loaded.tokenizer(texts)["input_ids"]]
        return [(text, summary_tokens(r, n), r.min_length) for text, r, n in zip(texts, tasks, lengths)]

    def forward(self, items: list[tuple[str, int, int]]) -> list[tuple]:
        out: dict[int, tuple] = {}
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (_, mx, mn) in enumerate(items):
            groups.setdefault((mx, mn), []).append(i)
        for (mx, mn), idx in groups.items():
            for i, res in zip(idx, generate_seq2seq(self.loaded, [items[i][0] for i in idx], mx, mn)):
                out[i] = res
        return [out[i] for i in range(len(items))]

    def postprocess(self, outputs: Any, requests: Sequence[Task]) -> list[ItemOutcome]:
        return [ItemOutcome(result={"summary": text, "truncated": cut}, tokens_in=n_in, tokens_out=n_out)
                for text, n_in, n_out, cut in outputs]


class TranslationRunner(Runner):
    task_type = "translate"

    def preprocess(self, requests: Sequence[Task], jobs: Sequence[Job] | None) -> Any:
        template = self.spec.options.get("translate_prefix", "")
        texts = []
        for r in requests:
            assert isinstance(r, TranslationTask)
            prefix = template.format(source=LANGUAGE_NAMES.get(r.source_lang, r.source_lang),
                                     target=LANGUAGE_NAMES.get(r.target_lang, r.target_lang),
                                     source_code=r.source_lang, target_code=r.target_lang)
            texts.append(prefix + r.text)
        return texts

    def forward(self, texts: list[str]) -> list[tuple]:
        return generate_seq2seq(self.loaded, texts, self.spec.max_new_tokens,
                                int(self.spec.options.get("min_new_tokens", 0)))

    def postprocess(self, outputs: Any, requests: Sequence[Task]) -> list[ItemOutcome]:
        return [ItemOutcome(result={"translation": text, "truncated": cut}, tokens_in=n_in,
                            tokens_out=n_out)
                for text, n_in, n_out, cut in outputs]
