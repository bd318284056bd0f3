"""The hung-rank judge's arithmetic (engine/heartbeat.py), and the SLURM templates' decision after a
hung rank (slurm/common.sh). The real thing — SIGSTOP of a rank, named by the others, the job
requeued and resumed — runs in tests/test_faults.py (2 ranks) and tests/test_slurm.py (4 ranks)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from scale_hyper.engine.heartbeat import _DONE, HUNG_EXIT, Timings, silent_ranks

REPO = Path(__file__).resolve().parents[1]


def test_timings_follow_the_timeout():
    default = Timings.of(10)  # 10 minutes: beats every 5 s (the cap), named ≤ 25 s after the timeout
    assert (default.timeout_s, default.interval_s, default.grace_s, default.collective_s) == (600, 5, 25, 650)
    short = Timings.of(0.15)  # what the fault tests use: 12 beats per timeout
    assert (short.timeout_s, short.interval_s, short.grace_s, short.collective_s) == (9, 0.75, 3.75, 16.5)
    assert Timings.of(0.1).interval_s == 0.5  # the floor


def test_a_rank_is_silent_after_the_timeout_unless_it_left_or_the_judge_was_frozen():
    seen = {1: [7.0, 100.0], 2: [9.0, 105.0], 3: [float(_DONE + 3), 90.0]}
    assert silent_ranks(seen, now=109.0, last_look=108.5, timeout=9) == {1: 9.0}  # 2 beat recently, 3 left
    assert silent_ranks(seen, now=120.0, last_look=119.5, timeout=9) == {1: 20.0, 2: 15.0}
    # The judge itself did not run for 10 s (> timeout / 2): a suspended job, not silent peers.
    assert silent_ranks(seen, now=130.0, last_look=120.0, timeout=9) == {}
    assert seen[1][1] == seen[2][1] == 130.0  # every clock restarted


FAKE_SLURM = """#!/bin/bash
case "$(basename "$0") $1 $2" in
  "scontrol show hostnames") echo node1 ;;
  "scontrol show node") echo "NodeName=node1 NodeAddr=127.0.0.1" ;;
  "scontrol show job") echo "StdOut=" ;;
  "scontrol requeue"*) echo "$@" >>"$FAKE_DIR/requeued" ;;
  srun*) [[ -n $FAKE_SAVES ]] && mkdir -p "$RUN_DIR/checkpoints/step_$FAKE_SAVES" \\
             && touch "$RUN_DIR/checkpoints/step_$FAKE_SAVES/trainer_state.json"
         exit "$FAKE_STATUS" ;;
esac
"""


@pytest.mark.parametrize(
    "status,saves,requeued",
    [(HUNG_EXIT, "8", True), (HUNG_EXIT, "", False), (4, "8", False), (0, "8", False)],
    ids=["hung-after-a-new-checkpoint", "hung-without-progress", "collective-failed", "finished"],
)
def test_the_templates_requeue_a_hung_job_only_after_a_new_checkpoint(tmp_path, status, saves, requeued):
    """sh_train's decision with stand-ins for srun and scontrol (the real cluster run, SIGSTOP and all,
    is tests/test_slurm.py; this covers the branches it does not reach)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("srun", "scontrol"):
        (bin_dir / name).write_text(FAKE_SLURM)
        (bin_dir / name).chmod(0o755)
    run_dir = tmp_path / "runs" / "exp"
    (run_dir / "checkpoints" / "step_4").mkdir(parents=True)
    (run_dir / "checkpoints" / "step_4" / "trainer_state.json").touch()
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path), "SLURM_JOB_ID": "7", "SLURM_JOB_NAME": "exp",
        "SLURM_JOB_NODELIST": "node1", "SLURM_SUBMIT_DIR": str(tmp_path), "FAKE_DIR": str(tmp_path),
        "FAKE_STATUS": str(status), "FAKE_SAVES": saves, "RUN_DIR": str(run_dir), "PREFLIGHT": "0",
    }  # fmt: skip
    script = f"source {REPO}/slurm/common.sh; sh_setup srun; sh_train; echo rc=$?"
    proc = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert (tmp_path / "requeued").exists() == requeued, proc.stdout + proc.stderr
    if requeued:
        assert "a rank hung (status 5) after saving the checkpoint of step 8" in proc.stdout
        assert proc.stdout.strip().endswith("rc=0")
    else:
        assert proc.stdout.strip().endswith(f"rc={status}"), proc.stdout + proc.stderr
    if status == HUNG_EXIT and not saves:
        assert "a rank hung (status 5), but no new checkpoint was completed" in proc.stdout
