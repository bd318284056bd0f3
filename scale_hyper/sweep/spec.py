"""The sweep spec: a YAML file naming the shared data and budget, the axes and the follow-ups.

Every key is checked when the file is read: an unknown top-level or follow-up key, an axis that is
not a config key, an empty axis, a per-preset value list for a preset the grid does not have — each is
one ``SweepError`` line naming the file and the fix, before anything is expanded or submitted.
See ``sweeps/*.yaml`` for complete examples and ``docs/experiments.md`` for the field reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from scale_hyper.config import ConfigError, available_presets, schema_fields
from scale_hyper.config.loading import FREE_FORM, unknown_key

TOP_KEYS = {"name", "output", "configs", "common", "budget", "axes", "preset_overrides", "follow_ups", "plan",
            "slurm", "run_name"}  # fmt: skip
FOLLOW_UPS = {"eval", "glue", "transplant"}
SLURM_KEYS = {"template", "sbatch", "followup_sbatch", "env"}
TRANSPLANT_KEYS = {"layers", "where", "controls", "steps", "presets"}
CONTROLS = ("continued", "scratch")


class SweepError(ConfigError):
    """A problem with the spec or the grid, found before anything runs (one line, exit 2)."""


def fail(path: Path | str, what: str, fix: str) -> SweepError:
    return SweepError(f"{path}: {what} — {fix}")


@dataclass
class Transplant:
    layers: List[int]
    where: Dict[str, List[Any]] = field(default_factory=dict)  # axis -> allowed values of the source runs
    controls: List[str] = field(default_factory=lambda: list(CONTROLS))
    steps: Optional[int] = None  # continued-training steps; None = the sources' own train.max_steps
    presets: Optional[List[str]] = None  # source presets; None = every preset of the grid


@dataclass
class Spec:
    path: Path
    name: str
    output: Path
    configs: List[str]
    common: Dict[str, Any]
    budget: Dict[str, int]
    axes: Dict[str, Any]  # key -> list, or {preset: list}
    preset_overrides: Dict[str, Dict[str, Any]]
    eval: Optional[Dict[str, Any]]
    glue: Optional[Dict[str, Any]]
    transplant: Optional[Transplant]
    plan: Dict[str, Any]
    slurm: Dict[str, Any]
    run_name: Optional[str]

    @property
    def presets(self) -> List[str]:
        return list(self.axes["preset"])


def _known(key: str) -> bool:
    keys = {k for k, _ in schema_fields()}
    return key in keys or any(key.startswith(f"{k}.") for k in FREE_FORM)


def check_key(path: Path, key: str, where: str) -> None:
    """An axis or override key must be a config key: one line naming it and the closest valid key."""
    if not _known(key):
        err = unknown_key(key, f"{where} in {path}")
        raise SweepError(str(err)) from None


def _mapping(path: Path, value: Any, what: str) -> Dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise fail(path, f"{what} must be a mapping (key: value lines), not {type(value).__name__}",
                   f"write `{what}:` followed by indented `key: value` lines")  # fmt: skip
    return {str(k): v for k, v in value.items()}


def _values(path: Path, key: str, value: Any, presets: List[str]) -> Any:
    """An axis: a non-empty list, or {preset: non-empty list} for values that differ per preset."""
    if isinstance(value, dict):
        extra = sorted(set(map(str, value)) - set(presets))
        if extra:
            raise fail(path, f"axis {key} gives values for {extra}, which the preset axis does not have",
                       f"presets of this grid: {', '.join(presets)}")  # fmt: skip
        missing = sorted(set(presets) - set(map(str, value)))
        if missing:
            raise fail(path, f"axis {key} has no values for preset(s) {missing}", "give every preset a list")
        return {str(p): _values(path, f"{key}[{p}]", v, presets) for p, v in value.items()}
    if not isinstance(value, list):
        value = [value]
    if not value:
        raise fail(path, f"axis {key} is empty", "give it at least one value (or remove it)")
    return value


def load(path_str: str) -> Spec:
    import yaml

    path = Path(path_str)
    if not path.is_file():
        raise SweepError(f"sweep spec not found: {path} — give the path of a YAML file (see sweeps/*.yaml)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f", line {mark.line + 1}" if mark else ""
        raise fail(f"{path}{at}", f"YAML syntax error: {getattr(err, 'problem', err)}", "fix the YAML there") from None
    raw = _mapping(path, raw, "the spec")
    unknown = sorted(set(raw) - TOP_KEYS)
    if unknown:
        raise fail(path, f"unknown spec key(s) {unknown}", f"valid keys: {', '.join(sorted(TOP_KEYS))}")
    name = str(raw.get("name") or path.stem)
    if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise fail(path, f"name {name!r} has characters other than letters, digits, '-', '_', '.'", "rename it")
    axes = _mapping(path, raw.get("axes"), "axes")
    presets = axes.get("preset")
    if not presets:
        raise fail(
            path, "axes.preset is missing", "list the presets to compare, e.g. preset: [hyperbert-mini, bert-mini]"
        )
    presets = presets if isinstance(presets, list) else [presets]
    for p in presets:
        if not (str(p) in available_presets() or str(p).endswith((".yaml", ".yml"))):
            raise fail(path, f"preset {p!r} is neither a built-in preset nor a YAML file",
                       f"presets: {', '.join(available_presets())}")  # fmt: skip
    axes["preset"] = [str(p) for p in presets]
    for key in list(axes):
        if key != "preset":
            check_key(path, key, "an axis")
        axes[key] = _values(path, key, axes[key], axes["preset"])
    common = _mapping(path, raw.get("common"), "common")
    for key in common:
        check_key(path, key, "common")
    overrides = {str(p): _mapping(path, v, f"preset_overrides.{p}") for p, v in
                 _mapping(path, raw.get("preset_overrides"), "preset_overrides").items()}  # fmt: skip
    for p, values in overrides.items():
        if p not in axes["preset"]:
            raise fail(
                path, f"preset_overrides.{p}: not a preset of this grid", f"presets: {', '.join(axes['preset'])}"
            )
        for key in values:
            check_key(path, key, f"preset_overrides.{p}")
    budget = {str(k): int(v) for k, v in _mapping(path, raw.get("budget"), "budget").items()}
    if set(budget) - {"tokens", "steps"} or len(budget) > 1:
        raise fail(path, f"budget {budget} is not one of tokens: N or steps: N", "give exactly one of them")
    follow = _mapping(path, raw.get("follow_ups"), "follow_ups")
    if set(follow) - FOLLOW_UPS:
        raise fail(path, f"unknown follow-up(s) {sorted(set(follow) - FOLLOW_UPS)}", f"use {sorted(FOLLOW_UPS)}")
    transplant = None
    if "transplant" in follow:
        t = _mapping(path, follow["transplant"], "follow_ups.transplant")
        if set(t) - TRANSPLANT_KEYS or "layers" not in t:
            raise fail(path, f"follow_ups.transplant has keys {sorted(t)}",
                       f"it needs layers: [..] and may have {sorted(TRANSPLANT_KEYS - {'layers'})}")  # fmt: skip
        controls = list(t.get("controls", CONTROLS))
        if set(controls) - set(CONTROLS):
            raise fail(
                path, f"unknown transplant control(s) {sorted(set(controls) - set(CONTROLS))}", f"use {CONTROLS}"
            )
        where = {k: v if isinstance(v, list) else [v] for k, v in _mapping(path, t.get("where"), "where").items()}
        for key in where:
            if key not in axes:
                raise fail(path, f"follow_ups.transplant.where names {key}, not an axis", f"axes: {', '.join(axes)}")
        layers = t["layers"] if isinstance(t["layers"], list) else [t["layers"]]
        transplant = Transplant([int(x) for x in layers], where, controls,
                                int(t["steps"]) if t.get("steps") else None, t.get("presets"))  # fmt: skip
    slurm = _mapping(path, raw.get("slurm"), "slurm")
    if set(slurm) - SLURM_KEYS:
        raise fail(path, f"unknown slurm key(s) {sorted(set(slurm) - SLURM_KEYS)}", f"use {sorted(SLURM_KEYS)}")
    plan = _mapping(path, raw.get("plan"), "plan")
    if set(plan) - {"gpu", "gpus", "mfu"}:
        raise fail(path, f"unknown plan key(s) {sorted(set(plan) - {'gpu', 'gpus', 'mfu'})}", "use gpu, gpus, mfu")
    configs = raw.get("configs") or []
    return Spec(
        path=path, name=name, output=Path(str(raw.get("output") or f"sweeps-out/{name}")),
        configs=[str(c) for c in (configs if isinstance(configs, list) else [configs])], common=common,
        budget=budget, axes=axes, preset_overrides=overrides,
        eval=_mapping(path, follow["eval"], "follow_ups.eval") if "eval" in follow else None,
        glue=_mapping(path, follow["glue"], "follow_ups.glue") if "glue" in follow else None,
        transplant=transplant, plan={"gpu": "h100-sxm", "gpus": 8, "mfu": 0.4, **plan}, slurm=slurm,
        run_name=raw.get("run_name"),
    )  # fmt: skip
