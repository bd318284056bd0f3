"""`scale-hyper report RUN_ID_OR_EXPERIMENT ... [tracking.uri=...] [--out DIR]`: figures and a table
from MLflow runs.

Each argument is a run id or an experiment name (all its runs). Writes, under ``--out``:
``val_loss_vs_tokens.png``, ``val_loss_vs_time.png`` (one line per run, one colour per mixer, runs of
one mixer told apart by line style) and
``report.md`` (mixer, parameters, tokens seen, final validation loss, mean tokens/s, GLUE average
when a ``glue`` evaluation logged ``glue_avg`` into the run). Tokens = step × global batch × seq_len
(global batch 0 means micro × world size); wall-clock = metric timestamp − run start.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

MIXER_COLOURS = {"hyperbert": "tab:red", "bert": "tab:blue", "hypermixer": "tab:green", "hyla": "tab:purple"}


def _int(params: Dict[str, str], key: str, default: int = 0) -> int:
    try:
        return int(float(params.get(key, default)))
    except (TypeError, ValueError):
        return default


def tokens_per_step(params: Dict[str, str]) -> int:
    batch = _int(params, "train.global_batch_size")
    if batch <= 0:
        batch = _int(params, "train.micro_batch_size") * max(1, _int(params, "world_size", 1))
    return batch * _int(params, "data.seq_len")


def parameter_count(params: Dict[str, str]) -> Optional[int]:
    """Total parameters of the MLM model the run trained, rebuilt (on the meta device) from its model.* params."""
    from dataclasses import fields

    from scale_hyper.models import ModelConfig, parameter_report

    values = {}
    for f in fields(ModelConfig):
        raw = params.get(f"model.{f.name}")
        if raw is None:
            continue
        default = getattr(ModelConfig, f.name)
        try:
            values[f.name] = (
                raw.lower() == "true"
                if isinstance(default, bool)
                else type(default)(float(raw) if isinstance(default, int) else raw)
            )
        except (TypeError, ValueError):
            values[f.name] = raw
    if "mixer" not in values:
        return None
    try:
        return parameter_report(ModelConfig(**values).validate())["total_params"]
    except Exception:
        return None


def collect(client, refs: Sequence[str]) -> List:
    runs, seen = [], set()
    for ref in refs:
        found = []
        try:
            found = [client.get_run(ref)]
        except Exception:
            exp = client.get_experiment_by_name(ref)
            if exp is None:
                raise ValueError(f"{ref!r} is neither a run id nor an experiment name in this store") from None
            found = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"], max_results=1000)
        for r in found:
            if r.info.run_id not in seen and r.data.tags.get("scale_hyper.kind") != "evaluation":
                seen.add(r.info.run_id)
                runs.append(r)
    return runs


def summarise(client, run) -> Dict[str, object]:
    params, metrics = run.data.params, run.data.metrics
    per_step = tokens_per_step(params)
    history = sorted(client.get_metric_history(run.info.run_id, "val_loss"), key=lambda m: (m.step, m.timestamp))
    speed = [m.value for m in client.get_metric_history(run.info.run_id, "tokens_per_s")]
    start = run.info.start_time
    return {
        "run_id": run.info.run_id,
        "name": run.info.run_name or run.info.run_id[:8],
        "mixer": params.get("model.mixer", "?"),
        "params": parameter_count(params),
        "steps": max((m.step for m in history), default=0),
        "tokens": [m.step * per_step for m in history],
        "seconds": [(m.timestamp - start) / 1000.0 for m in history],
        "val_loss": [m.value for m in history],
        "tokens_per_s": statistics.fmean(speed) if speed else None,
        "glue_avg": metrics.get("glue_avg"),
    }


LINESTYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v")


def plot(rows: List[Dict[str, object]], out: Path) -> List[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for x_key, x_label, name in (("tokens", "tokens seen", "val_loss_vs_tokens.png"),
                                 ("seconds", "wall-clock (s since run start)", "val_loss_vs_time.png")):  # fmt: skip
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
        seen_of_mixer: Dict[object, int] = {}
        for r in rows:
            if r["val_loss"]:
                # colour = mixer; several runs of one mixer are told apart by line style and marker
                k = seen_of_mixer[r["mixer"]] = seen_of_mixer.get(r["mixer"], -1) + 1
                ax.plot(r[x_key], r["val_loss"], color=MIXER_COLOURS.get(r["mixer"]), label=f"{r['mixer']}: {r['name']}",
                        linestyle=LINESTYLES[k % len(LINESTYLES)], marker=MARKERS[k % len(MARKERS)], markersize=3)  # fmt: skip
        ax.set_xlabel(x_label)
        ax.set_ylabel("validation MLM loss")
        ax.grid(alpha=0.3)
        if rows:
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / name
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def table(rows: List[Dict[str, object]]) -> str:
    def fmt(v, spec):
        return "–" if v is None else format(v, spec)

    lines = ["| run | mixer | params | tokens | steps | final val loss | tokens/s | GLUE avg |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        final = r["val_loss"][-1] if r["val_loss"] else None
        tokens = r["tokens"][-1] if r["tokens"] else None
        glue = 100 * r["glue_avg"] if r["glue_avg"] is not None else None
        lines.append(f"| {r['name']} | {r['mixer']} | {fmt(r['params'], ',')} | {fmt(tokens, ',')} | {r['steps']} | "
                     f"{fmt(final, '.4f')} | {fmt(r['tokens_per_s'], ',.0f')} | {fmt(glue, '.1f')} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def build(refs: Sequence[str], uri: str, out: Path) -> Dict[str, object]:
    from mlflow import MlflowClient

    from scale_hyper.tracking import resolve_tracking_uri

    resolved, _, _ = resolve_tracking_uri(uri)
    client = MlflowClient(tracking_uri=resolved)
    rows = [summarise(client, r) for r in collect(client, refs)]
    if not rows:
        raise ValueError(f"no training runs found for {list(refs)}")
    out.mkdir(parents=True, exist_ok=True)
    figures = plot(rows, out)
    md = table(rows)
    (out / "report.md").write_text(
        "# scale-hyper report\n\n" + md + "\n" + "".join(f"![{p.stem}]({p.name})\n" for p in figures)
    )
    return {"rows": rows, "figures": figures, "table": md, "out": out}


def main(refs: Sequence[str], args: Sequence[str], out: Optional[str]) -> int:
    from scale_hyper.config import load_config

    run = load_config(list(args))
    try:
        res = build(refs, run.tracking.uri, Path(out or "report"))
    except ValueError as err:
        print(f"scale-hyper: error: report: {err}", file=sys.stderr)
        return 2
    except ImportError as err:
        print(f"scale-hyper: report needs matplotlib ({err}): pip install 'scale-hyper[test]' or pip install matplotlib",
              file=sys.stderr)  # fmt: skip
        return 2
    print(res["table"], end="")
    print("written: " + ", ".join(str(p) for p in [res["out"] / "report.md", *res["figures"]]))
    return 0
