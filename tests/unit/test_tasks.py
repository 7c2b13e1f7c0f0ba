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
    with pytest.raises(ValidationError, match="known: dialogue, embed, qa, sentiment, summarize, translate, writing"):
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
