"""The schema described: ``scale-hyper config --explain KEY`` and ``docs/config.md``.

Regenerate the reference after changing the schema (a test fails while it is stale)::

    python -m scale_hyper.config.docs > docs/config.md
"""

from __future__ import annotations

import json
from dataclasses import MISSING
from typing import Any, Dict, List

from omegaconf import OmegaConf

from scale_hyper.config.loading import FREE_FORM, preset_text, unknown_key
from scale_hyper.config.model import allowed_text
from scale_hyper.config.schema import RunConfig, schema_fields

COMMAND = "python -m scale_hyper.config.docs > docs/config.md"


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value)  # null, true, 0.002, [0.9, 0.98], {}


def _flat_defaults() -> Dict[str, Any]:
    """What runs without a preset: the schema under presets/defaults.yaml, interpolations unresolved."""
    cfg = OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.create(preset_text("defaults")))
    out: Dict[str, Any] = {}

    def walk(node: Dict[str, Any], prefix: str) -> None:
        for k, v in node.items():
            if isinstance(v, dict) and f"{prefix}{k}" not in FREE_FORM:
                walk(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = v

    walk(OmegaConf.to_container(cfg, resolve=False), "")
    return out


def describe() -> List[Dict[str, str]]:
    """One row per group and key: key, type, default, source, allowed, help (groups: key and help only)."""
    defaults = _flat_defaults()
    rows = []
    for key, f in schema_fields(RunConfig):
        row = {"key": key, "help": f.metadata.get("help", ""), "group": "." not in key}
        if key in defaults:
            default = defaults[key]
            own = f.default if f.default is not MISSING else None
            from_yaml = isinstance(default, str) and "${" in default and default != own
            source = " (presets/defaults.yaml)" if from_yaml else ""
            row.update(type=str(f.type), default=_text(default), source=source, allowed=allowed_text(f.metadata))
        rows.append(row)
    return rows


def explain(key: str) -> str:
    """What ``scale-hyper config --explain KEY`` prints; an unknown KEY raises the unknown-key ConfigError."""
    rows = {r["key"]: r for r in describe()}
    parent = next((k for k in FREE_FORM if key.startswith(k + ".")), None)
    row = rows.get(parent or key)
    if row is None:
        raise unknown_key(key, "--explain")
    if row["group"]:
        keys = [k for k in rows if k.startswith(key + ".")]
        return f"{key}: {row['help']}\nkeys: {', '.join(keys)}"
    lines = [parent or key, f"  type:        {row['type']}", f"  default:     {row['default']}{row['source']}"]
    if row["allowed"]:
        lines.append(f"  allowed:     {row['allowed']}")
    lines.append(f"  description: {row['help']}")
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render() -> str:
    """docs/config.md: one table per group."""
    out = [
        f"<!-- Generated from the schema by `{COMMAND}`; do not edit by hand. -->",
        "# Configuration reference",
        "",
        "Every key of `scale-hyper <verb> [CONFIG ...] [key=value ...]`. *Default* is what runs without a "
        "preset (the embedded main job); presets and overrides are merged on top. `scale-hyper config "
        "--explain KEY` prints one entry; `scale-hyper config` rejects any value outside *allowed*.",
    ]
    for row in describe():
        if row["group"]:
            out += ["", f"## `{row['key']}`", "", _cell(row["help"]), "",
                    "| key | type | default | allowed | description |", "|---|---|---|---|---|"]  # fmt: skip
            continue
        cells = [
            f"`{row['key']}`",
            f"`{row['type']}`",
            f"`{row['default']}`{row['source']}",
            row["allowed"],
            row["help"],
        ]
        out.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(out) + "\n"


def main() -> None:
    print(render(), end="")


if __name__ == "__main__":
    main()
