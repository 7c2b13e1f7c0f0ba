"""`summarize` on an encoder, extractively: keep the sentences closest to the whole text's meaning.

Sentences are embedded; the centroid of their vectors stands for the text; the task says how
many sentences to keep (`SummarizationTask.sentences_to_keep`: a third by default, 1 to 5); they
are taken by similarity to the centroid while they fit in `max_length` tokens (the best one
always), then put back in their original order.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

from llmos.jobs import Job
from llmos.tasks import SummarizationTask, Task
from workers.runners.base import ItemOutcome, Runner
from workers.runners.encoder import encode_texts

SENTENCE_END = re.compile(r"(?<=[.!?。！？])\s+|\n+")


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in SENTENCE_END.split(text) if s and s.strip()]


def select_sentences(scores: Sequence[float], lengths: Sequence[int], keep: int, budget: int) -> list[int]:
    """Indexes of the `keep` best-scored sentences that fit in `budget` tokens, in text order.

    The best sentence is kept even when it alone is over the budget, so a summary is never empty.
    """
    chosen: list[int] = []
    used = 0
    for j in sorted(range(len(scores)), key=lambda j: -scores[j]):
        if len(chosen) == keep:
            break
        if chosen and used + lengths[j] > budget:
            continue
        chosen.append(j)
        used += lengths[j]
    return sorted(chosen)


class ExtractiveSummaryRunner(Runner):
    task_type = "summarize"

    def preprocess(self, requests: Sequence[Task], jobs: Sequence[Job] | None) -> Any:
        return [split_sentences(r.text) for r in requests if isinstance(r, SummarizationTask)]

    def forward(self, docs: list[list[str]]) -> Any:
        flat = [s for doc in docs for s in doc]
        vectors, _ = encode_texts(self.loaded, flat, self.spec.max_batch_size)
        lengths = [len(ids) for ids in self.loaded.tokenizer(flat, add_special_tokens=False)["input_ids"]]
        return docs, vectors, lengths

    def postprocess(self, outputs: Any, requests: Sequence[Task]) -> list[ItemOutcome]:
        import torch

        docs, vectors, lengths = outputs
        window = self.loaded.context_window - 2  # room for the encoder's [CLS] and [SEP]
        out, i = [], 0
        for doc, req in zip(docs, requests):
            assert isinstance(req, SummarizationTask)
            n = len(doc)
            vec, cnt = vectors[i:i + n], lengths[i:i + n]
            i += n
            centroid = torch.nn.functional.normalize(vec.mean(dim=0), dim=0)
            chosen = select_sentences((vec @ centroid).tolist(), cnt, req.sentences_to_keep(n), req.max_length)
            out.append(ItemOutcome(result={"summary": " ".join(doc[j] for j in chosen),
                                           "truncated": any(c > window for c in cnt)},
                                   tokens_in=sum(cnt), tokens_out=sum(cnt[j] for j in chosen)))
        return out
