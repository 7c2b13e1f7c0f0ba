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
