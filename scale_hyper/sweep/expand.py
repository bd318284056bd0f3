"""A spec → the runs it means, each with a stable name and a resolved config, checked as a whole.

Names come from the axis values only (``hyperbert-tiny_lr0.002_s1``, or the spec's ``run_name``
template), so the same spec always names the same run directories: that is what lets a re-run skip
finished runs and resume interrupted ones. Every run's config is resolved here (presets, the spec's
``common``, per-preset overrides, axis values, the budget) and the grid is refused before anything
runs when two runs share a name, when it exceeds ``--max-runs``, or when runs meant to be compared —
the same values of every axis except preset, lr and seed — differ in their data or token budget.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from scale_hyper.config import RunConfig, load_config
from scale_hyper.sweep.spec import Spec, SweepError, fail

# Axes whose values are compared within one group; any other axis starts a group of its own.
COMPARED = ("preset", "model.mixer", "train.lr", "train.seed")
SHORT = {"train.lr": "lr", "train.seed": "s", "train.max_steps": "steps", "model.num_layers": "L"}
# Loader knobs: they change how data is read, not which data a run sees.
DATA_NEUTRAL = {"num_workers", "prepare_workers", "shuffle_buffer", "on_corrupt", "allow_pipe"}


@dataclass
class Run:
    name: str
    kind: str  # train | transplant | continued | scratch
    configs: List[str]  # the preset and the spec's configs
    overrides: List[str]  # key=value, the run's own (no output_dir / tracking keys)
    axes: Dict[str, Any]  # axis -> value (preset included)
    group: Tuple[Tuple[str, str], ...]  # the other axes' values: runs of one group are compared
    run: RunConfig  # resolved (for planning and checks; the job resolves it again)
    source: Optional[str] = None  # transplant/controls: the name of the trained source run
    layers: Optional[int] = None  # transplant/scratch: the new depth
    needs: List[str] = field(default_factory=list)  # names of runs that must finish first

    @property
    def mixer(self) -> str:
        return self.run.model.mixer

    @property
    def tokens(self) -> int:
        return self.run.train.max_steps * self.run.train.global_batch_size * self.run.data.seq_len


def _fmt(value: Any) -> str:
    return format(value, "g") if isinstance(value, float) else str(value)


def _kv(key: str, value: Any) -> str:
    if isinstance(value, (list, dict)):
        import json

        return f"{key}={json.dumps(value)}"
    return f"{key}={_fmt(value)}"


def run_name(spec: Spec, axes: Dict[str, Any]) -> str:
    if spec.run_name:
        try:
            name = spec.run_name.format(**{k.replace(".", "_"): _fmt(v) for k, v in axes.items()})
        except (KeyError, IndexError, ValueError) as err:
            raise fail(spec.path, f"run_name {spec.run_name!r} cannot be filled ({err})",
                       "use {preset}, {train_lr}, {train_seed}: the axis names with '.' written as '_'") from None  # fmt: skip
    else:
        preset = Path(axes["preset"]).stem
        parts = [preset] + [f"{SHORT.get(k, k.rsplit('.', 1)[-1])}{_fmt(v)}" for k, v in axes.items() if k != "preset"]
        name = "_".join(parts)
    return re.sub(r"[^A-Za-z0-9._-]", "-", name)


def _grid(spec: Spec) -> List[Dict[str, Any]]:
    combos = []
    for preset in spec.presets:
        lists = [[("preset", preset)]]
        for key, values in spec.axes.items():
            if key != "preset":
                vals = values[preset] if isinstance(values, dict) else values
                lists.append([(key, v) for v in vals])
        combos += [dict(c) for c in itertools.product(*lists)]
    return combos


def _resolve(spec: Spec, configs: List[str], overrides: List[str], extra: Sequence[str], name: str) -> RunConfig:
    try:
        return load_config([*configs, *overrides, *extra])
    except SweepError:
        raise
    except Exception as err:
        if getattr(type(err), "user_error", False):
            raise SweepError(f"{spec.path}: run {name}: {err}") from None
        raise


def _budget(spec: Spec, run: RunConfig, name: str) -> List[str]:
    per_step = run.train.global_batch_size * run.data.seq_len
    steps = spec.budget["tokens"] // per_step if per_step else 0
    if steps < 1:
        raise fail(spec.path, f"run {name}: budget.tokens={spec.budget['tokens']:,} is less than one step "
                   f"({per_step:,} tokens)", "raise budget.tokens")  # fmt: skip
    return [f"train.max_steps={steps}"]


def expand(spec: Spec, extra: Sequence[str] = (), max_runs: Optional[int] = None) -> List[Run]:
    """Every run of the spec, in a stable order, resolved and checked (``SweepError`` otherwise)."""
    runs: List[Run] = []
    for axes in _grid(spec):
        preset = axes["preset"]
        overrides = [_kv(k, v) for k, v in spec.common.items()]
        overrides += [_kv(k, v) for k, v in spec.preset_overrides.get(preset, {}).items()]
        overrides += [_kv(k, v) for k, v in axes.items() if k != "preset"]
        name = run_name(spec, axes)
        configs = [preset, *spec.configs]
        if "tokens" in spec.budget:  # steps from the run's own tokens per step
            overrides += _budget(spec, _resolve(spec, configs, overrides, extra, name), name)
        elif spec.budget:
            overrides.append(f"train.max_steps={spec.budget['steps']}")
        resolved = _resolve(spec, configs, overrides, extra, name)
        group = tuple((k, _fmt(v)) for k, v in axes.items() if k not in COMPARED)
        runs.append(Run(name, "train", configs, overrides, axes, group, resolved))
    if spec.transplant:
        runs += _transplants(spec, runs, extra)
    check(spec, runs, max_runs)
    return runs


def _transplants(spec: Spec, base: List[Run], extra: Sequence[str]) -> List[Run]:
    t = spec.transplant
    assert t is not None
    out: List[Run] = []
    for src in base:
        if t.presets and src.axes["preset"] not in t.presets:
            continue
        if any(_fmt(src.axes.get(k)) not in {_fmt(v) for v in vals} for k, vals in t.where.items()):
            continue
        src_layers, steps = src.run.model.num_layers, t.steps or src.run.train.max_steps
        sharing = [] if src.mixer == "hyperbert" else [f"model.share_mixers={src_layers}"]
        cont = [o for o in src.overrides if not o.startswith("train.max_steps=")] + [f"train.max_steps={steps}"]
        variants: List[Tuple[str, str, Optional[int], List[str]]] = []
        for layers in t.layers:
            init = spec.output / "transplant" / f"{src.name}-L{layers}"
            # model.* for the plan only in effect: init_from adopts the transplanted geometry anyway
            variants.append((f"{src.name}-L{layers}", "transplant", layers,
                             [*cont, f"train.init_from={init}", f"model.num_layers={layers}", *sharing]))  # fmt: skip
            if "scratch" in t.controls:  # the deep model from scratch, the same total tokens
                total = [o for o in cont if not o.startswith("train.max_steps=")]
                variants.append((f"{src.name}-L{layers}-scratch", "scratch", layers,
                                 [*total, f"train.max_steps={src.run.train.max_steps + steps}",
                                  f"model.num_layers={layers}", *sharing]))  # fmt: skip
        if "continued" in t.controls:
            hf = spec.output / "runs" / src.name / "hf"
            variants.append((f"{src.name}-L{src_layers}-continued", "continued", src_layers,
                             [*cont, f"train.init_from={hf}"]))  # fmt: skip
        for name, kind, depth, overrides in variants:
            run = _resolve(spec, src.configs, overrides, extra, name)
            group = (*src.group, ("kind", kind), ("layers", str(depth)))
            needs = [src.name] if kind != "scratch" else []
            out.append(Run(name, kind, src.configs, overrides, src.axes, group, run, src.name, depth, needs))
    return out


def _data_key(run: RunConfig) -> Dict[str, Any]:
    return {k: v for k, v in asdict(run.data).items() if k not in DATA_NEUTRAL}


def check(spec: Spec, runs: List[Run], max_runs: Optional[int]) -> None:
    if max_runs is not None and len(runs) > max_runs:
        raise fail(spec.path, f"the grid has {len(runs)} runs, more than --max-runs {max_runs}",
                   "shrink an axis, or raise --max-runs if that many is meant")  # fmt: skip
    seen: Dict[str, Run] = {}
    for r in runs:
        if r.name in seen:
            raise fail(spec.path, f"two runs share the name {r.name!r} ({_describe(seen[r.name])} and {_describe(r)})",
                       "make the axis values distinct, or give run_name a field for every axis")  # fmt: skip
        seen[r.name] = r
        if r.run.train.global_batch_size <= 0:
            raise fail(spec.path, f"run {r.name}: train.global_batch_size is {r.run.train.global_batch_size} "
                       "(micro × world: tokens would depend on the job's size)",
                       "set train.global_batch_size in common")  # fmt: skip
    groups: Dict[Tuple[Tuple[str, str], ...], Run] = {}
    for r in runs:
        first = groups.setdefault(r.group, r)
        a, b = _data_key(first.run), _data_key(r.run)
        diff = sorted(k for k in a if a[k] != b[k])
        if diff:
            k = diff[0]
            raise fail(spec.path, f"runs {first.name} and {r.name} are compared but their data differ: "
                       f"data.{k} = {a[k]!r} vs {b[k]!r}",
                       f"set data.{k} in common (a preset sets its own), or make it an axis")  # fmt: skip
        if (first.kind, first.tokens) != (r.kind, r.tokens) and first.kind == r.kind:
            raise fail(spec.path, f"runs {first.name} and {r.name} are compared but see different token budgets "
                       f"({first.tokens:,} vs {r.tokens:,})",
                       "set train.max_steps / train.global_batch_size / data.seq_len in common or budget")  # fmt: skip


def _describe(r: Run) -> str:
    return ", ".join(f"{k}={_fmt(v)}" for k, v in r.axes.items())
