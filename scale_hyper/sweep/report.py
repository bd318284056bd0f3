"""The sweep's report: ``OUT/report/report.md`` and its PNGs, from the run directories alone.

Per comparison group (runs that differ only in preset/mixer, lr and seed): every lr of every mixer
(mean ± std and min–max over seeds); the best lr per mixer, chosen by the lowest seed-mean final
validation loss — on the same validation batches that are reported, which the report says; the
comparison at equal tokens, at equal training FLOPs (``models/flops.py``) and at equal wall-clock
(interpolated on each run's validation curve); the GLUE average where ``glue`` ran; and for each
baseline against HyperBERT the seed spread of the difference and the paired test over validation
batches (``stats``). Transplant runs get their own table. Curves come from ``RUN/metrics.jsonl``;
wall-clock is the sum of each logging window's tokens / tokens-per-second (setup excluded,
evaluations and saves inside the windows included). Where the train time per token of a mixer's
runs spreads by more than ``clock.SPREAD_MAX``, the wall-clock column and figure are marked
unreliable, with the spread, instead of compared.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np

from scale_hyper.sweep import clock, stats
from scale_hyper.sweep.expand import Run, _fmt
from scale_hyper.sweep.spec import Spec
from scale_hyper.sweep.state import Paths, train_done

REFERENCE = "hyperbert"


def curves(run: Run, run_dir: Path) -> Dict[str, np.ndarray]:
    """steps, tokens, FLOPs, seconds and val_loss at each validation of a run (last record per step wins)."""
    from scale_hyper.models.flops import train_flops_per_token

    val: Dict[int, float] = {}
    windows: Dict[int, Tuple[float, float]] = {}  # step -> (tokens_seen, tokens_per_s)
    path = run_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        rec = json.loads(line)
        if "val_loss" in rec:
            val[int(rec["step"])] = float(rec["val_loss"])
        if rec.get("tokens_per_s"):
            windows[int(rec["step"])] = (float(rec["tokens_seen"]), float(rec["tokens_per_s"]))
    per_step = run.run.train.global_batch_size * run.run.data.seq_len
    log_steps, secs, seen, t = [0], [0.0], 0.0, 0.0
    for step in sorted(windows):
        tokens, speed = windows[step]
        t += max(tokens - seen, 0.0) / speed
        seen = tokens
        log_steps.append(step)
        secs.append(t)
    steps = np.asarray(sorted(val), dtype=np.float64)
    fpt = train_flops_per_token(run.run.model, run.run.data.seq_len, run.run.data.mask_prob)
    return {"steps": steps, "tokens": steps * per_step, "flops": steps * per_step * fpt,
            "seconds": np.interp(steps, log_steps, secs), "val_loss": np.asarray([val[s] for s in sorted(val)])}  # fmt: skip


def collect(spec: Spec, paths: Paths, runs: List[Run]) -> List[Dict[str, Any]]:
    from scale_hyper.models import parameter_report

    rows = []
    for r in runs:
        run_dir = paths.run_dir(r.name)
        if not train_done(r, run_dir):
            continue
        c = curves(r, run_dir)
        if not c["val_loss"].size:
            continue
        ev = paths.eval_json(r.name)
        per_batch = json.loads(ev.read_text()) if ev.is_file() else None
        glue = paths.glue_dir(r.name) / "results.json"
        rows.append({"run": r, "curve": c, "final": float(c["val_loss"][-1]), "per_batch": per_batch,
                     "eval_loss": per_batch["metrics"]["val_loss"] if per_batch else None,
                     "glue": json.loads(glue.read_text()).get("glue_avg") if glue.is_file() else None,
                     "params": parameter_report(r.run.model)["total_params"]})  # fmt: skip
    return rows


def _ms(values: List[float], spec: str = ".4f") -> str:
    d = stats.describe(values)
    sd = "" if d["n"] < 2 else f" ± {d['std']:{spec}}"
    return f"{d['mean']:{spec}}{sd}"


def _range(values: List[float]) -> str:
    return f"{min(values):.4f}–{max(values):.4f}"


def at(rows: List[Dict[str, Any]], x: str, value: float) -> List[float]:
    """Each run's validation loss interpolated at x = value (tokens, flops or seconds)."""
    return [float(np.interp(value, r["curve"][x], r["curve"]["val_loss"])) for r in rows]


