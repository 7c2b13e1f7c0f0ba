"""Train minilm's sentiment head: logistic regression on its pooled hidden states of the shipped training set.

    .venv/bin/python benchmarks/train_sentiment_head.py

Reads llmos/data/sentiment_train.tsv (LABEL<TAB>text) and nothing else. Features: blocks
`mean:K`/`max:K` (layer K's hidden states pooled over real tokens), each L2-normalised,
concatenated, standardised. The feature set and the inverse regularisation C are chosen by
stratified 5-fold cross-validation on the training set; the head is fitted on all of it with the
standardisation folded into its weights, and written to llmos/data/sentiment_head_minilm.json
(labels, blocks, coef and intercept per label, the CV table, the training file's sha256).
Deterministic.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from llmos.registry import Registry  # noqa: E402
from llmos.settings import Settings  # noqa: E402
from workers import model_cache  # noqa: E402
from workers.runners.sentiment import layer_features  # noqa: E402

DATA = ROOT / "llmos" / "data"
TRAIN = DATA / "sentiment_train.tsv"
OUT = DATA / "sentiment_head_minilm.json"
MEANS = tuple(f"mean:{k}" for k in range(1, 7))
BLOCK_SETS = (("mean:6",), ("mean:3", "mean:4"), ("mean:2", "mean:3", "mean:4", "mean:6"), MEANS,
              ("mean:3", "mean:4", "max:3", "max:4"), MEANS + ("max:3", "max:4"))
"""Candidate features (layers 1..6; `mean:6` is the sentence embedding `embed` returns)."""
C_GRID = (0.003, 0.01, 0.03, 0.1)


def main() -> None:
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rows = [line.split("\t") for line in TRAIN.read_text().splitlines() if line.strip()]
    y, texts = np.array([r[0] for r in rows]), [r[1] for r in rows]
    spec = Registry.load(Settings()).get("minilm").model_copy(update={"quantization": None})
    loaded = model_cache.load(spec, "cpu")
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=0)

    def pipeline(c: float):
        return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000))

    names = sorted({b for blocks in BLOCK_SETS for b in blocks})
    block = dict(zip(names, np.split(layer_features(loaded, texts, names, 32)[0].numpy().astype(np.float64),
                                     len(names), axis=1)))
    cv = {}
    for blocks in BLOCK_SETS:
        x = np.concatenate([block[b] for b in blocks], axis=1)
        for c in C_GRID:
            cv[(blocks, c)] = float(cross_val_score(pipeline(c), x, y, cv=folds).mean())
    blocks, c = max(cv, key=lambda k: (round(cv[k], 6), -len(k[0]), -k[1]))  # ties: simpler, stronger reg.
    x = np.concatenate([block[b] for b in blocks], axis=1)
    fit = pipeline(c).fit(x, y)
    scaler, lr = fit[0], fit[1]
    w = lr.coef_[0] / scaler.scale_
    b = float(lr.intercept_[0] - (w * scaler.mean_).sum())
    # Binary sklearn gives one row w for classes_[1]; rows ±w/2 make softmax equal its sigmoid.
    head = {
        "model": "minilm (all-MiniLM-L6-v2, fp32)",
        "features": "per block mean:K/max:K: layer K pooled over real tokens, L2-normalised; concatenated",
        "blocks": list(blocks),
        "labels": [str(k) for k in lr.classes_],
        "coef": [[round(float(v), 7) for v in -w / 2], [round(float(v), 7) for v in w / 2]],
        "intercept": [round(-b / 2, 7), round(b / 2, 7)],
        "C": c,
        "cv_accuracy": {f"{'+'.join(k[0])} C={k[1]}": round(a, 4) for k, a in cv.items()},
        "train_file": TRAIN.name,
        "train_sha256": hashlib.sha256(TRAIN.read_bytes()).hexdigest(),
        "train_counts": {str(k): int((y == k).sum()) for k in lr.classes_},
        "train_accuracy": round(float(fit.score(x, y)), 4),
    }
    OUT.write_text(json.dumps(head, indent=1) + "\n")
    print(json.dumps({k: v for k, v in head.items() if k not in ("coef", "intercept")}, indent=1))


if __name__ == "__main__":
    main()
