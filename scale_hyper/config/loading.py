"""Build a RunConfig from presets, YAML files and ``key=value`` overrides.

Order of precedence (later wins): schema defaults (the embedded main job) → ``presets/defaults.yaml``
(only the interpolations a dataclass default cannot hold) → each CONFIG argument in order (a preset
name, a YAML path, or a DeepSpeed JSON) → overrides. The result is validated once
(``RunConfig.validate``). Every error is a ``ConfigError`` reading ``<what> — <fix>``.
"""

from __future__ import annotations

import difflib
import functools
import os
from importlib import resources
from typing import Any, Dict, Iterable, List, Sequence, Tuple

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from scale_hyper import __version__
from scale_hyper.config.model import ConfigError, fail
from scale_hyper.config.schema import RunConfig, schema_fields

PRESET_PACKAGE = "scale_hyper.presets"
FREE_FORM = ("deepspeed.extra", "tracking.tags")  # dict keys that accept any sub-key


def available_presets() -> List[str]:
    names = [p.name[: -len(".yaml")] for p in resources.files(PRESET_PACKAGE).iterdir() if p.name.endswith(".yaml")]
    return sorted(n for n in names if n != "defaults")


def preset_text(name: str) -> str:
    return resources.files(PRESET_PACKAGE).joinpath(f"{name}.yaml").read_text()


def _all_keys() -> List[str]:
    return [key for key, _ in schema_fields(RunConfig)]


def _suggest(key: str) -> str:
    keys = _all_keys()
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if not close:  # a misspelt leaf under the right group: compare leaf names
        leaf = key.rsplit(".", 1)[-1]
        by_leaf = {k.rsplit(".", 1)[-1]: k for k in keys}
        close = [by_leaf[m] for m in difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.6)]
    return f" Did you mean '{close[0]}'?" if close else ""


@functools.lru_cache(maxsize=1)
def _known_keys() -> frozenset:
    return frozenset(_all_keys())


def _is_known(key: str) -> bool:
    if key in _known_keys():
        return True
    return any(key.startswith(f"{k}.") for k in FREE_FORM)


def unknown_key(key: str, origin: str) -> ConfigError:
    return fail(
        f"unknown config key '{key}' (from {origin})",
        f"{_suggest(key).strip() or 'Check the spelling.'} `scale-hyper config` lists every valid key.",
    )


def _explain(err: OmegaConfBaseException, origin: str) -> ConfigError:
    key = getattr(err, "full_key", None) or getattr(err, "key", None) or "?"
    if isinstance(err, ConfigKeyError):
        return unknown_key(str(key), origin)
    first_line = str(err).splitlines()[0]
    if isinstance(err, ValidationError):
        return fail(
            f"bad value for config key '{key}' (from {origin}): {first_line}",
            f"`scale-hyper config --explain {key}` shows its type",
        )
    return fail(f"invalid configuration (from {origin}): {first_line}", "fix the value named above")


def _load_yaml(path: str) -> DictConfig:
    """A YAML file; a syntax error names the file, line and column instead of a parser traceback."""
    import yaml

    try:
        loaded = OmegaConf.load(path)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else path
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise fail(f"{where}: YAML syntax error: {problem}", "fix the YAML at that position") from None
    if not isinstance(loaded, DictConfig):
        raise fail(f"{path} is not a YAML mapping of config groups", "write it as `group:` / `  key: value` lines")
    return loaded


def _load_source(arg: str) -> tuple[DictConfig, str]:
    """A CONFIG argument: a YAML path, a DeepSpeed JSON path, or a preset name."""
    if arg.endswith(".json"):
        if not os.path.isfile(arg):
            raise fail(f"DeepSpeed config file not found: {arg}", "check the path")
        return OmegaConf.create({"deepspeed": {"config": os.path.abspath(arg)}}), arg
    if arg.endswith((".yaml", ".yml")) or os.sep in arg:
        if not os.path.isfile(arg):
            raise fail(f"config file not found: {arg}", "check the path")
        return _load_yaml(arg), arg
    if arg in available_presets():
        return OmegaConf.create(preset_text(arg)), f"preset {arg}"
    close = difflib.get_close_matches(arg, available_presets(), n=3)
    hint = f"Did you mean {', '.join(close)}? " if close else ""
    raise fail(
        f"'{arg}' is neither a config file nor a preset",
        f"{hint}Presets: {', '.join(available_presets())}.",
    )