def best_lr(rows: List[Dict[str, Any]]) -> Dict[str, Tuple[str, List[Dict[str, Any]], List[str]]]:
    """mixer -> (best lr, its runs, lr table lines)."""
    by_mixer: Dict[str, Dict[str, List[Dict[str, Any]]]] = {}
    for row in rows:
        lr = _fmt(row["run"].run.train.lr)
        by_mixer.setdefault(row["run"].mixer, {}).setdefault(lr, []).append(row)
    out = {}
    for mixer, lrs in by_mixer.items():
        best = min(lrs, key=lambda lr: float(np.mean([r["final"] for r in lrs[lr]])))
        lines = [f"| {mixer} | {lr} | {len(rs)} | {_ms([r['final'] for r in rs])} | {_range([r['final'] for r in rs])} "
                 f"| {'**selected**' if lr == best else ''} |" for lr, rs in sorted(lrs.items(), key=lambda kv: float(kv[0]))]  # fmt: skip
        out[mixer] = (best, lrs[best], lines)
    return out


def _grid_ends(lines: List[str]) -> Tuple[str, str]:
    """The smallest and largest lr of a mixer's table lines (sorted by lr; the lr is the second cell)."""
    lrs = [line.split("|")[2].strip() for line in lines]
    return lrs[0], lrs[-1]


