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
    """[loss sum, correct, n] of one batch. ``logits``: [n, V] at the masked positions (in label
    order), or [B, N, V] for every position; ``labels``: [B, N] with -100 where not masked."""
    targets = labels[labels != -100]
    if logits.dim() == 3:
        logits = logits[labels != -100]
    loss_sum = F.cross_entropy(logits.float(), targets, reduction="sum")
    correct = (logits.argmax(-1) == targets).sum()
    n = torch.tensor(targets.numel(), device=logits.device)
    return torch.stack([loss_sum.double(), correct.double(), n.double()])


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
