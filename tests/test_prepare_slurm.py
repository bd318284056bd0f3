"""slurm/prepare.sbatch as a real 2-task job array on the test SLURM cluster (tests/test_slurm.py's fixture).

The array is cancelled with `scancel` once its first slice is done (100 slices of 2 documents: the
tasks are still busy when the cancel arrives), submitted again, and must then give the same bytes
(manifest, plan, partials, tokenizer, every shard) as a 1-task prepare run locally with the same arguments.
"""

from __future__ import annotations

import glob
import os
import time
from pathlib import Path
from typing import Dict, List

import pytest
from conftest import SHELLCHECK_HINT, need_program
from test_slurm import (
    REPO,
    SLURM_DIR,
    TERMINAL,
    cluster,  # noqa: F401  (the SLURM fixture)
    run,
)

ARGS = [
    "hyperbert-tiny",
    "data.max_documents=200",
    "data.vocab_size=512",
    "data.seq_len=64",
    "data.sequences_per_shard=128",
    "data.slice_documents=2",
]  # fmt: skip  (100 slices)
SLICES = 100


def test_prepare_sbatch_passes_shellcheck():
    exe = need_program("shellcheck", SHELLCHECK_HINT)
    proc = run([exe, "-x", "slurm/prepare.sbatch", "slurm/common.sh"], cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = (SLURM_DIR / "prepare.sbatch").read_text()
    edit, end = text.index("EDIT HERE"), text.index("END OF EDIT BLOCK")
    assert all(edit < text.index(line) < end for line in text.splitlines() if line.startswith("#SBATCH"))


def _files(root) -> Dict[str, bytes]:
    return {
        os.path.relpath(p, root): open(p, "rb").read()
        for p in glob.glob(os.path.join(root, "**", "*"), recursive=True)
        if os.path.isfile(p)
    }


def _array(slurm, tmp_path: Path, name: str, env: Dict[str, str], cancel_when=None) -> List[Dict[str, str]]:
    """Submit a 2-task array of prepare.sbatch and wait for it; the final record of each task.
    ``cancel_when()``: `scancel` the array as soon as it holds."""
    export = ",".join(["ALL", *(f"{k}={v}" for k, v in env.items())])
    proc = run(
        ["sbatch", "--parsable", f"--partition={slurm['partition']}", "--array=0-1", "--cpus-per-task=1",
         "--time=10", f"--job-name={name}", f"--chdir={tmp_path}", f"--output={tmp_path}/logs/%x-%A_%a.out",
         f"--export={export}", str(SLURM_DIR / "prepare.sbatch")],
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip().split(";")[0]
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if cancel_when is not None and cancel_when():
            assert run(["scancel", job]).returncode == 0
            cancel_when = None
        lines = [ln for ln in run(["scontrol", "show", "job", "-o", job]).stdout.splitlines() if "JobState=" in ln]
        tasks = [dict(kv.split("=", 1) for kv in ln.split() if "=" in kv) for ln in lines]
        if len(tasks) == 2 and all(t["JobState"] in TERMINAL for t in tasks):
            return sorted(tasks, key=lambda t: t["ArrayTaskId"])
        time.sleep(0.05 if cancel_when else 2)
    run(["scancel", job])
    logs = "\n".join(p.read_text() for p in (tmp_path / "logs").glob("*.out"))
    raise AssertionError(f"array {job} not done after 180 s\n{logs[-6000:]}")


@pytest.mark.slow
def test_array_interrupted_and_resumed_equals_one_task(cluster, tmp_path):  # noqa: F811
    (tmp_path / "logs").mkdir()
    ref = tmp_path / "ref"
    # this checkout first on the path, also for the jobs (an editable install may point elsewhere)
    pypath = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    cmd = ["scale-hyper", "prepare", *ARGS, f"data.output={ref}", "data.prepare_workers=1"]
    local = run(cmd, timeout=300, env={**os.environ, "PYTHONPATH": pypath})
    assert local.returncode == 0, local.stderr[-3000:]

    out = tmp_path / "array"
    env = {
        "CONFIG": "hyperbert-tiny",
        "DATA_DIR": str(out),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": pypath,
        "SCALE_HYPER_APPEND": " ".join(ARGS[1:]),
    }  # fmt: skip  (the overrides; no commas for --export)
    partials = lambda: glob.glob(str(out / "slices" / "0*.json"))  # noqa: E731
    first = _array(cluster, tmp_path, "prep1", env, cancel_when=partials)
    logs = "\n".join(p.read_text() for p in (tmp_path / "logs").glob("prep1-*.out"))
    assert [t["JobState"] for t in first] == ["CANCELLED", "CANCELLED"], logs[-4000:]
    assert not (out / "manifest.json").exists()
    assert 1 <= len(partials()) < SLICES, logs[-4000:]  # some slices done, then cancelled

    second = _array(cluster, tmp_path, "prep2", env)
    logs = "\n".join(p.read_text() for p in (tmp_path / "logs").glob("prep2-*.out"))
    assert [t["JobState"] for t in second] == ["COMPLETED", "COMPLETED"], logs[-4000:]
    assert "prepared " in logs and "task 0/2" in logs and "task 1/2" in logs
    got, want = _files(out), _files(ref)
    assert sorted(got) == sorted(want)  # names first: a diff of shard bytes would fill the log
    assert [name for name in want if got[name] != want[name]] == []
