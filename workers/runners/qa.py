"""`qa`: extractive question answering from start/end logits, with character offsets.

transformers 5 removed the question-answering pipeline; this is the same method: the context is
cut into overlapping windows that fit the model, each window scores every (start, end) pair of
context tokens as p(start) × p(end) with end ≥ start and at most `max_answer_tokens` long, and
the best span over all windows is mapped back to characters through the offset mapping.
"""

from __future__ import annotations

from typing import Any, Sequence

from llmos.jobs import Job
from llmos.tasks import QuestionAnsweringTask, Task
from workers.runners.base import ItemOutcome, Runner


class QuestionAnsweringRunner(Runner):
    task_type = "qa"

    def preprocess(self, requests: Sequence[Task], jobs: Sequence[Job] | None) -> Any:
        qs = [r for r in requests if isinstance(r, QuestionAnsweringTask)]
        window = self.loaded.context_window
        enc = self.loaded.tokenizer(
            [r.question for r in qs], [r.context for r in qs], truncation="only_second",
            max_length=window, stride=min(128, window // 4), return_overflowing_tokens=True,
            return_offsets_mapping=True, padding=True, return_tensors="pt")
        return enc

    def forward(self, enc: Any) -> Any:
        inputs = {k: enc[k].to(self.loaded.device) for k in ("input_ids", "attention_mask")}
        out = self.loaded.model(**inputs)
        return enc, out.start_logits.float().cpu(), out.end_logits.float().cpu()

    def postprocess(self, outputs: Any, requests: Sequence[Task]) -> list[ItemOutcome]:
        import torch

        enc, starts, ends = outputs
        max_len = int(self.spec.options.get("max_answer_tokens", 30))
        best: dict[int, tuple[float, int, int]] = {}
        tokens: dict[int, int] = {}
        sample_of = enc["overflow_to_sample_mapping"].tolist()
        for w, sample in enumerate(sample_of):
            seq = enc.sequence_ids(w)
            ctx = torch.tensor([s == 1 for s in seq])
            tokens[sample] = tokens.get(sample, 0) + int(enc["attention_mask"][w].sum())
            if not bool(ctx.any()):
                continue
            ps = starts[w].masked_fill(~ctx, float("-inf")).softmax(-1)
            pe = ends[w].masked_fill(~ctx, float("-inf")).softmax(-1)
            scores = torch.triu(ps[:, None] * pe[None, :]) - torch.triu(torch.ones(len(ps), len(ps)), diagonal=max_len)
            flat = int(scores.argmax())
            s, e = divmod(flat, scores.shape[1])
            score = float(scores[s, e])
            offsets = enc["offset_mapping"][w]
            start_char, end_char = int(offsets[s][0]), int(offsets[e][1])
            if sample not in best or score > best[sample][0]:
                best[sample] = (score, start_char, end_char)
        out = []
        for i, r in enumerate(requests):
            score, a, b = best.get(i, (0.0, 0, 0))
            ctx_text = r.context  # type: ignore[attr-defined]
            out.append(ItemOutcome(result={"answer": ctx_text[a:b], "score": round(score, 6),
                                           "start": a, "end": b},
                                   tokens_in=tokens.get(i, 0), tokens_out=0))
        return out
