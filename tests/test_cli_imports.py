"""The instant CLI: `import scale_hyper`, `scale-hyper --help`, every verb's `--help`, `config` and
`presets` import no torch, transformers, DeepSpeed or MLflow (each run in a fresh interpreter).

`config` and `presets` rely on `scale_hyper.config` being the lowest layer (ModelConfig lives in
`scale_hyper/config/model.py`, stdlib only): the config package imports no model code.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from scale_hyper.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "deepspeed", "mlflow")

# Runs the console script's entry point with argv, then writes the imported top-level packages.
RUNNER = """
import json, sys
out, argv = sys.argv[1], sys.argv[2:]
code = 0
if argv != ["--import-only"]:
    from scale_hyper.cli import main
    try:
        code = main(argv)
    except SystemExit as exit:  # argparse's --help
        code = exit.code
else:
    import scale_hyper
with open(out, "w") as f:
    json.dump(sorted({m.split(".")[0] for m in sys.modules} | {m for m in sys.modules if m.startswith("scale_hyper")}), f)
raise SystemExit(code)
"""


def imported(tmp_path: Path, *argv: str) -> tuple[set, str]:
    out = tmp_path / "modules.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, str(out), *argv],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return set(json.loads(out.read_text())), proc.stdout


def verbs() -> list[str]:
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return sorted(sub.choices)


def assert_light(modules: set) -> None:
    assert not modules & set(HEAVY), sorted(modules & set(HEAVY))


def test_import_scale_hyper(tmp_path):
    modules, _ = imported(tmp_path, "--import-only")
    assert_light(modules)
    assert "scale_hyper.models" not in modules  # registering the Auto classes is `import scale_hyper.models`


def test_top_level_help(tmp_path):
    modules, out = imported(tmp_path, "--help")
    assert "presets" in out and "transplant" in out
    assert_light(modules)


def test_every_verb_help(tmp_path):
    assert {"train", "bench", "transplant", "config", "presets"} <= set(verbs())
    for verb in verbs():
        modules, out = imported(tmp_path, verb, "--help")
        assert f"scale-hyper {verb}" in out
        assert not modules & set(HEAVY), (verb, sorted(modules & set(HEAVY)))


@pytest.mark.parametrize("argv", [["config", "hyperbert-mini", "train.lr=5e-4"], ["presets"]])
def test_config_and_presets(tmp_path, argv):
    modules, out = imported(tmp_path, *argv)
    assert out.strip()
    assert_light(modules)
    assert "scale_hyper.models" not in modules
