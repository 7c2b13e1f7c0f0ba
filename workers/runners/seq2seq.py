"""`summarize` and `translate` on encoder-decoder models (BART, Marian, T5), our own `generate` loop.

transformers 5 removed the summarization and translation pipelines; these runners call the
Auto model's `generate` directly. Prefixes (T5's "summarize: ", "translate English to German: ")
come from the registry entry's options `summarize_prefix` and `translate_prefix`.
"""

from __future__ import annotations

from typing import Any, Sequence

from llmos.jobs import Job
from llmos.tasks import SummarizationTask, Task, TranslationTask
from workers.runners.base import ItemOutcome, Runner
from workers.runners.generation import generate_seq2seq

LANGUAGE_NAMES = {"en": "English", "de": "German", "fr": "French", "zh": "Chinese", "es": "Spanish",
                  "ro": "Romanian", "ja": "Japanese", "it": "Italian", "ru": "Russian", "pt": "Portuguese"}


class AbstractiveSummaryRunner(Runner):
    task_type = "summarize"

    def preprocess(self, requests: Sequence[Task], jobs: Sequence[Job] | None) -> Any:
        prefix = self.spec.options.get("summarize_prefix", "")
        return [(prefix + r.text, r.max_length, r.min_length) for r in requests  # type: ignore[attr-defined]
                if isinstance(r, SummarizationTask)]

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
