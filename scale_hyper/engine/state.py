"""TrainState: what the loop owns and a checkpoint stores (besides DeepSpeed's own state)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken (applied or skipped)
    tokens_seen: int = 0  # over all ranks
    skipped: int = 0  # optimizer steps refused because their gradients were non-finite
    bad_in_row: int = 0  # consecutive refused steps; the watchdog stops the run at train.max_bad_steps
    val_before: Optional[Dict[str, float]] = None  # validation metrics before the first step
    # The loss of the current logging window, kept on the device so plain steps never wait for it.
    # [sum of finite losses, their count] of the window, on the device: plain steps never wait for it.
    loss_window: Optional[torch.Tensor] = field(default=None, repr=False)

    def add_loss(self, loss: torch.Tensor) -> None:
        """A micro-batch's loss; a non-finite one is left out of the mean (its step is refused)."""
        finite = torch.isfinite(loss.detach())
        pair = torch.stack([torch.where(finite, loss.detach(), 0.0).double(), finite.double()])
        self.loss_window = pair if self.loss_window is None else self.loss_window + pair

    def take_window(self, device: torch.device) -> torch.Tensor:
        """This rank's [loss sum, count] of the window, and a fresh window."""
        out = self.loss_window if self.loss_window is not None else torch.zeros(2, dtype=torch.float64, device=device)
        self.loss_window = None
        return out

    def to_dict(self) -> Dict[str, Any]:
        """The part a checkpoint stores (the open loss window is not: saves happen after logging)."""
        return {"step": self.step, "tokens_seen": self.tokens_seen, "skipped": self.skipped,
                "bad_in_row": self.bad_in_row, "val_before": self.val_before}  # fmt: skip

    @classmethod
    def from_dict(cls, saved: Dict[str, Any]) -> TrainState:
        return cls(
            step=int(saved.get("step", 0)),
            tokens_seen=int(saved.get("tokens_seen", 0)),
            skipped=int(saved.get("skipped", 0)),
            bad_in_row=int(saved.get("bad_in_row", 0)),
            val_before=saved.get("val_before"),
        )
