"""Seed statistics and the paired test over validation batches, in numpy (no scipy dependency).

The paired test compares two mixers on the SAME validation batches (fixed masks): for each batch b,
d_b = mean over seeds of mixer A's loss on b − the same for mixer B. Under "no difference" each d_b
is as likely to be positive as negative, so flipping signs at random gives the null distribution of
the mean difference (an exact sign-flip permutation test, Monte Carlo with a fixed seed for many
batches). The paired t statistic is given beside it. This measures whether the difference exceeds
the noise of the validation sample; whether it exceeds seed-to-seed noise is the separate comparison
of the difference of means with the seeds' spread (``seed_noise``), descriptive only below 5 seeds.
"""

from __future__ import annotations

import math
from typing import Dict, List, Sequence

import numpy as np

MIN_SEEDS_FOR_INFERENCE = 5


def describe(values: Sequence[float]) -> Dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {"n": float(a.size), "mean": float(a.mean()), "std": float(a.std(ddof=1)) if a.size > 1 else float("nan"),
            "min": float(a.min()), "max": float(a.max())}  # fmt: skip


def paired_test(a: np.ndarray, b: np.ndarray, draws: int = 20000, seed: int = 0) -> Dict[str, float]:
    """a, b: per-batch losses (same batches, same order). Two-sided p of mean(a − b) = 0."""
    if a.shape != b.shape or a.size < 2:
        raise ValueError(f"paired test needs equal-length batch lists of >= 2 batches, got {a.shape} and {b.shape}")
    d = a - b
    n, mean = d.size, float(d.mean())
    sd = float(d.std(ddof=1))
    t = mean / (sd / math.sqrt(n)) if sd > 0 else math.copysign(math.inf, mean) if mean else 0.0
    if n <= 16:  # exact: every sign pattern
        signs = np.array(np.meshgrid(*[[-1.0, 1.0]] * n)).reshape(n, -1).T
    else:
        signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=(draws, n))
    null = np.abs((signs * d).mean(axis=1))
    p = float((np.sum(null >= abs(mean) - 1e-15) + (0 if n <= 16 else 1)) / (len(null) + (0 if n <= 16 else 1)))
    return {"batches": float(n), "mean_diff": mean, "sd_diff": sd, "t": t, "p_sign_flip": p,
            "a_better_batches": float(np.sum(d < 0))}  # fmt: skip


def seed_noise(a: Sequence[float], b: Sequence[float]) -> Dict[str, float]:
    """Difference of seed means against the seeds' own spread (Welch's standard error)."""
    da, db = describe(a), describe(b)
    se = math.sqrt(da["std"] ** 2 / da["n"] + db["std"] ** 2 / db["n"]) if min(da["n"], db["n"]) > 1 else float("nan")
    diff = da["mean"] - db["mean"]
    return {"diff": diff, "se": se, "ratio": abs(diff) / se if se and se == se else float("nan"),
            "seeds": min(da["n"], db["n"]), "inferential": float(min(da["n"], db["n"]) >= MIN_SEEDS_FOR_INFERENCE)}  # fmt: skip


def batch_losses(per_batch: Dict) -> np.ndarray:
    """Mean loss of each batch from an eval --per-batch JSON."""
    return np.asarray([b["loss_sum"] / b["masked_tokens"] for b in per_batch["batches"]], dtype=np.float64)


def mean_over_seeds(arrays: List[np.ndarray]) -> np.ndarray:
    return np.mean(np.stack(arrays), axis=0)
