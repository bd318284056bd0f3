"""GLUE metrics, written out (no scikit-learn / scipy dependency), each returning a float.

* ``accuracy``: fraction of equal labels.
* ``f1``: F1 of the positive class (``positive=1``), 0.0 when there is no true or predicted positive.
* ``mcc``: Matthews correlation (binary or multi-class, Gorodkin's R_K); 0.0 when undefined.
* ``pearson``: linear correlation; ``spearman``: Pearson of the average ranks (ties share a rank).
  Both are 0.0 when one side is constant (undefined), so a collapsed regressor scores 0.
"""

from __future__ import annotations

import math
from typing import Dict, List, Sequence


def _check(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"predictions and labels differ in length ({len(a)} vs {len(b)})")
    if not len(a):
        raise ValueError("no predictions to score")


def accuracy(preds: Sequence, labels: Sequence) -> float:
    _check(preds, labels)
    return sum(int(p == y) for p, y in zip(preds, labels, strict=True)) / len(labels)


def f1(preds: Sequence[int], labels: Sequence[int], positive: int = 1) -> float:
    _check(preds, labels)
    tp = sum(1 for p, y in zip(preds, labels, strict=True) if p == positive and y == positive)
    fp = sum(1 for p, y in zip(preds, labels, strict=True) if p == positive and y != positive)
    fn = sum(1 for p, y in zip(preds, labels, strict=True) if p != positive and y == positive)
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def mcc(preds: Sequence[int], labels: Sequence[int]) -> float:
    """Matthews correlation from the confusion matrix (multi-class form; equals the binary one)."""
    _check(preds, labels)
    classes = sorted(set(preds) | set(labels))
    n = len(labels)
    correct = sum(1 for p, y in zip(preds, labels, strict=True) if p == y)
    pred_count = {c: 0 for c in classes}
    true_count = {c: 0 for c in classes}
    for p, y in zip(preds, labels, strict=True):
        pred_count[p] += 1
        true_count[y] += 1
    cov_xy = correct * n - sum(pred_count[c] * true_count[c] for c in classes)
    cov_xx = n * n - sum(v * v for v in pred_count.values())
    cov_yy = n * n - sum(v * v for v in true_count.values())
    if cov_xx == 0 or cov_yy == 0:
        return 0.0
    return cov_xy / math.sqrt(cov_xx * cov_yy)


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    _check(x, y)
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    if sxx == 0 or syy == 0:
        return 0.0
    return sxy / math.sqrt(sxx * syy)


def ranks(values: Sequence[float]) -> List[float]:
    """1-based ranks; tied values get the mean of the ranks they span."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        mean_rank = (i + j) / 2 + 1
        for k in range(i, j + 1):
            out[order[k]] = mean_rank
        i = j + 1
    return out


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    _check(x, y)
    return pearson(ranks(x), ranks(y))


METRICS = {"accuracy": accuracy, "f1": f1, "mcc": mcc, "pearson": pearson, "spearman": spearman}


def compute(names: Sequence[str], preds: Sequence, labels: Sequence) -> Dict[str, float]:
    return {name: float(METRICS[name](preds, labels)) for name in names}
