"""slurm/doctor.sbatch on the test SLURM cluster (two emulated nodes, CPU ranks): the doctor runs
through srun across both nodes, prints its table in the job log and writes the JSON beside it.

Uses the cluster, submission and shard fixtures of tests/test_slurm.py (same cluster, same skips).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from conftest import SHELLCHECK_HINT, need_program
from test_slurm import DATA, SLURM_DIR, cluster, job_env, shards, submit  # noqa: F401 - fixtures


def test_doctor_template_passes_shellcheck():
    exe = need_program("shellcheck", SHELLCHECK_HINT)
    proc = subprocess.run([exe, "-x", "slurm/doctor.sbatch", "slurm/common.sh"], cwd=SLURM_DIR.parent,
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_doctor_template_layout():
    text = (SLURM_DIR / "doctor.sbatch").read_text()
    assert subprocess.run(["bash", "-n", str(SLURM_DIR / "doctor.sbatch")]).returncode == 0
    edit, end = text.index("EDIT HERE"), text.index("END OF EDIT BLOCK")
    assert all(text.index(line) in range(edit, end) for line in re.findall(r"^#SBATCH.*$", text, re.M))
    assert 'source "$SH_SLURM_DIR/common.sh"' in text and "sh_doctor" in text


@pytest.mark.slow
def test_doctor_sbatch_two_nodes(submit, shards, tmp_path):  # noqa: F811 - fixtures
    job = submit(
        "doctor.sbatch", "doctor", ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1"],
        job_env(tmp_path, shards, "doctor", DOCTOR_JOIN_TIMEOUT="60"),
        [*DATA, "model.num_layers=2", "train.micro_batch_size=8", "train.global_batch_size=0",
         "deepspeed.precision=fp32", "train.lr=3e-3", "deepspeed.zero_stage=3"],
    )  # fmt: skip
    info = job.wait(600)
    text = job.text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-8000:]
    assert "=== scale-hyper doctor: 2 rank(s)" in text and "doctor: PASS" in text
    report = json.loads(Path(str(job.log).removesuffix(".out") + ".json").read_text())  # beside the log
    checks = {r["check"]: r for r in report["results"]}
    assert report["overall"] == "PASS" and report["world_size"] == 2
    assert "2 rank(s) on 2 node(s)" in checks["environment"]["detail"]
    for name in ("collectives/all_reduce", "training", "training/residency", "resume"):
        assert checks[name]["status"] == "PASS", checks[name]
