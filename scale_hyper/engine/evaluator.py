"""Validation during training: the masked-LM metrics of ``scale_hyper.models.mlm_metrics`` (the
ones `scale-hyper eval` reports) over this rank's share of the validation shards, summed over ranks."""

from __future__ import annotations

from typing import Any, Dict, Iterable

import torch
import torch.distributed as dist

from scale_hyper.models.mlm_metrics import masked_lm_metrics, masked_lm_totals


def to_device(batch: Dict[str, torch.Tensor], device: torch.device) -> Dict[str, torch.Tensor]:
    """Host batch → device, asynchronously (a no-op on CPU ranks)."""
    if device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class Evaluator:
    def __init__(self, engine: Any, batches: Iterable[Dict[str, torch.Tensor]], device: torch.device) -> None:
        self.engine, self.batches, self.device = engine, batches, device

    def evaluate(self) -> Dict[str, float]:
        """Collective: every rank evaluates its batches; the totals are all-reduced once."""
        self.engine.eval()
        totals = torch.zeros(3, dtype=torch.float64, device=self.device)
        with torch.no_grad():
            for batch in self.batches:
                batch = to_device(batch, self.device)
                logits = self.engine(**batch, sparse_logits=True).logits
                totals += masked_lm_totals(logits, batch["mlm_labels"])  # logits at batch["mlm_positions"]
        dist.all_reduce(totals)
        self.engine.train()
        metrics = masked_lm_metrics(totals, strict=False)
        metrics.pop("val_masked_tokens")
        return metrics
