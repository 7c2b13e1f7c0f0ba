"""Batched `generate` for decoder-only and encoder-decoder models.

Decoder-only prompts are padded on the left, so every sequence continues from the same right
edge; each sequence stops on its own (EOS, its own `max_new_tokens`, its own stop strings).
Requests are grouped by sampling settings (greedy, or temperature/top-p/seed), because one
`generate` call samples with one setting; a seeded request is reproducible whatever else is in
the batch, because a seed forms a group of its own.

Streaming: a request with a `stream` publisher (its job's stream channel has a subscriber) gets
its text published while `generate` runs, from a stopping criterion that never stops anything
(`_Streams`, called once per decoding step): each step decodes the row's new tokens the way the
final text is decoded (`_visible`) and publishes what was not published yet, holding back what
may still change: a trailing replacement character (a multi-byte character cut between tokens),
trailing whitespace (a tokenizer's clean-up may still remove it) and an ending that could be the
start of a stop string. Text past a stop string, past EOS or past the row's own max_new_tokens
is never published. Once the batch is done, the rest of each row's final text is published; the
runner ends the stream once the job's outcome is a result (workers/runners/base.py: a batch that
fails afterwards, or runs out of memory, ends nothing). Rows nobody listens to cost nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

from workers.model_cache import LoadedModel
from workers.runners.base import ItemError


@dataclasses.dataclass
class GenRequest:
    """One prompt, already tokenized (and trimmed to fit), with its decoding settings."""

    ids: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = ()
    min_new_tokens: int = 0
    should_stop: Callable[[], bool] | None = None  # cancelled or over its timeout: stop decoding
    stream: Any = None  # a llmos.streaming.TokenPublisher: publish the text while it is generated
    lstrip: bool = False  # the text starts at its first non-space character (a chat reply)

    def sampling_key(self) -> tuple:
        if self.temperature <= 0:
            return ("greedy", self.min_new_tokens)
        return ("sample", self.temperature, self.top_p, self.seed, self.min_new_tokens)


@dataclasses.dataclass
class GenOut:
    text: str
    tokens: int
    finish_reason: str  # "stop" or "length"


def fit_prompt(loaded: LoadedModel, ids: list[int], max_new_tokens: int) -> tuple[list[int], int, bool]:
    """Trim (or reject, per `on_overflow`) a prompt so prompt + new tokens fit the window.

    Returns (ids, max_new_tokens, truncated). Trimming keeps the end of the prompt.
    """
    window = loaded.context_window
    max_new = min(max_new_tokens, window - 1)
    budget = window - max_new
    if len(ids) <= budget:
        return ids, max_new, False
    if loaded.spec.on_overflow == "reject":
        raise ItemError(
            f"prompt of {len(ids)} tokens does not fit model {loaded.spec.name!r}'s context window of "
            f"{window} tokens with {max_new} new tokens (on_overflow = \"reject\")")
    return ids[-budget:], max_new, True


def generate_causal(loaded: LoadedModel, requests: Sequence[GenRequest]) -> list[GenOut]:
    out: list[GenOut | None] = [None] * len(requests)
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(requests):
        # a seeded request samples alone, so its text never depends on its batch mates
        key = r.sampling_key() + ((i,) if r.seed is not None and r.temperature > 0 else ())
        groups.setdefault(key, []).append(i)
    for idx in groups.values():
        for bucket in length_buckets(idx, [len(requests[i].ids) for i in idx]):
            for i, g in zip(bucket, _generate_group(loaded, [requests[i] for i in bucket])):
                out[i] = g
    return out  # type: ignore[return-value]


def length_buckets(idx: list[int], lengths: list[int], slack: int = 8, ratio: float = 1.5) -> list[list[int]]:
    """Split a group into runs of similar length so left padding stays small.

    Sorted by length; a new bucket starts when a prompt is longer than `ratio` × the bucket's
    shortest + `slack` tokens. Short prompts no longer pay for one long one.
    """
    order = sorted(range(len(idx)), key=lambda k: lengths[k])
    buckets: list[list[int]] = []
    shortest = 0
    for k in order:
        if not buckets or lengths[k] > ratio * shortest + slack:
            buckets.append([])
            shortest = lengths[k]
        buckets[-1].append(idx[k])
    return buckets


def _generate_group(loaded: LoadedModel, reqs: list[GenRequest]) -> list[GenOut]:
    import torch

    tok = loaded.tokenizer
    enc = tok.pad({"input_ids": [r.ids for r in reqs]}, padding=True, return_tensors="pt",
                  padding_side="left")
    enc = {k: v.to(loaded.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
    first = reqs[0]
    kwargs: dict[str, Any] = dict(max_new_tokens=max(r.max_new_tokens for r in reqs),
                                  pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    if first.min_new_tokens:
        kwargs["min_new_tokens"] = first.min_new_tokens
    if first.temperature > 0:
        kwargs.update(do_sample=True, temperature=first.temperature, top_p=first.top_p, top_k=0)
        if first.seed is not None:
            torch.manual_seed(first.seed)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    criteria: list[Any] = []
    if any(r.should_stop for r in reqs):
        criteria.append(_StopRows([r.should_stop for r in reqs]))
    streams = _Streams(tok, reqs, enc["input_ids"].shape[1]) if any(r.stream for r in reqs) else None
    if streams is not None:
        criteria.append(streams)
    if criteria:
        kwargs["stopping_criteria"] = StoppingCriteriaList(criteria)
    generated = loaded.model.generate(**enc, **kwargs)
    new = generated[:, enc["input_ids"].shape[1]:].tolist()
    outs = [_finish(tok, row[:r.max_new_tokens], r) for row, r in zip(new, reqs)]
    if streams is not None:
        streams.finish(outs)
    return outs


try:
    from transformers import StoppingCriteria, StoppingCriteriaList
except ImportError:  # pragma: no cover - transformers is a dependency
    StoppingCriteria, StoppingCriteriaList = object, list  # type: ignore[assignment,misc]


class _StopRows(StoppingCriteria):  # type: ignore[misc,valid-type]
    """Stops each row whose job was cancelled or ran over its timeout, between decoding steps."""

    def __init__(self, checks: list[Callable[[], bool] | None]) -> None:
        self.checks = checks

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        return torch.tensor([bool(c and c()) for c in self.checks], device=input_ids.device)


class _Streams(StoppingCriteria):  # type: ignore[misc,valid-type]
    """Publishes the new text of the rows that have a `stream`, once per decoding step; stops nothing."""

    def __init__(self, tok: Any, reqs: list[GenRequest], prompt_len: int) -> None:
        self.tok, self.prompt_len = tok, prompt_len
        self.rows = [(k, r) for k, r in enumerate(reqs) if r.stream is not None]
        self.done: set[int] = set()

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        for k, r in self.rows:
            if k in self.done or r.stream.ended or r.stream.broken:
                continue
            ids = input_ids[k, self.prompt_len:self.prompt_len + r.max_new_tokens].tolist()
            text, _, _, over = _visible(self.tok, ids, r, final=False)
            if over:
                self.done.add(k)  # EOS or a stop string: the rest comes from the final text
            else:
                text = _settled(text, r.stop)
            sent = r.stream.text
            if len(text) > len(sent) and text.startswith(sent):
                r.stream.delta(text[len(sent):])
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def finish(self, outs: list[GenOut]) -> None:
        """Publish the rest of each streamed row's final text (the runner ends the stream)."""
        for k, r in self.rows:
            sent = r.stream.text
            if outs[k].text.startswith(sent):
                r.stream.delta(outs[k].text[len(sent):])


