"""`sentiment` on an encoder (a trained head, with or without an adapter, else zero-shot) and on a classifier.

Encoder, with `options.sentiment_head` (minilm's built-in entry has `"minilm"`): a linear head on
pooled hidden states, shipped as JSON in llmos/data (`sentiment_head_<name>.json`; a value ending
in `.json` is a path). A head may name an `adapter` (a LoRA file beside the JSON,
workers/runners/adapter.py): the runner then loads its own copy of the encoder with the adapter
merged into its weights (once, at the first sentiment batch; quantized like the entry), so the
worker's `embed` vectors stay the base model's. minilm's head and adapter are fine-tuned together
by benchmarks/train_sentiment_head.py; the score is the head's probability. Without a head,
zero-shot: each label has a few descriptions whose normalised embeddings are averaged into one
prototype per label at load; a text's label is the prototype with the highest cosine similarity,
the score the softmax of the similarities (scaled by `temperature`). Labels and descriptions can
be replaced per model with `options.sentiment_labels`.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path
from typing import Any, Sequence

from llmos.errors import ConfigError
from llmos.jobs import Job
from llmos.registry import head_path
from llmos.tasks import SentimentTask, Task
from workers.model_cache import LoadedModel
from workers.runners.base import ItemOutcome, Runner
from workers.runners.encoder import encode_texts, token_counts, tokenize


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


def layer_features(loaded: LoadedModel, texts: Sequence[str], blocks: Sequence[str],
                   chunk: int) -> tuple[Any, list[int]]:
    """(n, dim × len(blocks)) features; a block `mean:K`/`max:K` pools layer K over real tokens, L2-normalised."""
    import torch

    pools = [(b.split(":")[0], int(b.split(":")[1])) for b in blocks]
    rows, counts = [], []
    with torch.inference_mode():
        for i in range(0, len(texts), chunk):
            enc = tokenize(loaded, texts[i:i + chunk])
            hidden = loaded.model(**enc, output_hidden_states=True).hidden_states
            mask = enc["attention_mask"].unsqueeze(-1).float()
            pooled = [(hidden[k].float() * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9) if pool == "mean"
                      else hidden[k].float().masked_fill(mask == 0, -1e4).max(dim=1).values
                      for pool, k in pools]
            rows.append(torch.cat([torch.nn.functional.normalize(p, dim=1) for p in pooled], dim=1))
            counts += token_counts(enc)
    return torch.cat(rows), counts


def load_head(name: str) -> dict[str, Any]:
    """A head's JSON: a built-in name, or a path ending in `.json`; `adapter` becomes an absolute path."""
    path = head_path(name)
    try:
        head = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"sentiment_head {name!r}: cannot read {path}: {e}") from e
    if head.get("adapter"):
        head["adapter"] = str(path.parent / head["adapter"])
        if not Path(head["adapter"]).is_file():
            raise ConfigError(f"sentiment_head {name!r}: its adapter {head['adapter']} is missing")
    return head


def adapted(loaded: LoadedModel, head: dict[str, Any]) -> LoadedModel:
    """A second copy of `loaded`'s encoder with the head's adapter merged in (same dtype, quantization, device)."""
    from workers import model_cache
    from workers.runners import adapter

    def merge(model: Any) -> None:
        try:
            adapter.merge(model, Path(head["adapter"]), head["adapter_rank"], head["adapter_alpha"])
        except (AttributeError, ValueError, KeyError) as e:
            raise ConfigError(f"model {loaded.spec.name!r}: the sentiment adapter {head['adapter']} "
                              f"does not fit this model ({e})") from None

    copy = model_cache.load_transformers(loaded.spec, str(loaded.device), transform=merge)
    return dataclasses.replace(copy, tokenizer=loaded.tokenizer)


class EncoderSentimentRunner(Runner):
    """`sentiment` on an encoder: the trained head named by `options.sentiment_head`, else zero-shot."""

    task_type = "sentiment"

    def __init__(self, loaded: Any, history: Any = None) -> None:
        super().__init__(loaded, history)
        head_name = self.spec.options.get("sentiment_head")
        self.head = load_head(head_name) if head_name else None
        labels = self.head["labels"] if self.head else (
            self.spec.options.get("sentiment_labels") or DEFAULT_LABELS)
        self.labels = list(labels)
        self._descriptions = None if self.head else [list(labels[k]) for k in self.labels]
        self._prototypes: Any = None
        self._weights: Any = None
        self._adapted: LoadedModel | None = None
        self._adapt_lock = threading.Lock()

    def head_model(self) -> LoadedModel:
        """The model the head reads: the worker's own, or (head with an adapter) the adapted copy."""
        if not self.head or not self.head.get("adapter"):
            return self.loaded
        with self._adapt_lock:
            if self._adapted is None:
                self._adapted = adapted(self.loaded, self.head)
            return self._adapted

    def prototypes(self) -> Any:
        import torch

        if self._prototypes is None:
            rows = []
            for descriptions in self._descriptions:
                vectors, _ = encode_texts(self.loaded, descriptions, self.spec.max_batch_size)
                rows.append(torch.nn.functional.normalize(vectors.mean(dim=0), dim=0))
            self._prototypes = torch.stack(rows)
        return self._prototypes

    def weights(self) -> tuple[Any, Any]:
        import torch

        if self._weights is None:
            self._weights = (torch.tensor(self.head["coef"]).T, torch.tensor(self.head["intercept"]))
        return self._weights

    def preprocess(self, requests: Sequence[Task], jobs: Sequence[Job] | None) -> list[str]:
        return [r.text for r in requests if isinstance(r, SentimentTask)]

    def forward(self, texts: list[str]) -> tuple[Any, list[int]]:
        if self.head:
            features, counts = layer_features(self.head_model(), texts, self.head["blocks"],
                                              self.spec.max_batch_size)
            coef, intercept = self.weights()
            return (features @ coef + intercept).softmax(dim=1), counts
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
        return tokenize(self.loaded, [r.text for r in requests])  # type: ignore[attr-defined]

    def forward(self, enc: dict[str, Any]) -> tuple[Any, list[int]]:
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
