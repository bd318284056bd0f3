"""The batch split: ``train.global_batch_size`` is the invariant, ``train.micro_batch_size`` an upper bound.

Pure arithmetic in the lowest layer, so every verb that launches ranks (``train``'s DeepSpeed config,
``plan``, ``doctor``) applies the same rule and says the same thing when it cannot.
"""

from __future__ import annotations

from typing import Tuple

from scale_hyper.config.model import ConfigError


def split_batch(global_: int, bound: int, world_size: int) -> Tuple[int, int]:
    """(micro, accumulation) for ``global_`` sequences per step on ``world_size`` ranks: the largest micro
    batch ≤ ``bound`` that divides the per-rank share exactly (global = micro × accumulation × world).
    Raises ConfigError, naming the fix, when the world size does not divide the global batch."""
    if global_ % world_size:
        lower, upper = global_ // world_size * world_size, -(-global_ // world_size) * world_size
        example = f"{lower} or {upper}" if lower else f"{upper}"
        raise ConfigError(
            f"train.global_batch_size={global_} cannot be split evenly over {world_size} ranks — set "
            f"train.global_batch_size to a multiple of {world_size} (e.g. {example}), "
            f"or run on a world size that divides {global_}"
        )
    per_rank = global_ // world_size
    micro = max(m for m in range(1, min(bound, per_rank) + 1) if per_rank % m == 0)
    return micro, per_rank // micro


def global_batch(global_: int, bound: int, world_size: int) -> int:
    """``train.global_batch_size`` as a number of sequences (0 means bound × world)."""
    return global_ or bound * world_size
