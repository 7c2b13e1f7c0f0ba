"""`sentiment` on an encoder, zero-shot: the label whose description embeddings lie closest.

Each label has a few descriptions; their normalised embeddings are averaged into one prototype
per label at load. A text's label is the prototype with the highest cosine similarity; the
score is the softmax of the similarities (scaled by `temperature`). Labels and descriptions can
be replaced per model with `options.sentiment_labels` in the registry.
"""

from __future__ import annotations

from typing import Any, Sequence

from llmos.jobs import Job
from llmos.tasks import SentimentTask, Task
from workers.runners.base import ItemOutcome, Runner
from workers.runners.encoder import encode_texts

DEFAULT_LABELS: dict[str, list[str]] = {
    "POSITIVE": [
        "This is a positive review.",
        "I loved it, it was great.",
        "Excellent, I am very happy and satisfied.",
        "Wonderful, highly recommended.",
        "A great experience, I would do it again.",
    ],
    "NEGATIVE": [
        "This is a negative review.",
        "I hated it, it was terrible.",
        "Awful, I am very disappointed and unhappy.",
        "Horrible, do not recommend.",
        "A bad experience, I would never do it again.",
    ],
}
TEMPERATURE = 0.05
"""Softmax temperature over cosine similarities (smaller: more confident scores)."""


class ZeroShotSentimentRunner(Runner):
    task_type = "sentiment"

    def __init__(self, loaded: Any, history: Any = None) -> None:
        super().__init__(loaded, history)
        labels = self.spec.options.get("sentiment_labels") or DEFAULT_LABELS
        self.labels = list(labels)
        self._descriptions = [list(labels[k]) for k in self.labels]
        self._prototypes: Any = None

    def prototypes(self) -> Any:
        import torch

        if self._prototypes is None:
            rows = []
            for descriptions in self._descriptions:
                vectors, _ = encode_texts(self.loaded, descriptions, self.spec.max_batch_size)
                rows.append(torch.nn.functional.normalize(vectors.mean(dim=0), dim=0))
            self._prototypes = torch.stack(rows)
        return self._prototypes

    def preprocess(self, requests: Sequence[Task], jobs: Sequence[Job] | None) -> list[str]:
        return [r.text for r in requests if isinstance(r, SentimentTask)]

    def forward(self, texts: list[str]) -> tuple[Any, list[int]]:
        vectors, counts = encode_texts(self.loaded, texts, self.spec.max_batch_size)
        sims = vectors @ self.prototypes().T
        return (sims / TEMPERATURE).softmax(dim=1), counts

    def postprocess(self, outputs: tuple[Any, list[int]], requests: Sequence[Task]) -> list[ItemOutcome]:
        probs, counts = outputs
        best = probs.argmax(dim=1).tolist()
        scores = probs.max(dim=1).values.tolist()
        return [ItemOutcome(result={"label": self.labels[b], "score": round(float(s), 6)},
                            tokens_in=c, tokens_out=0)
                for b, s, c in zip(best, scores, counts)]


class ClassifierSentimentRunner(Runner):
    """`sentiment` on a sequence-classification model: softmax over its own labels (id2label)."""

    task_type = "sentiment"

    def preprocess(self, requests: Sequence[Task], jobs: Sequence[Job] | None) -> dict[str, Any]:
        from workers.runners.encoder import tokenize

        return tokenize(self.loaded, [r.text for r in requests])  # type: ignore[attr-defined]

    def forward(self, enc: dict[str, Any]) -> tuple[Any, list[int]]:
        from workers.runners.encoder import token_counts

        logits = self.loaded.model(**enc).logits
        return logits.float().softmax(dim=-1), token_counts(enc)

    def postprocess(self, outputs: tuple[Any, list[int]], requests: Sequence[Task]) -> list[ItemOutcome]:
        probs, counts = outputs
        id2label = self.loaded.model.config.id2label
        best = probs.argmax(dim=1).tolist()
        scores = probs.max(dim=1).values.tolist()
        return [ItemOutcome(result={"label": str(id2label[b]).upper(), "score": round(float(s), 6)},
                            tokens_in=c, tokens_out=0)
                for b, s, c in zip(best, scores, counts)]
