"""The masked-LM validation metrics: one implementation for training's evaluations and
`scale-hyper eval`, under one set of names (val_loss, val_accuracy, val_perplexity).

Totals accumulate on the device ([loss sum, correct, masked tokens] in float64), so a caller can
all-reduce them across ranks before anything is read back to the host.
"""

from __future__ import annotations

import math
from typing import Dict

import torch
import torch.nn.functional as F


def masked_lm_totals(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[loss sum, correct, n] of one batch. ``logits`` [K, V] with ``labels`` [K] (-100 = padding: the
    model's ``mlm_positions`` output with the loader's ``mlm_labels``; no host sync); or ``logits``
    [B, N, V] for every position, or [n, V] in ``labels[labels != -100]`` order, with ``labels`` [B, N]."""
    if labels.dim() > 1:  # a label grid: pick its masked positions (boolean indexing: one host sync)
        selected = labels != -100
        logits = logits[selected] if logits.dim() == 3 else logits
        labels = labels[selected]
    valid = labels != -100
    loss_sum = F.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="sum")
    correct = ((logits.argmax(-1) == labels) & valid).sum()
    return torch.stack([loss_sum.double(), correct.double(), valid.sum().double()])


def masked_lm_metrics(totals: torch.Tensor, strict: bool = True) -> Dict[str, float]:
    """Mean cross-entropy over the masked tokens, its exp, and top-1 accuracy (NaN for no tokens
    unless ``strict``, which raises)."""
    loss_sum, correct, n = totals.tolist()
    if n == 0:
        if strict:
            raise ValueError("no masked tokens to evaluate (empty validation split?)")
        n, loss_sum, correct = float("nan"), float("nan"), float("nan")
    loss = loss_sum / n
    return {"val_loss": loss, "val_accuracy": correct / n, "val_perplexity": math.exp(min(loss, 700.0)),
            "val_masked_tokens": n}  # fmt: skip
