"""`writing` and `dialogue` on decoder-only models, `writing` on encoder-decoder models."""

from __future__ import annotations

from typing import Any, Sequence

from llmos.jobs import Job
from llmos.tasks import DialogueTask, Task, WritingTask
from workers.runners.base import ItemError, ItemOutcome, Runner
from workers.runners.generation import GenRequest, fit_prompt, generate_causal, generate_seq2seq


class WritingRunner(Runner):
    """Continue prompts; one left-padded `generate` per sampling group."""

    task_type = "writing"

    def preprocess(self, requests: Sequence[Task], jobs: Sequence[Job] | None) -> Any:
        reqs, meta = [], []
        for r in requests:
            assert isinstance(r, WritingTask)
            ids = self.loaded.tokenizer.encode(r.prompt, add_special_tokens=False)
            if not ids:
                raise ItemError("the prompt encodes to no tokens")
            fitted, max_new, truncated = fit_prompt(self.loaded, ids, r.new_tokens(self.spec.max_new_tokens))
            reqs.append(GenRequest(ids=fitted, max_new_tokens=max_new, temperature=r.temperature,
                                   top_p=r.top_p, seed=r.seed, stop=r.stop,
                                   min_new_tokens=int(self.spec.options.get("min_new_tokens", 0)),
                                   should_stop=self._stopper(len(reqs))))
            meta.append((len(fitted), truncated))
        return reqs, meta

    def forward(self, inputs: Any) -> Any:
        reqs, meta = inputs
        return generate_causal(self.loaded, reqs), meta

    def postprocess(self, outputs: Any, requests: Sequence[Task]) -> list[ItemOutcome]:
        gens, meta = outputs
        return [ItemOutcome(result={"text": g.text, "tokens": g.tokens, "prompt_tokens": n,
                                    "truncated": t, "finish_reason": g.finish_reason},
                            tokens_in=n, tokens_out=g.tokens)
                for g, (n, t) in zip(gens, meta)]


class Seq2SeqWritingRunner(Runner):
    """`writing` on an encoder-decoder model: the prompt is the input, the output the text."""

    task_type = "writing"

    def preprocess(self, requests: Sequence[Task], jobs: Sequence[Job] | None) -> Any:
        return requests

    def forward(self, requests: Any) -> Any:
        # one group per max_new_tokens keeps each request's own cap
        out: dict[int, tuple] = {}
        by_len: dict[int, list[int]] = {}
        for i, r in enumerate(requests):
            by_len.setdefault(r.new_tokens(self.spec.max_new_tokens), []).append(i)
        for n, idx in by_len.items():
            texts = [requests[i].prompt for i in idx]
            min_new = int(self.spec.options.get("min_new_tokens", 0))
            for i, res in zip(idx, generate_seq2seq(self.loaded, texts, n, min(min_new, n))):
                out[i] = res
        return [out[i] for i in range(len(requests))]

    def postprocess(self, outputs: Any, requests: Sequence[Task]) -> list[ItemOutcome]:
        return [ItemOutcome(result={"text": text, "tokens": n_out, "prompt_tokens": n_in,
                                    "truncated": cut, "finish_reason": "stop"},
                            tokens_in=n_in, tokens_out=n_out)
                for text, n_in, n_out, cut in outputs]


class DialogueRunner(Runner):
    """One turn of a conversation; earlier turns come from the task table, newest kept first.

    With a chat template the turns become messages; without one (DialoGPT, GPT-2) they are
    joined by the EOS token, DialoGPT's own format. Oldest turns are dropped until the prompt
    and the reply fit the context window.
    """

    task_type = "dialogue"

    def preprocess(self, requests: Sequence[Task], jobs: Sequence[Job] | None) -> Any:
        reqs, meta = [], []
        for i, r in enumerate(requests):
            assert isinstance(r, DialogueTask)
            turns = self.history(jobs[i]) if (self.history and jobs) else []
            max_new = r.max_new_tokens or self.spec.max_new_tokens
            ids, kept, max_new, truncated = self.build_prompt(r, turns, max_new)
            reqs.append(GenRequest(ids=ids, max_new_tokens=max_new, temperature=r.temperature,
                                   top_p=r.top_p, seed=r.seed,
                                   min_new_tokens=int(self.spec.options.get("min_new_tokens", 0)),
                                   should_stop=self._stopper(i)))
            meta.append((r.conversation_id or "", kept, truncated, ids))
        return reqs, meta

    def build_prompt(self, task: DialogueTask, turns: list[tuple[str, str]],
                     max_new: int) -> tuple[list[int], int, int, bool]:
        window = self.loaded.context_window
        max_new = min(max_new, window - 1)
        budget = window - max_new
        for keep in range(len(turns), -1, -1):
            ids = self.encode(task, turns[len(turns) - keep:])
            if len(ids) <= budget:
                return ids, keep, max_new, keep < len(turns)
        fitted, max_new, _ = fit_prompt(self.loaded, ids, max_new)  # the utterance alone is too long
        return fitted, 0, max_new, True

    def encode(self, task: DialogueTask, turns: list[tuple[str, str]]) -> list[int]:
        tok = self.loaded.tokenizer
        if getattr(tok, "chat_template", None):
            messages = ([{"role": "system", "content": task.system}] if task.system else [])
            for user, reply in turns:
                messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
            messages.append({"role": "user", "content": task.user_utterance})
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            return list(ids["input_ids"] if isinstance(ids, dict) else ids)
        eos = [tok.eos_token_id]
        ids: list[int] = []
        if task.system:
            ids += tok.encode(task.system, add_special_tokens=False) + eos
        for user, reply in turns:
            ids += tok.encode(user, add_special_tokens=False) + eos
            ids += tok.encode(reply, add_special_tokens=False) + eos
        return ids + tok.encode(task.user_utterance, add_special_tokens=False) + eos

    def forward(self, inputs: Any) -> Any:
        reqs, meta = inputs
        return generate_causal(self.loaded, reqs), meta

    def postprocess(self, outputs: Any, requests: Sequence[Task]) -> list[ItemOutcome]:
        gens, meta = outputs
        tok = self.loaded.tokenizer
        return [ItemOutcome(result={"response": g.text.strip(), "conversation_id": cid,
                                    "history_turns": kept, "truncated": cut,
                                    "prompt": tok.decode(ids, skip_special_tokens=False)},
                            tokens_in=len(ids), tokens_out=g.tokens)
                for g, (cid, kept, cut, ids) in zip(gens, meta)]