def _settled(text: str, stop: Sequence[str]) -> str:
    """The part of a row's text so far that later tokens cannot change (see the module's doc)."""
    text = text.rstrip("\ufffd")
    text = text.rstrip()
    hold = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:n]):
                hold = n
                break
    return text[:len(text) - hold]


def _visible(tok: Any, ids: list[int], req: GenRequest, *, final: bool) -> tuple[str, str, list[int], bool]:
    """(text, finish_reason, its token ids, whether EOS or a stop string ended it) of a row's new
    ids (already cut to its max_new_tokens): cut at EOS, decoded, cut at the first stop string."""
    reason, over = "length", False
    eos = tok.eos_token_id
    if eos is not None and eos in ids:
        ids = ids[:ids.index(eos)]
        reason, over = "stop", True
    while ids and ids[-1] == tok.pad_token_id and tok.pad_token_id != eos:
        ids = ids[:-1]
    text = tok.decode(ids, skip_special_tokens=True)
    if req.lstrip:
        text = text.lstrip()
    cut = min((text.find(s) for s in req.stop if s in text), default=-1)
    if cut >= 0:
        text, reason, over = text[:cut], "stop", True
        if final:
            ids = tok.encode(text, add_special_tokens=False) if text else []
    return text, reason, ids, over


def _finish(tok: Any, ids: list[int], req: GenRequest) -> GenOut:
    text, reason, ids, _ = _visible(tok, ids, req, final=True)
    return GenOut(text=text, tokens=len(ids), finish_reason=reason)


def generate_seq2seq(loaded: LoadedModel, texts: Sequence[str], max_new_tokens: int,
                     min_new_tokens: int = 0) -> list[tuple[str, int, int, bool]]:
    """(output text, input tokens, output tokens, input truncated) per text, one batch."""
    tok = loaded.tokenizer
    window = loaded.context_window
    full = tok(list(texts), add_special_tokens=True)["input_ids"]
    if loaded.spec.on_overflow == "reject":
        for ids in full:
            if len(ids) > window:
                raise ItemError(f"input of {len(ids)} tokens is over model {loaded.spec.name!r}'s "
                                f"window of {window} tokens (on_overflow = \"reject\")")
    enc = tok(list(texts), padding=True, truncation=True, max_length=window, return_tensors="pt")
    enc = {k: v.to(loaded.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
    # min_length=0: a model's own minimum (distilbart-cnn's config says 56) would hold back the end
    # of text and cut a short summary mid-sentence; the task's min_length is the only lower bound.
    kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, min_length=0)
    if min_new_tokens:
        kwargs["min_new_tokens"] = min_new_tokens
    if tok.pad_token_id is not None:
        kwargs["pad_token_id"] = tok.pad_token_id
    generated = loaded.model.generate(**enc, **kwargs).tolist()
    special = set(tok.all_special_ids)
    out = []
    for ids, row in zip(full, generated):
        produced = [t for t in row if t not in special]
        out.append((tok.decode(row, skip_special_tokens=True).strip(), min(len(ids), window),
                    len(produced), len(ids) > window))
    return out
