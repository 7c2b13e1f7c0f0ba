"""minilm sentiment (its trained head): accuracy and speed, fp32 against dynamic int8, in one run.

    .venv/bin/python benchmarks/sentiment_quality.py [--repeat 5]

Prints a JSON object and tables. The headline is tests/data/sentiment_heldout_v5.tsv (300
sentences, nine domains, written independently of every other set for this round; no choice of
method or setting was made on it: benchmarks/train_sentiment_head.py never reads it). Also:
sentiment_heldout_v3/v4 (556, the dev set the trainer chose its settings on, then refitted on),
the demo's 36 reviews (tests/data/demo_reviews_labeled.tsv); confusion matrices on v5 and the
dev set; speed = ms per text through the runner at batch 32, best of N. `--zero-shot` measures
the zero-shot method (no head) for comparison. docs/models.md says which set was scored when.
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

SETS = {"heldout_v5": ["sentiment_heldout_v5.tsv"],
        "dev_v3_v4": ["sentiment_heldout_v3.tsv", "sentiment_heldout_v4.tsv"],
        "demo_36": ["demo_reviews_labeled.tsv"]}
CONFUSION = ("heldout_v5", "dev_v3_v4")
LABELS = ("POSITIVE", "NEGATIVE")


def rows(names: list[str]) -> list[tuple[str, str]]:
    lines = [line for name in names for line in (ROOT / "tests" / "data" / name).read_text().splitlines()]
    return [tuple(line.split("\t")) for line in lines if line.strip()]  # type: ignore[misc]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--zero-shot", action="store_true", help="without the trained head")
    ap.add_argument("--head", help="another head's JSON (e.g. an earlier one from git) instead of the shipped one")
    args = ap.parse_args()
    base = Registry.load(Settings()).get("minilm")
    if args.zero_shot:
        base = base.model_copy(update={"options": {}})
    elif args.head:
        base = base.model_copy(update={"options": {**base.options, "sentiment_head": str(Path(args.head).resolve())}})
    data = {k: rows(v) for k, v in SETS.items()}
    report: dict = {"method": "zero-shot" if args.zero_shot else "head", "head": args.head or "minilm"}
    for label, spec in [("fp32", base), ("int8", base.model_copy(update={"quantization": "int8"}))]:
        runner = runners_for(model_cache.load(spec, "cpu"))["sentiment"]
        r: dict = {}
        for name, items in data.items():
            out = [o.result["label"] for o in runner.run([SentimentTask(text=t) for _, t in items])]
            r[name] = round(sum(p == y for (y, _), p in zip(items, out)) / len(items), 3)
            if name in CONFUSION:  # rows: true label, columns: predicted
                r["confusion_" + name] = {y: {p: sum(1 for (t, _), o in zip(items, out) if t == y and o == p)
                                         for p in LABELS} for y in LABELS}
            if name == "demo_36":
                r["demo_wrong"] = [t for (y, t), p in zip(items, out) if p != y]
        texts = [SentimentTask(text=t) for _, t in data["dev_v3_v4"]][:32]
        runner.run(texts)  # warm-up
        best = min(_timed(runner, texts) for _ in range(args.repeat))
        r["ms_per_text"] = round(1000 * best / len(texts), 2)
        report[label] = r
    print(json.dumps(report))
    print(f"{'':6} {'v5 (300)':>9} {'dev (556)':>10} {'demo 36':>8} {'ms/text':>8}")
    for k in ("fp32", "int8"):
        r = report[k]
        print(f"{k:6} {r['heldout_v5']:>9} {r['dev_v3_v4']:>10} {r['demo_36']:>8} {r['ms_per_text']:>8}")
    for k in ("fp32", "int8"):
        for v in CONFUSION:
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
