"""Is a sweep's wall-clock a measurement of the mixers, or of the machine they ran on?

Runs of one mixer in one comparison group differ only in lr and seed, which do not change the work
per token; so their train time per token (each run's wall-clock at its last validation over its
tokens, ``report.curves``) should agree. Its spread across the mixer's runs (coefficient of
variation, std / mean) measures the clock's noise: a machine busy with other work, a slow node, a
throttled GPU. Above ``SPREAD_MAX`` the report marks the equal-wall-clock column and figure as
unreliable, with the spread, instead of comparing them. A dedicated machine repeats a run's speed
within a few per cent; at ±10 % the wall-clock differences between mixers that the column is for
(tens of per cent) are no longer clearly larger than the noise.
"""

from __future__ import annotations

from typing import Any, Dict, List

import numpy as np

SPREAD_MAX = 0.10


def seconds_per_token(row: Dict[str, Any]) -> float:
    c = row["curve"]
    return float(c["seconds"][-1]) / max(float(c["tokens"][-1]), 1.0)


def spreads(rows: List[Dict[str, Any]]) -> Dict[str, Dict[str, float]]:
    """mixer -> runs, mean/min/max seconds per token, and the coefficient of variation (NaN with one run)."""
    by_mixer: Dict[str, List[float]] = {}
    for row in rows:
        by_mixer.setdefault(row["run"].mixer, []).append(seconds_per_token(row))
    out = {}
    for mixer, values in by_mixer.items():
        a = np.asarray(values)
        cv = float(a.std(ddof=1) / a.mean()) if a.size > 1 and a.mean() > 0 else float("nan")
        out[mixer] = {"runs": float(a.size), "mean": float(a.mean()), "min": float(a.min()), "max": float(a.max()),
                      "cv": cv}  # fmt: skip
    return out


def noisy(spread: Dict[str, Dict[str, float]]) -> Dict[str, float]:
    """The mixers whose spread exceeds SPREAD_MAX (mixer -> coefficient of variation)."""
    return {m: s["cv"] for m, s in sorted(spread.items()) if s["cv"] == s["cv"] and s["cv"] > SPREAD_MAX}


def figure_note(rows: List[Dict[str, Any]]) -> str:
    """'' when the clock is quiet, else the title that marks the wall-clock figure unreliable."""
    loud = noisy(spreads(rows))
    if not loud:
        return ""
    each = ", ".join(f"{m} {percent(cv)}" for m, cv in loud.items())
    return f"UNRELIABLE: train time per token varies across runs\n{each} (limit {percent(SPREAD_MAX)})"


def percent(cv: float) -> str:
    return "–" if cv != cv else f"±{100 * cv:.2g} %"


def _speeds(s: Dict[str, float]) -> str:
    return f"{1 / s['max']:,.0f}–{1 / s['min']:,.0f} tokens/s"


def warning_lines(spread: Dict[str, Dict[str, float]]) -> List[str]:
    """The report's paragraph on the clock: the warning, or the spread that was found acceptable."""
    loud = noisy(spread)
    limit = percent(SPREAD_MAX)
    if loud:
        each = "; ".join(f"{m} {percent(cv)} over {int(spread[m]['runs'])} runs ({_speeds(spread[m])})"
                         for m, cv in loud.items())  # fmt: skip
        return [
            f"**Warning: the wall-clock figures measure the machine, not the mixers.** Train time per token "
            f"varied across a mixer's runs (which differ only in lr and seed) by more than {limit}: {each}. "
            "The equal-wall-clock column and figure are marked unreliable instead of compared; rerun on an "
            "otherwise idle machine to compare speed (equal tokens and equal FLOPs are unaffected).",
            "",
        ]
    measured = [s["cv"] for s in spread.values() if s["cv"] == s["cv"]]
    if not measured:
        return ["Clock spread not measured (one run per mixer): the wall-clock figures are single measurements.", ""]
    return [
        f"Train time per token varied across each mixer's runs by at most {percent(max(measured))} "
        f"(limit {limit}): the wall-clock comparison stands.",
        "",
    ]