def group_section(name: str, rows: List[Dict[str, Any]], figures: List[str]) -> List[str]:
    chosen = best_lr(rows)
    spread = clock.spreads(rows)
    loud = clock.noisy(spread)
    md = [f"## Comparison: {name}" if name else "## Comparison", "",
          "Final validation MLM loss (training's own validation at the last step, the same batches for every run):", "",
          "| mixer | lr | seeds | mean ± std | min–max | |", "|---|---:|---:|---:|---:|---|"]  # fmt: skip
    for _, _, lines in chosen.values():
        md += lines
    seeds = min(len(v[1]) for v in chosen.values())
    md += ["", "**lr selection:** per mixer, the lr with the lowest seed-mean final validation loss; selected on the "
           "same validation batches reported below (no separate selection split), which favours every mixer alike. "
           + (f"**{seeds} seeds: the seed statistics below are descriptive only** (≥ {stats.MIN_SEEDS_FOR_INFERENCE} "
              "seeds for a statement about seed noise)." if seeds < stats.MIN_SEEDS_FOR_INFERENCE else
              f"{seeds} seeds per mixer."), ""]  # fmt: skip
    edge = [f"{m} ({lr})" for m, (lr, _, lines) in chosen.items() if len(lines) > 1 and lr in _grid_ends(lines)]
    if edge:  # the optimum may lie beyond the grid: the comparison then understates that mixer
        md += [
            f"**Warning: the selected lr is at the edge of its grid for {', '.join(edge)}** — the best lr may lie "
            "outside the grid; extend `train.lr` in the spec (finished runs are reused) before concluding.",
            "",
        ]
    md += clock.warning_lines(spread)
    best_rows = {m: v[1] for m, v in chosen.items()}
    ends = {
        x: min(float(r["curve"][x][-1]) for rs in best_rows.values() for r in rs)
        for x in ("tokens", "flops", "seconds")
    }
    budget = "the smallest budget any mixer reached; losses interpolated on each run's curve"
    md += [f"Each mixer at its selected lr. Equal FLOPs = {ends['flops']:.3g} training FLOPs"
           + (f" ({budget}); equal wall-clock is not compared: the clock spread is above the limit (see the warning):"
              if loud else f", equal wall-clock = {ends['seconds']:.0f} s ({budget}):"), "",
           "| mixer | params | lr | seeds | tokens | val loss (equal tokens) | min–max | eval loss (per-batch run) "
           "| val loss at equal FLOPs | at equal wall-clock | train s | clock spread | GLUE avg |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for mixer, rs in sorted(best_rows.items()):
        finals = [r["final"] for r in rs]
        evals = [r["eval_loss"] for r in rs if r["eval_loss"] is not None]
        glue = [100 * r["glue"] for r in rs if r["glue"] is not None]
        at_wall = (
            f"unreliable ({clock.percent(spread[mixer]['cv'])})" if loud else _ms(at(rs, "seconds", ends["seconds"]))
        )
        md.append(f"| {mixer} | {rs[0]['params']:,} | {chosen[mixer][0]} | {len(rs)} | {int(rs[0]['curve']['tokens'][-1]):,} "
                  f"| {_ms(finals)} | {_range(finals)} | {_ms(evals) if evals else '–'} "
                  f"| {_ms(at(rs, 'flops', ends['flops']))} | {at_wall} "
                  f"| {_ms([float(r['curve']['seconds'][-1]) for r in rs], '.0f')} "
                  f"| {clock.percent(spread[mixer]['cv'])} | {_ms(glue, '.1f') if glue else '–'} |")  # fmt: skip
    if REFERENCE in best_rows:
        md += ["", *difference_lines(best_rows)]
    md += ["", *[f"![{f}]({f})" for f in figures], ""]
    return md


def difference_lines(best: Dict[str, List[Dict[str, Any]]]) -> List[str]:
    ref = best[REFERENCE]
    md = [f"Is the {REFERENCE}-vs-baseline difference larger than the noise? (Δ = {REFERENCE} − baseline; < 0: "
          f"{REFERENCE} better)", "",
          "| baseline | Δ val loss (seed means) | seed SE (Welch) | \\|Δ\\| / SE | paired test over validation batches |",
          "|---|---:|---:|---:|---|"]  # fmt: skip
    for mixer, rs in sorted(best.items()):
        if mixer == REFERENCE:
            continue
        noise = stats.seed_noise([r["final"] for r in ref], [r["final"] for r in rs])
        verdict = (" (descriptive)" if not noise["inferential"] else
                   " (beyond seed noise)" if noise["ratio"] > 2 else " (within seed noise)")  # fmt: skip
        md.append(f"| {mixer} | {noise['diff']:+.4f} | {noise['se']:.4f} | {noise['ratio']:.1f}{verdict} "
                  f"| {paired(ref, rs)} |")  # fmt: skip
    md += ["", "The paired test compares the seed-mean loss of each validation batch (the same batches and masks "
           "for every run, from `scale-hyper eval --per-batch`): a sign-flip permutation test of the mean batch "
           "difference (and the paired t). It says whether the difference exceeds the noise of the validation "
           "sample; the |Δ|/SE column compares it with the seed-to-seed spread."]  # fmt: skip
    return md


def paired(a: List[Dict[str, Any]], b: List[Dict[str, Any]]) -> str:
    pa, pb = [r["per_batch"] for r in a if r["per_batch"]], [r["per_batch"] for r in b if r["per_batch"]]
    if not pa or not pb:
        return "– (no per-batch evaluation: add follow_ups.eval)"
    keys = {(p["data"], p["micro_batch_size"], len(p["batches"])) for p in pa + pb}
    if len(keys) > 1:
        return f"– (runs evaluated on different batches: {sorted(keys)})"
    res = stats.paired_test(stats.mean_over_seeds([stats.batch_losses(p) for p in pa]),
                            stats.mean_over_seeds([stats.batch_losses(p) for p in pb]))  # fmt: skip
    return (f"mean Δ {res['mean_diff']:+.4f} over {int(res['batches'])} batches ({int(res['a_better_batches'])} favour "
            f"{REFERENCE}), t = {res['t']:.2f}, sign-flip p = {res['p_sign_flip']:.3g}")  # fmt: skip


def transplant_section(rows: List[Dict[str, Any]]) -> List[str]:
    derived = [r for r in rows if r["run"].kind != "train"]
    if not derived:
        return []
    table: Dict[Tuple[str, str, str], List[float]] = {}
    for r in derived:
        key = (r["run"].mixer, r["run"].kind, str(r["run"].layers))
        table.setdefault(key, []).append(r["final"])
    md = ["## Transplant and its controls", "", "| mixer | kind | layers | runs | final val loss mean ± std | min–max |",
          "|---|---|---:|---:|---:|---:|"]  # fmt: skip
    md += [f"| {m} | {k} | {L} | {len(v)} | {_ms(v)} | {_range(v)} |" for (m, k, L), v in sorted(table.items())]
    return md + ["", "transplant: the trained source made deeper and trained on; continued: the source at its own depth "
                 "trained on for the same steps; scratch: the deep model trained from scratch for the source's and "
                 "the continuation's steps together.", ""]  # fmt: skip


def write(spec: Spec, paths: Paths, runs: List[Run]) -> Path:
    from scale_hyper.sweep import plots

    rows = collect(spec, paths, runs)
    out = paths.report
    out.mkdir(parents=True, exist_ok=True)
    md = [f"# Sweep {spec.name}", "", f"Spec `{spec.path}`; {len(rows)} of {len(runs)} runs finished "
          f"(`scale-hyper sweep {spec.path} --status` lists the rest).", ""]  # fmt: skip
    groups: Dict[Tuple[Tuple[str, str], ...], List[Dict[str, Any]]] = {}
    for row in rows:
        if row["run"].kind == "train":
            groups.setdefault(row["run"].group, []).append(row)
    for n, (group, grows) in enumerate(sorted(groups.items())):
        label = ", ".join(f"{k}={v}" for k, v in group)
        figures = plots.draw(grows, best_lr(grows), out, f"g{n}", unreliable=clock.figure_note(grows))
        md += group_section(label, grows, figures)
    md += transplant_section(rows)
    path = out / "report.md"
    path.write_text("\n".join(md) + "\n")
    return path
