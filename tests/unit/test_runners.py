"""Runners on real tiny models, in process: batching, trimming, stops, seeds, offsets."""

import pytest

from llmos.jobs import Job, JobStatus
from llmos.registry import Registry
from llmos.settings import Settings
from llmos.tasks import (DialogueTask, EmbeddingTask, QuestionAnsweringTask, SentimentTask,
                         SummarizationTask, TranslationTask, WritingTask)
from workers import model_cache
from workers.runners import runners_for, seq2seq
from workers.runners.extractive import select_sentences, split_sentences


def runners(registry, name, history=None, **changes):
    spec = registry.get(name)
    if changes:
        spec = spec.model_copy(update=changes)
        return runners_for(model_cache.load(spec, "cpu"), history)
    return runners_for(model_cache.get(spec, "cpu"), history)


def test_batched_generation_equals_one_at_a_time(tiny_registry):
    r = runners(tiny_registry, "tiny-gpt2")["writing"]
    tasks = [WritingTask(prompt="The cat likes", max_new_tokens=6),
             WritingTask(prompt="A robot paints the small box and then", max_new_tokens=3),
             WritingTask(prompt="Hello", max_new_tokens=5)]
    batched = r.run(tasks)
    alone = [r.run([t])[0] for t in tasks]
    assert [b.result["text"] for b in batched] == [a.result["text"] for a in alone]
    assert [b.result["tokens"] for b in batched] == [6, 3, 5]  # each stops at its own cap
    assert all(b.error is None and b.tokens_in > 0 for b in batched)


def test_stop_sequence_cuts_the_text(tiny_registry):
    r = runners(tiny_registry, "tiny-gpt2")["writing"]
    free = r.run([WritingTask(prompt="The cat likes", max_new_tokens=8)])[0].result
    assert len(free["text"]) > 2
    stop = free["text"][2:4]
    cut = r.run([WritingTask(prompt="The cat likes", max_new_tokens=8, stop=[stop])])[0].result
    assert cut["text"] == free["text"][:free["text"].find(stop)]
    assert cut["finish_reason"] == "stop" and stop not in cut["text"]


def test_seeded_sampling_is_reproducible_whatever_the_batch(tiny_registry):
    r = runners(tiny_registry, "tiny-gpt2")["writing"]
    seeded = WritingTask(prompt="My friend", max_new_tokens=8, temperature=1.0, seed=7)
    alone = r.run([seeded])[0].result["text"]
    with_others = r.run([WritingTask(prompt="x", max_new_tokens=4, temperature=1.0, seed=1), seeded,
                         WritingTask(prompt="y", max_new_tokens=4)])[1].result["text"]
    other_seed = r.run([seeded.model_copy(update={"seed": 8})])[0].result["text"]
    assert alone == with_others
    assert other_seed != alone


def test_long_prompt_is_trimmed_and_said(tiny_registry):
    r = runners(tiny_registry, "tiny-gpt2")["writing"]
    long = " ".join(["the cat likes a red ball"] * 60)  # far over 128 positions
    out = r.run([WritingTask(prompt=long, max_new_tokens=8)])[0]
    assert out.error is None and out.result["truncated"] is True
    assert out.result["prompt_tokens"] == 128 - 8


def test_long_prompt_rejected_when_configured(tiny_registry):
    r = runners(tiny_registry, "tiny-gpt2", on_overflow="reject")["writing"]
    long = " ".join(["the cat likes a red ball"] * 60)
    bad, good = r.run([WritingTask(prompt=long, max_new_tokens=8), WritingTask(prompt="ok", max_new_tokens=2)])
    assert "does not fit model 'tiny-gpt2'" in bad.error and "context window of 128" in bad.error
    assert good.error is None and good.result["tokens"] == 2


def dialogue_job(cid):
    return Job(id="j", model="m", task_type="dialogue", priority=5, status=JobStatus.RUNNING,
               input={}, conversation_id=cid)


def test_dialogue_prompt_holds_history_and_drops_oldest_to_fit(tiny_registry):
    turns = [(f"question number {i} about the blue door", f"answer number {i}") for i in range(30)]
    r = runners(tiny_registry, "tiny-gpt2", history=lambda job: turns)["dialogue"]
    out = r.run([DialogueTask(user_utterance="and now?", conversation_id="c1")], [dialogue_job("c1")])[0]
    res = out.result
    assert out.error is None and res["conversation_id"] == "c1"
    assert 0 < res["history_turns"] < 30 and res["truncated"] is True
    assert "answer number 29" in res["prompt"] and "question number 0 " not in res["prompt"]
    assert res["prompt"].endswith("and now?<|endoftext|>")
    assert out.tokens_in <= 128 - 8


