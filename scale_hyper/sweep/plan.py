"""The dry run: every run with its state, tokens and estimated GPU-hours, and the totals.

GPU-hours come from ``scale-hyper plan`` (``engine/planner.py``): step time = FLOPs per token
(``models/flops.py``, the mixer's own formula) × tokens per step / (GPUs × the GPU's dense bf16 peak ×
MFU), for the spec's ``plan: {gpu, gpus, mfu}`` (default 8 × H100 SXM at MFU 0.40). Evaluations, GLUE
fine-tuning, data preparation and queueing are not counted.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Dict, List, Optional

from scale_hyper.sweep.expand import Run, _fmt
from scale_hyper.sweep.spec import Spec
from scale_hyper.sweep.state import Paths, status


def gpu_hours(spec: Spec, runs: List[Run]) -> Dict[str, Optional[float]]:
    from scale_hyper.engine import planner

    gpu = planner.gpu_of(str(spec.plan["gpu"]), None)
    gpus, mfu = int(spec.plan["gpus"]), float(spec.plan["mfu"])
    step_time: Dict[str, Optional[float]] = {}  # runs differing only in lr/seed/steps share one plan
    out: Dict[str, Optional[float]] = {}
    for r in runs:
        t = r.run.train
        key = repr((asdict(r.run.model), asdict(r.run.deepspeed), r.run.data.seq_len, r.run.data.mask_prob,
                    t.global_batch_size, t.micro_batch_size, t.activation_checkpointing, t.weight_decay))  # fmt: skip
        if key not in step_time:
            step_time[key] = planner.plan(r.run, gpus, gpu, mfu)["step_time_s"]
        s = step_time[key]
        out[r.name] = s * t.max_steps * gpus / 3600 if s else None
    return out


def render(spec: Spec, paths: Paths, runs: List[Run], state: Dict, jobs: Optional[Dict[str, str]]) -> str:
    hours = gpu_hours(spec, runs)
    axes = [k for k in spec.axes if k != "preset"]
    head = ["run", "kind", "mixer", *[k.rsplit(".", 1)[-1] for k in axes], "steps", "tokens", "GPU-h", "state"]
    rows = []
    for r in runs:
        h = hours[r.name]
        rows.append([r.name, r.kind, r.mixer, *[_fmt(r.axes.get(k, "")) for k in axes], f"{r.run.train.max_steps:,}",
                     f"{r.tokens:,}", "n/a" if h is None else f"{h:,.2f}", status(paths, state, r, "train", jobs)])  # fmt: skip
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)) for row in [head, *rows]]
    known = [h for h in hours.values() if h is not None]
    total_tokens = sum(r.tokens for r in runs)
    follow = [f for f in ("eval", "glue") if getattr(spec, f) is not None]
    counts: Dict[str, int] = {}
    for row in rows:
        counts[row[-1]] = counts.get(row[-1], 0) + 1
    from scale_hyper.engine.planner import gpu_of

    gpu = gpu_of(str(spec.plan["gpu"]), None)
    lines += [
        "",
        f"sweep {spec.name}: {len(runs)} runs ({', '.join(f'{n} {s}' for s, n in sorted(counts.items()))}), "
        f"{total_tokens:,} tokens in all; follow-ups per run: {', '.join(follow) or 'none'}",
        f"estimated {sum(known):,.1f} GPU-hours of training"
        + (f" ({len(hours) - len(known)} runs without an estimate: fp32)" if len(known) < len(hours) else "")
        + f", assuming {spec.plan['gpus']} × {gpu.name} per run (bf16 peak {gpu.bf16_tflops:g} TFLOP/s) at MFU "
        f"{float(spec.plan['mfu']):.2f} (`scale-hyper plan`: FLOPs/token from models/flops.py; evaluation, GLUE "
        "and queueing not counted)",
        f"output: {paths.out}  (runs/, eval/, logs/, report/, sweep-state.json)",
    ]
    return "\n".join(lines)