def load_config(args: Sequence[str] = ()) -> RunConfig:
    """Merge presets/files/overrides onto the schema; return a typed, validated RunConfig."""
    cfg = OmegaConf.structured(RunConfig)
    sources: List[tuple[DictConfig, str]] = [(OmegaConf.create(preset_text("defaults")), "preset defaults")]
    overrides = []
    for arg in args:
        if "=" in arg and not os.path.isfile(arg):
            overrides.append(arg)
        else:
            sources.append(_load_source(arg))
    for arg in overrides:  # name the whole mistyped key, not just its first unknown part
        key = arg.split("=", 1)[0]
        if not _is_known(key):
            raise unknown_key(key, "command-line overrides")
    try:
        sources.append((OmegaConf.from_dotlist(overrides), "command-line overrides"))
    except OmegaConfBaseException as err:
        raise fail(f"cannot parse overrides {overrides}: {err}", "write each as key=value") from None
    for source, origin in sources:
        try:
            cfg = OmegaConf.merge(cfg, source)
        except OmegaConfBaseException as err:
            raise _explain(err, origin) from None
    try:
        run: RunConfig = OmegaConf.to_object(cfg)  # resolves interpolations, checks types
    except OmegaConfBaseException as err:
        raise _explain(err, "interpolation") from None
    return run.validate()


def _leaf_keys(node: Dict[str, Any], prefix: str = "") -> Iterable[str]:
    for key, value in node.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict) and full not in FREE_FORM:
            yield from _leaf_keys(value, f"{full}.")
        else:
            yield full


def _drop(node: Dict[str, Any], key: str) -> None:
    """Delete a dotted key, and the groups it leaves empty."""
    head, _, rest = key.partition(".")
    if rest:
        _drop(node[head], rest)
    if not rest or not node[head]:
        del node[head]


def load_saved(text: str, origin: str, saved_by: str = "another version") -> Tuple[RunConfig, List[str]]:
    """The resolved config stored with a checkpoint, read by this version of scale-hyper. A key this
    version does not know (the checkpoint was saved by a newer one) is left out and returned, for the
    caller's one warning; an unknown ``model.*`` key is refused, since it may change what the weights mean."""
    import yaml

    try:
        saved = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise fail(f"{origin}: its stored config is not YAML ({str(err).splitlines()[0]})", "the marker is damaged: "
                   "`scale-hyper checkpoint verify` checks it") from None  # fmt: skip
    if not isinstance(saved, dict):
        raise fail(f"{origin}: its stored config is not a mapping", "`scale-hyper checkpoint verify` checks it")
    unknown = [key for key in _leaf_keys(saved) if not _is_known(key)]
    model = [key for key in unknown if key.startswith("model.")]
    if model:
        raise fail(
            f"{origin} was saved by {saved_by} with {', '.join(model)}, which scale-hyper {__version__} does not know",
            "read it with the scale-hyper version that wrote it, or a newer one",
        )
    for key in unknown:
        _drop(saved, key)
    try:
        run = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.create(saved)))
    except OmegaConfBaseException as err:
        raise _explain(err, origin) from None
    assert isinstance(run, RunConfig)
    return run, unknown


def to_yaml(run: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(run))


def flatten(run: RunConfig) -> dict:
    """``{"model.hidden_size": 256, ...}``: for MLflow params and diffs."""
    out = {}

    def walk(node, prefix):
        for k, v in node.items():
            if isinstance(v, dict) and v:
                walk(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = v

    walk(OmegaConf.to_container(OmegaConf.structured(run)), "")
    return out


def split_args(argv: Iterable[str]) -> List[str]:
    """Drop launcher-injected flags (``--local_rank=N``, ``--local-rank N``) from CONFIG args."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a.startswith(("--local_rank", "--local-rank")):
            skip = "=" not in a
            continue
        out.append(a)
    return out