def test_seq2seq_summarize_translate_and_writing(tiny_registry):
    rs = runners(tiny_registry, "tiny-bart")
    s = rs["summarize"].run([SummarizationTask(text="The cat likes a red ball. " * 5, max_length=6, min_length=3)])[0]
    t = rs["translate"].run([TranslationTask(text="Hello, how are you?", source_lang="en", target_lang="de")])[0]
    w = rs["writing"].run([WritingTask(prompt="Hello", max_new_tokens=4)])[0]
    assert isinstance(s.result["summary"], str) and 3 <= s.tokens_out <= 6
    assert isinstance(t.result["translation"], str) and t.tokens_out >= 2
    assert isinstance(w.result["text"], str) and 2 <= w.tokens_out <= 4


def test_classifier_sentiment_uses_id2label(tiny_registry):
    outs = runners(tiny_registry, "sst2")["sentiment"].run([SentimentTask(text="great"), SentimentTask(text="bad")])
    for o in outs:
        assert o.result["label"] in {"POSITIVE", "NEGATIVE"} and 0.5 <= o.result["score"] <= 1.0


def test_qa_answer_is_a_span_of_the_context_even_past_the_window(tiny_registry):
    r = runners(tiny_registry, "squad")["qa"]  # max_input_tokens = 48: long contexts use windows
    context = " ".join(f"Sentence {i}: the teacher opens the window." for i in range(20)) + " Paris is in France."
    tasks = [QuestionAnsweringTask(question="Where is Paris?", context=context),
             QuestionAnsweringTask(question="Who opens it?", context="The teacher opens the window.")]
    for task, out in zip(tasks, r.run(tasks)):
        res = out.result
        assert 0 <= res["start"] <= res["end"] <= len(task.context)
        assert res["answer"] == task.context[res["start"]:res["end"]]
        assert 0.0 <= res["score"] <= 1.0
    assert r.run(tasks[:1])[0].tokens_in > 48  # several windows were scored


FIVE_SENTENCES = ("The city council met on Monday to review the annual budget. "
                  "The budget for public parks was cut by ten percent. "
                  "Several residents objected to the parks budget cut during the meeting. "
                  "The mayor promised to revisit the parks budget next spring. "
                  "Lunch at the meeting was pizza.")


def test_select_sentences_keeps_the_best_in_text_order_within_budget():
    scores, lengths = [0.1, 0.9, 0.5, 0.8, 0.2], [5, 5, 5, 5, 5]
    assert select_sentences(scores, lengths, keep=2, budget=100) == [1, 3]
    assert select_sentences(scores, lengths, keep=3, budget=100) == [1, 2, 3]
    assert select_sentences(scores, [5, 5, 5, 50, 5], keep=2, budget=20) == [1, 2]  # 3 is over the budget
    assert select_sentences(scores, [5, 99, 5, 5, 5], keep=1, budget=20) == [1]  # the best, even over it
    assert select_sentences([0.3], [7], keep=1, budget=128) == [0]


def test_extractive_summary_of_five_sentences_is_two_of_them_in_order(tmp_path):
    r = runners(Registry.load(Settings(home=tmp_path)), "minilm")["summarize"]
    sentences = split_sentences(FIVE_SENTENCES)
    one = "The budget for public parks was cut by ten percent."
    outs = r.run([SummarizationTask(text=FIVE_SENTENCES), SummarizationTask(text=FIVE_SENTENCES, max_sentences=4),
                  SummarizationTask(text=FIVE_SENTENCES, ratio=0.6), SummarizationTask(text=one),
                  SummarizationTask(text=FIVE_SENTENCES, max_sentences=5, max_length=25)])
    picked = [split_sentences(o.result["summary"]) for o in outs]
    assert [len(p) for p in picked[:3]] == [2, 4, 3] and picked[3] == [one]
    for p in picked:
        assert set(p) <= set(sentences) | {one}
        positions = [sentences.index(s) for s in p if s in sentences]
        assert positions == sorted(positions)
    assert "Lunch at the meeting was pizza." not in picked[0]  # off topic: farthest from the centroid
    assert outs[4].tokens_out <= 25 < outs[4].tokens_in and len(picked[4]) < 5
    assert all(o.tokens_out < o.tokens_in for o in outs[:3]) and outs[3].tokens_out == outs[3].tokens_in
    assert not any(o.result["truncated"] for o in outs)


