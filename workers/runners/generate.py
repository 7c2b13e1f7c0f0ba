"""`writing`, `chat` and `dialogue` on decoder-only models, `writing` on encoder-decoder models.

`chat` renders its messages with the tokenizer's chat template when it has one
(`apply_chat_template(..., add_generation_prompt=True)`); without one, as plain lines
(`chat_lines`: "System: ...", "User: ...", "Assistant: ..." and a last "Assistant:" for the
model to continue, the reply cut at the next line that starts a turn). From there it generates
exactly as `writing` does: the same batching, stop strings, seed, truncation keeping the end.
Writing and chat jobs somebody streams get their text published while it is generated
(workers/runners/generation.py).
"""

from __future__ import annotations

from typing import Any, Sequence

from llmos.jobs import Job
from llmos.tasks import ChatTask, DialogueTask, Task, WritingTask
from workers.runners.base import ItemError, ItemOutcome, Runner
from workers.runners.generation import GenRequest, fit_prompt, generate_causal, generate_seq2seq


class WritingRunner(Runner):
    """Continue prompts; one left-padded `generate` per sampling group."""

    task_type = "writing"

    def preprocess(self, requests: Sequence[Task], jobs: Sequence[Job] | None) -> Any:
        reqs, meta = [], []
        streams = self.publishers(len(requests))
        for r, stream in zip(requests, streams):
            ids, stop, lstrip = self.prompt(r)
            if not ids:
                raise ItemError("the prompt encodes to no tokens")
            fitted, max_new, truncated = fit_prompt(self.loaded, ids, r.new_tokens(self.spec.max_new_tokens))
            reqs.append(GenRequest(ids=fitted, max_new_tokens=max_new, temperature=r.temperature,
                                   top_p=r.top_p, seed=r.seed, stop=stop, lstrip=lstrip,
                                   min_new_tokens=int(self.spec.options.get("min_new_tokens", 0)),
                                   should_stop=self._stopper(len(reqs)), stream=stream))
            meta.append((len(fitted), truncated))
        return reqs, meta

    def prompt(self, task: Any) -> tuple[list[int], list[str], bool]:
        """(prompt token ids, stop strings, whether the reply's leading spaces are dropped)."""
        assert isinstance(task, WritingTask)
        return self.loaded.tokenizer.encode(task.prompt, add_special_tokens=False), list(task.stop), False

    def forward(self, inputs: Any) -> Any:
        reqs, meta = inputs
        return generate_causal(self.loaded, reqs), meta

    def postprocess(self, outputs: Any, requests: Sequence[Task]) -> list[ItemOutcome]:
        gens, meta = outputs
        return [ItemOutcome(result={"text": g.text, "tokens": g.tokens, "prompt_tokens": n,
                                    "truncated": t, "finish_reason": g.finish_reason},
                            tokens_in=n, tokens_out=g.tokens)
                for g, (n, t) in zip(gens, meta)]


CHAT_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
"""The line prefix of each role in the plain-lines rendering of a chat (no chat template)."""

CHAT_TURN_STOPS = ("\nUser:", "\nSystem:")
"""Where a plain-lines reply ends: the model starts writing the next turn (added to the task's stops)."""


def chat_lines(messages: Sequence[Any]) -> str:
    """The prompt of a chat for a model without a chat template: one "Role: content" line per
    message, then "Assistant:" for the model to continue (the reply's leading space is dropped)."""
    lines = [f"{CHAT_ROLES[m.role]}: {m.content}" for m in messages]
    return "\n".join(lines + ["Assistant:"])


class ChatRunner(WritingRunner):
    """`chat`: the messages rendered as a prompt (module doc), then generated as `writing` is."""

    task_type = "chat"

    def prompt(self, task: Any) -> tuple[list[int], list[str], bool]:
        assert isinstance(task, ChatTask)
        tok = self.loaded.tokenizer
        if getattr(tok, "chat_template", None):
            messages = [{"role": m.role, "content": m.content} for m in task.messages]
            try:
                ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            except Exception as exc:  # jinja's TemplateError: e.g. "roles must alternate user/assistant"
                raise ItemError(f"model {self.spec.name!r}'s chat template refused these messages: "
                                f"{type(exc).__name__}: {exc}") from None
            ids = ids["input_ids"] if hasattr(ids, "keys") else ids  # a BatchEncoding in newer transformers
            return list(ids), list(task.stop), False
        ids = tok.encode(chat_lines(task.messages), add_special_tokens=False)
        return ids, list(task.stop) + [s for s in CHAT_TURN_STOPS if s not in task.stop], True


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
