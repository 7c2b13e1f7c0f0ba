"""minilm's zero-shot sentiment on a held-out labeled set written for the tests (not tuned on)."""

from pathlib import Path

from llmos.registry import Registry
from llmos.settings import Settings
from llmos.tasks import SentimentTask
from workers import model_cache
from workers.runners import runners_for

DATA = Path(__file__).resolve().parent.parent / "data"


def load(name):
    rows = [line.split("\t") for line in (DATA / name).read_text().splitlines() if line.strip()]
    return [(label, text) for label, text in rows]


def accuracy(rows, tmp_path):
    spec = Registry.load(Settings(home=tmp_path)).get("minilm")
    runner = runners_for(model_cache.get(spec, "cpu"))["sentiment"]
    out = runner.run([SentimentTask(text=t) for _, t in rows])
    return sum(o.result["label"] == label for (label, _), o in zip(rows, out)) / len(rows)


def test_heldout_accuracy_at_least_085(tmp_path):
    rows = load("sentiment_heldout.tsv")
    assert len(rows) >= 50 and {label for label, _ in rows} == {"POSITIVE", "NEGATIVE"}
    assert accuracy(rows, tmp_path) >= 0.85  # measured 0.88 (docs/models.md)
