"""minilm's sentiment (its trained head, fp32) on labeled sets written for the tests, and the demo's 36 reviews."""

import json
from pathlib import Path

import pytest

from llmos.errors import ConfigError
from llmos.registry import Registry
from llmos.settings import Settings
from llmos.tasks import SentimentTask
from workers import model_cache
from workers.runners import runners_for
from workers.runners.sentiment import load_head

DATA = Path(__file__).resolve().parent.parent / "data"
HEADS = Path(__file__).resolve().parents[2] / "llmos" / "data"
REVIEWS = HEADS / "reviews.txt"


def load(name):
    rows = [line.split("\t") for line in (DATA / name).read_text().splitlines() if line.strip()]
    return [(label, text) for label, text in rows]


def predict(texts, tmp_path):
    spec = Registry.load(Settings(home=tmp_path)).get("minilm")
    runner = runners_for(model_cache.get(spec, "cpu"))["sentiment"]
    assert runner.head is not None  # the built-in entry uses the trained head
    return [o.result["label"] for o in runner.run([SentimentTask(text=t) for t in texts])]


def accuracy(rows, tmp_path):
    return sum(p == label for (label, _), p in zip(rows, predict([t for _, t in rows], tmp_path))) / len(rows)


def test_heldout_v5_accuracy_at_least_092(tmp_path):
    rows = load("sentiment_heldout_v5.tsv")
    assert len(rows) == 300 and sum(label == "POSITIVE" for label, _ in rows) == 150
    assert accuracy(rows, tmp_path) >= 0.92  # the target; measured 0.940, 282/300 (docs/models.md)


def test_every_demo_review_labelled_as_a_person_would(tmp_path):
    rows = load("demo_reviews_labeled.tsv")
    assert [t for _, t in rows] == [line for line in REVIEWS.read_text().splitlines() if line.strip()]
    got = predict([t for _, t in rows], tmp_path)
    assert [(t, p) for (label, t), p in zip(rows, got) if p != label] == []


def test_an_unknown_head_is_a_config_error():
    with pytest.raises(ConfigError, match="sentiment_head 'nope'"):
        load_head("nope")


def test_a_head_whose_adapter_is_missing_is_a_config_error(tmp_path):
    head = json.loads((HEADS / "sentiment_head_minilm.json").read_text())
    assert head["adapter"] and (HEADS / head["adapter"]).is_file()  # the shipped head has its adapter
    (tmp_path / "h.json").write_text(json.dumps({**head, "adapter": "gone.safetensors"}))
    with pytest.raises(ConfigError, match="adapter .*gone.safetensors is missing"):
        load_head(str(tmp_path / "h.json"))


def test_the_adapter_leaves_embeddings_alone(tmp_path):
    """sentiment reads an adapted copy of the encoder; embed still returns the base model's vectors."""
    import torch

    from llmos.tasks import EmbeddingTask
    from workers.runners.encoder import encode_texts

    spec = Registry.load(Settings(home=tmp_path)).get("minilm")
    loaded = model_cache.get(spec, "cpu")
    runners = runners_for(loaded)
    text = "The delivery was two days late."
    before = runners["embed"].run([EmbeddingTask(texts=[text])])[0].result["vectors"][0]
    runners["sentiment"].run([SentimentTask(text=text)])
    assert runners["sentiment"].head_model().model is not loaded.model
    after = runners["embed"].run([EmbeddingTask(texts=[text])])[0].result["vectors"][0]
    assert before == after
    base = torch.nn.functional.normalize(torch.tensor([before]), dim=1)
    with torch.inference_mode():
        moved, _ = encode_texts(runners["sentiment"].head_model(), [text], 1)
    assert float((base @ moved.T)[0, 0]) < 0.999  # the adapted copy computes something else
