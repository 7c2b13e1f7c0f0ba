"""Sentence embeddings from an encoder: mean pooling over real tokens, then L2 normalisation.

This is all-MiniLM-L6-v2's recipe (equal to sentence-transformers' output to ~1e-8).
"""

from __future__ import annotations

from typing import Any, Sequence

from workers.model_cache import LoadedModel


def tokenize(loaded: LoadedModel, texts: Sequence[str]) -> dict[str, Any]:
    enc = loaded.tokenizer(list(texts), padding=True, truncation=True,
                           max_length=loaded.context_window, return_tensors="pt")
    return {k: v.to(loaded.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}


def embed(loaded: LoadedModel, enc: dict[str, Any]) -> Any:
    """(n, dim) float32 tensor of normalised sentence vectors."""
    import torch

    hidden = loaded.model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled.float(), p=2, dim=1)


def token_counts(enc: dict[str, Any]) -> list[int]:
    return [int(n) for n in enc["attention_mask"].sum(dim=1).tolist()]


def encode_texts(loaded: LoadedModel, texts: Sequence[str], chunk: int) -> tuple[Any, list[int]]:
    """Embed many texts in chunks of `chunk`; returns (vectors, tokens per text)."""
    import torch

    vectors, counts = [], []
    for i in range(0, len(texts), chunk):
        enc = tokenize(loaded, texts[i:i + chunk])
        vectors.append(embed(loaded, enc))
        counts.extend(token_counts(enc))
    return torch.cat(vectors), counts
