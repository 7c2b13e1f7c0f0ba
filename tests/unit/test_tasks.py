import pytest

import llmos
from llmos.errors import ValidationError
from llmos.tasks import parse_task


def test_sentiment_task_roundtrips_json():
    task = llmos.SentimentTask(text="great")
    assert parse_task("sentiment", task.model_dump(mode="json")) == task


@pytest.mark.parametrize("kwargs,message", [
    ({"text": ""}, "text"),
    ({"text": "   "}, "empty"),
    ({"text": 5}, "string"),
    ({"text": None}, "string"),
    ({}, "text: Field required"),
    ({"text": "ok", "extra": 1}, "extra"),
])
def test_bad_sentiment_input_is_a_validation_error(kwargs, message):
    with pytest.raises(ValidationError, match=message) as info:
        llmos.SentimentTask(**kwargs)
    assert str(info.value).startswith("invalid sentiment task")


@pytest.mark.parametrize("texts", [[], [""], ["ok", 3], "not a list"])
def test_bad_embed_input(texts):
    with pytest.raises(ValidationError, match="invalid embed task"):
        llmos.EmbeddingTask(texts=texts)


def test_unknown_task_type_names_known_ones():
    with pytest.raises(ValidationError, match="known: chat, dialogue, embed, qa, sentiment, summarize, translate, writing"):
        parse_task("poetry", {"text": "x"})


def test_input_chars_counts_every_text():
    assert llmos.EmbeddingTask(texts=["ab", "cde"]).input_chars() == 5


@pytest.mark.parametrize("data", [None, "text", ["a"], 3])
def test_parse_task_needs_an_object(data):
    with pytest.raises(ValidationError, match="expected an object"):
        parse_task("sentiment", data)


@pytest.mark.parametrize("make,message", [
    (lambda: llmos.SentimentTask(text="a\x00b"), "text: .*U\\+0000 at position 1, which cannot be stored"),
    (lambda: llmos.EmbeddingTask(texts=["ok", "\ud800"]), "texts.1: .*U\\+D800 at position 0"),
    (lambda: llmos.WritingTask(prompt="x", stop=["\x00"]), "stop.0: .*U\\+0000"),
    (lambda: llmos.TranslationTask(text="x", source_lang="en\x00", target_lang="de"), "source_lang: .*U\\+0000"),
    (lambda: llmos.DialogueTask(user_utterance="x", conversation_id="a" * 65), "at most 64 characters"),
    (lambda: llmos.WritingTask(prompt="x", temperature=True), "temperature: Input should be a valid number"),
    (lambda: llmos.WritingTask(prompt="x", top_p=float("nan")), "top_p: Input should be a finite number"),
    (lambda: llmos.WritingTask(prompt="x", seed=True), "seed: Input should be a valid integer"),
    (lambda: llmos.WritingTask(prompt="x", seed=2**32), "seed: Input should be less than or equal to 4294967295"),
    (lambda: llmos.DialogueTask(user_utterance="x", max_new_tokens=False), "max_new_tokens"),
    (lambda: llmos.EmbeddingTask(texts=["a"] * 2049), "at most 2048 items"),
    (lambda: parse_task("writing", {1: "x"}), "expected an object with field names"),
])
def test_unstorable_text_booleans_and_limits_are_refused(make, message):
    with pytest.raises(ValidationError, match=message):
        make()


def test_stop_strings_count_against_the_input_limit():
    assert llmos.WritingTask(prompt="ab", stop=["cde", "f"]).input_chars() == 6


@pytest.mark.parametrize("kwargs,message", [
    ({"max_sentences": 2, "ratio": 0.5}, "give max_sentences or ratio, not both"),
    ({"ratio": 1.0}, "ratio: Input should be less than 1"),
    ({"ratio": 0.0}, "ratio: Input should be greater than 0"),
    ({"ratio": float("nan")}, "ratio: Input should be a finite number"),
    ({"ratio": "0.5"}, "ratio: Input should be a valid number"),
    ({"max_sentences": 0}, "max_sentences: Input should be greater than or equal to 1"),
    ({"max_sentences": 1.5}, "max_sentences: Input should be a valid integer"),
    ({"min_length": 10, "max_length": 5}, "min_length 10 is over max_length 5"),
])
def test_bad_summary_lengths_are_refused(kwargs, message):
    with pytest.raises(ValidationError, match=message):
        llmos.SummarizationTask(text="One. Two.", **kwargs)


@pytest.mark.parametrize("kwargs,n,keep", [
    ({}, 1, 1), ({}, 2, 1), ({}, 3, 1), ({}, 4, 2), ({}, 5, 2), ({}, 9, 3), ({}, 40, 5),  # a third, 1 to 5
    ({"ratio": 0.5}, 5, 3), ({"ratio": 0.5}, 40, 20), ({"ratio": 0.99}, 4, 3), ({"ratio": 0.01}, 3, 1),
    ({"max_sentences": 2}, 5, 2), ({"max_sentences": 9}, 5, 5), ({"max_sentences": 1}, 1, 1),
])
def test_sentences_to_keep(kwargs, n, keep):
    task = llmos.SummarizationTask(text="x", **kwargs)
    assert task.sentences_to_keep(n) == keep
    assert task.fraction(n) == (keep / n if n > 1 else 1.0)


def test_summary_ratio_roundtrips_json():
    task = llmos.SummarizationTask(text="One. Two.", ratio=0.5, max_length=40)
    assert parse_task("summarize", task.model_dump(mode="json")) == task