def test_seq2seq_summary_asks_generate_for_fewer_tokens_than_the_input(tiny_registry, monkeypatch):
    asked = []
    real = seq2seq.generate_seq2seq

    def spy(loaded, texts, max_new_tokens, min_new_tokens=0):
        asked.append(max_new_tokens)
        return real(loaded, texts, max_new_tokens, min_new_tokens)

    monkeypatch.setattr(seq2seq, "generate_seq2seq", spy)
    r = runners(tiny_registry, "tiny-bart")["summarize"]
    long_text = " ".join(f"The cat number {i} likes a red ball in the garden." for i in range(12))
    default, explicit = r.run([SummarizationTask(text=long_text), SummarizationTask(text=long_text, max_length=9)])
    tokens_in = default.tokens_in
    assert sorted(asked) == [9, seq2seq.summary_tokens(SummarizationTask(text=long_text), tokens_in)]
    assert max(asked) <= tokens_in / 3 + 1  # 4 of 12 sentences: a third of the input, rounded down
    assert default.tokens_out <= max(asked) < tokens_in and explicit.tokens_out <= 9


def test_summary_tokens_bounds():
    task = SummarizationTask(text="One. Two. Three.")
    assert seq2seq.summary_tokens(task, 300) == 96  # a third, rounded down to a multiple of 8
    assert seq2seq.summary_tokens(task, 12) == 10  # at least MIN_SUMMARY_TOKENS
    assert seq2seq.summary_tokens(SummarizationTask(text="One."), 6) == 6  # one sentence: up to itself
    assert seq2seq.summary_tokens(SummarizationTask(text="One. Two. Three.", max_length=20), 300) == 20
    assert seq2seq.summary_tokens(SummarizationTask(text="One. Two. Three.", min_length=30), 30) == 30


def test_int8_minilm_stays_close_to_fp32(tmp_path):
    reg = Registry.load(Settings(home=tmp_path))
    texts = ["a cat sat on the mat", "stock markets fell sharply today", "I love this phone"]
    fp32 = runners(reg, "minilm")["embed"].run([EmbeddingTask(texts=texts)])[0].result["vectors"]
    q = runners(reg, "minilm", quantization="int8")["embed"]
    assert "torch.ao.nn.quantized.dynamic.modules.linear" in {type(m).__module__ for m in q.loaded.model.modules()}
    int8 = q.run([EmbeddingTask(texts=texts)])[0].result["vectors"]
    for a, b in zip(fp32, int8):
        assert sum(x * y for x, y in zip(a, b)) > 0.9  # measured ≈ 0.94 (docs/models.md)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_generation_runs(tiny_registry, dtype):
    r = runners(tiny_registry, "tiny-gpt2", dtype=dtype)["writing"]
    out = r.run([WritingTask(prompt="The cat likes", max_new_tokens=4)])[0]
    assert out.error is None and out.result["tokens"] == 4


def test_length_buckets_keep_padding_small():
    from workers.runners.generation import length_buckets

    lengths = [3, 100, 4, 5, 90, 30, 6]
    buckets = length_buckets(list(range(7)), lengths)
    assert sorted(i for b in buckets for i in b) == list(range(7))
    for b in buckets:
        ls = [lengths[i] for i in b]
        assert max(ls) <= 1.5 * min(ls) + 8
    assert [lengths[i] for i in buckets[0]] == [3, 4, 5, 6]


def test_mixed_lengths_batched_equal_alone_for_embeddings(tmp_path):
    reg = Registry.load(Settings(home=tmp_path))
    r = runners(reg, "minilm")["embed"]
    texts = ["short", "a much longer sentence about the weather in the mountains in spring " * 3, "mid length text"]
    together = r.run([EmbeddingTask(texts=texts)])[0].result["vectors"]
    for t, v in zip(texts, together):
        alone = r.run([EmbeddingTask(texts=[t])])[0].result["vectors"][0]
        assert sum(a * b for a, b in zip(v, alone)) > 0.9999  # same text, same vector: order kept
