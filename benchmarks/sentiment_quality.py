"""minilm zero-shot sentiment: accuracy and speed, fp32 against dynamic int8, in one run.

    .venv/bin/python benchmarks/sentiment_quality.py [--repeat 5]

Prints a JSON object and a table. Accuracy on tests/data/sentiment_heldout.tsv (50 sentences
never used to choose the label descriptions) and sentiment_labeled.tsv (60 sentences the
descriptions were chosen on); speed = sentences/s through the runner at batch 32, best of N.
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


def rows(name: str) -> list[tuple[str, str]]:
    lines = (ROOT / "tests" / "data" / name).read_text().splitlines()
    return [tuple(line.split("\t")) for line in lines if line.strip()]  # type: ignore[misc]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    base = Registry.load(Settings()).get("minilm")
    heldout, tuned = rows("sentiment_heldout.tsv"), rows("sentiment_labeled.tsv")
    report = {}
    for label, spec in [("fp32", base), ("int8", base.model_copy(update={"quantization": "int8"}))]:
        runner = runners_for(model_cache.load(spec, "cpu"))["sentiment"]
        acc = {}
        for name, data in [("heldout_50", heldout), ("tuning_60", tuned)]:
            out = runner.run([SentimentTask(text=t) for _, t in data])
            acc[name] = round(sum(o.result["label"] == y for (y, _), o in zip(data, out)) / len(data), 3)
        texts = [SentimentTask(text=t) for _, t in heldout + tuned][:32]
        runner.run(texts)  # warm-up
        best = min(_timed(runner, texts) for _ in range(args.repeat))
        report[label] = {**acc, "items_per_s": round(len(texts) / best, 1)}
    report["int8_speedup"] = round(report["int8"]["items_per_s"] / report["fp32"]["items_per_s"], 2)
    print(json.dumps(report))
    print(f"{'':6} {'heldout':>8} {'tuning':>8} {'items/s':>9}")
    for k in ("fp32", "int8"):
        r = report[k]
        print(f"{k:6} {r['heldout_50']:>8} {r['tuning_60']:>8} {r['items_per_s']:>9}")
    print(f"int8 / fp32 speed: {report['int8_speedup']}x")


def _timed(runner, texts) -> float:
    t = time.perf_counter()
    runner.run(texts)
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
