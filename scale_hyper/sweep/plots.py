"""The report's PNGs: each mixer at its selected lr (seed mean, min–max band) against tokens, training
FLOPs and wall-clock, and the lr sweep (final loss per lr, one dot per seed). The y-axis is fitted to
the part of the curves after the first quarter of the budget, so the differences between mixers fill
the axes rather than the first drop from the initial loss. Token and FLOP axes read 200k, 1.2M, 3T.
When the clock was noisy (``clock``), the wall-clock figure says so in a red title."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np

COLOURS = {"hyperbert": "tab:red", "bert": "tab:blue", "hypermixer": "tab:green", "hyla": "tab:purple"}


def _ylim(ax: Any, series: List[Tuple[np.ndarray, np.ndarray]]) -> None:
    tail = [y[x >= 0.25 * x.max()] for x, y in series if x.size and x.max() > 0]
    tail = [t for t in tail if t.size]
    if tail:
        lo, hi = min(float(t.min()) for t in tail), max(float(t.max()) for t in tail)
        pad = max(hi - lo, 1e-3) * 0.08
        ax.set_ylim(lo - pad, hi + pad)


def _band(rows: List[Dict[str, Any]], x: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Seed mean and min–max of the validation loss on a common grid of x (each run interpolated)."""
    end = min(float(r["curve"][x][-1]) for r in rows)
    grid = np.unique(np.concatenate([r["curve"][x][r["curve"][x] <= end] for r in rows]))
    ys = np.stack([np.interp(grid, r["curve"][x], r["curve"]["val_loss"]) for r in rows])
    return grid, ys.mean(axis=0), ys.min(axis=0), ys.max(axis=0)


def _save(fig: Any, ax: Any, xlabel: str, ylabel: str, path: Path) -> str:
    """Labels, grid and legend as every report figure has them; writes the PNG, returns its file name."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path.name


def si_formatter() -> Any:
    """Tick labels with SI prefixes and no space: 200000 -> 200k, 1200000 -> 1.2M."""
    from matplotlib.ticker import EngFormatter

    return EngFormatter(sep="")


def draw(rows: List[Dict[str, Any]], chosen: Dict[str, Any], out: Path, prefix: str, unreliable: str = "") -> List[str]:
    """The figures of one comparison group; ``unreliable``: the title that marks the wall-clock one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    for x, label in (("tokens", "tokens seen"), ("flops", "training FLOPs (models/flops.py)"),
                     ("seconds", "training wall-clock, s")):  # fmt: skip
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
        series = []
        for mixer, (lr, rs, _) in sorted(chosen.items()):
            grid, mean, lo, hi = _band(rs, x)
            colour = COLOURS.get(mixer)
            ax.plot(grid, mean, color=colour, label=f"{mixer} (lr {lr}, {len(rs)} seeds)", marker="o", markersize=3)
            if len(rs) > 1:
                ax.fill_between(grid, lo, hi, color=colour, alpha=0.18, linewidth=0)
            series.append((grid, hi))
            series.append((grid, lo))
        _ylim(ax, series)
        if x != "seconds":
            ax.xaxis.set_major_formatter(si_formatter())
        elif unreliable:
            ax.set_title(unreliable, color="tab:red", fontsize=8, fontweight="bold")
        names.append(
            _save(
                fig, ax, label, "validation MLM loss (seed mean, min–max band)", out / f"{prefix}_val_loss_vs_{x}.png"
            )
        )
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for row in rows:
        r = row["run"]
        ax.scatter(r.run.train.lr, row["final"], color=COLOURS.get(r.mixer), s=14, alpha=0.6)
    for mixer in sorted({row["run"].mixer for row in rows}):
        by_lr: Dict[float, List[float]] = {}
        for row in rows:
            if row["run"].mixer == mixer:
                by_lr.setdefault(row["run"].run.train.lr, []).append(row["final"])
        lrs = sorted(by_lr)
        ax.plot(lrs, [np.mean(by_lr[lr]) for lr in lrs], color=COLOURS.get(mixer), label=mixer, marker="s")
    ax.set_xscale("log")
    lr_plot = _save(
        fig, ax, "peak learning rate", "final validation MLM loss (dots: seeds)", out / f"{prefix}_lr_sweep.png"
    )
    return [*names, lr_plot]
