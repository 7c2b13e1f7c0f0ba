"""minilm sentiment (its trained head): accuracy and speed, fp32 against dynamic int8, in one run.

    .venv/bin/python benchmarks/sentiment_quality.py [--repeat 5]

Prints a JSON object and tables. Accuracy on tests/data/sentiment_heldout_v4.tsv (300 sentences,
the headline set: written before the last round of methods, no choice made on it; see
docs/models.md for how often each set has been scored),
sentiment_heldout_v3.tsv (260) and sentiment_heldout_v2.tsv (238), both scored in earlier rounds,
the older sentiment_heldout.tsv (50) and sentiment_labeled.tsv (60, the zero-shot descriptions'
tuning set), and the demo's 36 reviews (tests/data/demo_reviews_labeled.tsv); confusion matrices
on v4, v3 and v2; speed = ms per text through the runner at batch 32, best of N. `--zero-shot`
measures the zero-shot method (no head) for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from llmos.registry import Registry  # noqa: E402
from llmos.settings import Settings  # noqa: E402
from llmos.tasks import SentimentTask  # noqa: E402
from workers import model_cache  # noqa: E402
from workers.runners import runners_for  # noqa: E402

SETS = {"heldout_v4": "sentiment_heldout_v4.tsv", "heldout_v3": "sentiment_heldout_v3.tsv",
        "heldout_v2": "sentiment_heldout_v2.tsv",
        "heldout_50": "sentiment_heldout.tsv",
        "tuning_60": "sentiment_labeled.tsv", "demo_36": "demo_reviews_labeled.tsv"}
LABELS = ("POSITIVE", "NEGATIVE")


def rows(name: str) -> list[tuple[str, str]]:
    lines = (ROOT / "tests" / "data" / name).read_text().splitlines()
    return [tuple(line.split("\t")) for line in lines if line.strip()]  # type: ignore[misc]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--zero-shot", action="store_true", help="without the trained head")
    args = ap.parse_args()
    base = Registry.load(Settings()).get("minilm")
    if args.zero_shot:
        base = base.model_copy(update={"options": {}})
    data = {k: rows(v) for k, v in SETS.items()}
    report: dict = {"method": "zero-shot" if args.zero_shot else "head"}
    for label, spec in [("fp32", base), ("int8", base.model_copy(update={"quantization": "int8"}))]:
        runner = runners_for(model_cache.load(spec, "cpu"))["sentiment"]
        r: dict = {}
        for name, items in data.items():
            out = [o.result["label"] for o in runner.run([SentimentTask(text=t) for _, t in items])]
            r[name] = round(sum(p == y for (y, _), p in zip(items, out)) / len(items), 3)
            if name in ("heldout_v4", "heldout_v3", "heldout_v2"):  # rows: true label, columns: predicted
                r["confusion_" + name[-2:]] = {y: {p: sum(1 for (t, _), o in zip(items, out) if t == y and o == p)
                                         for p in LABELS} for y in LABELS}
            if name == "demo_36":
                r["demo_wrong"] = [t for (y, t), p in zip(items, out) if p != y]
        texts = [SentimentTask(text=t) for _, t in data["heldout_v4"]][:32]
        runner.run(texts)  # warm-up
        best = min(_timed(runner, texts) for _ in range(args.repeat))
        r["ms_per_text"] = round(1000 * best / len(texts), 2)
        report[label] = r
    print(json.dumps(report))
    print(f"{'':6} {'v4 (300)':>9} {'v3 (260)':>9} {'v2 (238)':>9}"
          f" {'old 50':>7} {'tune 60':>8} {'demo 36':>8} {'ms/text':>8}")
    for k in ("fp32", "int8"):
        r = report[k]
        print(f"{k:6} {r['heldout_v4']:>9} {r['heldout_v3']:>9} {r['heldout_v2']:>9}"
              f" {r['heldout_50']:>7} {r['tuning_60']:>8}"
              f" {r['demo_36']:>8} {r['ms_per_text']:>8}")
    for k in ("fp32", "int8"):
        for v in ("v4", "v3", "v2"):
            m = report[k]["confusion_" + v]
            print(f"{k} confusion on {v} (true \\ predicted POS, NEG): "
                  f"POS {m['POSITIVE']['POSITIVE']} {m['POSITIVE']['NEGATIVE']}; "
                  f"NEG {m['NEGATIVE']['POSITIVE']} {m['NEGATIVE']['NEGATIVE']}")


def _timed(runner, texts) -> float:
    t = time.perf_counter()
    runner.run(texts)
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
