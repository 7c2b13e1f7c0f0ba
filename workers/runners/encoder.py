"""Sentence embeddings from an encoder: mean pooling over real tokens, then L2 normalisation.

This is all-MiniLM-L6-v2's recipe (equal to sentence-transformers' output to ~1e-8).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

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


def encode_texts(loaded: LoadedModel, texts: Sequence[str], chunk: int,
                 skip: Callable[[int], bool] | None = None) -> tuple[Any, list[int]]:
    """Embed many texts in chunks of `chunk`; returns (vectors, tokens per text).

    Texts are sorted by length first, so each chunk pads to a similar length (results come back
    in input order). `skip(i)` is asked before each chunk: texts it names (their job was
    cancelled or timed out) are not computed and get zero vectors.
    """
    import torch

    n = len(texts)
    rows: list[Any] = [None] * n
    counts = [0] * n
    by_length = sorted(range(n), key=lambda j: len(texts[j]))  # similar lengths share a chunk
    for i in range(0, n, chunk):
        idx = [j for j in by_length[i:i + chunk] if not (skip and skip(j))]
        if not idx:
            continue
        enc = tokenize(loaded, [texts[j] for j in idx])
        got = embed(loaded, enc)
        for k, (j, c) in enumerate(zip(idx, token_counts(enc))):
            rows[j], counts[j] = got[k], c
    dim = next((r.shape[0] for r in rows if r is not None), 0)
    if not n:
        return torch.zeros(0, dim), counts
    return torch.stack([r if r is not None else torch.zeros(dim) for r in rows]), counts
