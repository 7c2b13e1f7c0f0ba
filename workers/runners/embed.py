"""`embed`: texts → normalised sentence vectors (one job may carry many texts)."""

from __future__ import annotations

from typing import Any, Sequence

from llmos.jobs import Job
from llmos.tasks import EmbeddingTask, Task
from workers.runners.base import ItemOutcome, Runner
from workers.runners.encoder import encode_texts


class EmbedRunner(Runner):
    task_type = "embed"

    def preprocess(self, requests: Sequence[Task], jobs: Sequence[Job] | None) -> tuple[list[str], list[int]]:
        texts: list[str] = []
        owners: list[int] = []
        for i, r in enumerate(requests):
            assert isinstance(r, EmbeddingTask)
            texts.extend(r.texts)
            owners.extend([i] * len(r.texts))
        return texts, owners

    def forward(self, inputs: tuple[list[str], list[int]]) -> tuple[Any, list[int]]:
        texts, owners = inputs
        # between chunks, skip the texts of a job that was cancelled or ran over its timeout
        return encode_texts(self.loaded, texts, self.spec.max_batch_size,
                            skip=lambda j: self.stopped(owners[j]))

    def postprocess(self, outputs: tuple[Any, list[int]], requests: Sequence[Task]) -> list[ItemOutcome]:
        vectors, counts = outputs
        rows = vectors.tolist()
        out, i = [], 0
        for r in requests:
            n = len(r.texts)  # type: ignore[attr-defined]
            tokens = sum(counts[i:i + n])
            out.append(ItemOutcome(result={"vectors": rows[i:i + n], "dim": vectors.shape[1], "tokens": tokens},
                                   tokens_in=tokens, tokens_out=0))
            i += n
        return out
