"""`summarize` on an encoder, extractively: keep the sentences closest to the whole text's meaning.

Sentences are embedded; the centroid of their vectors stands for the text; sentences are taken
by similarity to it until `max_length` tokens, then put back in their original order.
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


class ExtractiveSummaryRunner(Runner):
    task_type = "summarize"

    def preprocess(self, requests: Sequence[Task], jobs: Sequence[Job] | None) -> Any:
        docs = [split_sentences(r.text) for r in requests if isinstance(r, SummarizationTask)]
        return docs

    def forward(self, docs: list[list[str]]) -> Any:
        flat = [s for doc in docs for s in doc]
        vectors, counts = encode_texts(self.loaded, flat, self.spec.max_batch_size)
        return docs, vectors, counts

    def postprocess(self, outputs: Any, requests: Sequence[Task]) -> list[ItemOutcome]:
        import torch

        docs, vectors, counts = outputs
        out, i = [], 0
        for doc, req in zip(docs, requests):
            n = len(doc)
            vec, cnt = vectors[i:i + n], counts[i:i + n]
            i += n
            centroid = torch.nn.functional.normalize(vec.mean(dim=0), dim=0)
            order = (vec @ centroid).argsort(descending=True).tolist()
            budget = req.max_length  # type: ignore[attr-defined]
            chosen, used = [], 0
            for j in order:
                if chosen and used + cnt[j] > budget:
                    continue
                chosen.append(j)
                used += cnt[j]
            summary = " ".join(doc[j] for j in sorted(chosen))
            out.append(ItemOutcome(result={"summary": summary, "truncated": False},
                                   tokens_in=sum(cnt), tokens_out=used))
        return out
