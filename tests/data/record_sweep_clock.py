"""Record tests/data/sweep_clock.json: the metrics of real sweep runs, quiet and slowed on purpose.

    PYTHONPATH=. python tests/data/record_sweep_clock.py   # ~5 min on 2 CPU cores

1. `scale-hyper sweep SPEC --local` trains 2 mixers × 3 seeds (tiny, 30 steps), every optimizer step
   lengthened by the trainer's test hook SCALE_HYPER_TEST_STEP_SECONDS=QUIET_S: the sleep dominates
   the step, so on a machine shared with other work the runs' speed still agrees (the quiet sweep).
2. Two runs' directories are deleted and the same sweep is run again with the hook at SLOW_S: only
   those two train again, each step slower (the slowed sweep = the quiet one with those two replaced).

Each run's metrics.jsonl is kept as training wrote it (only the fields the report reads), so
tests/test_sweep_clock.py builds the report from real measurements without training.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OUT = Path(__file__).with_name("sweep_clock.json")
QUIET_S, SLOW_S = 1.0, 3.0
SLOWED = ["hyperbert-tiny_s2", "bert-tiny_s3"]
KEYS = ("step", "val_loss", "loss", "tokens_per_s", "tokens_seen")

SPEC = """name: clock
output: {out}
common:
  data.source: stdlib
  data.max_documents: 200
  data.vocab_size: 512
  data.seq_len: 64
  data.sequences_per_shard: 128
  data.output: {data}
  train.global_batch_size: 8
  train.micro_batch_size: 8
  train.log_every: 5
  train.eval_every: 10
  train.eval_batches: 2
  train.save_every: 1000
  train.lr: 3.0e-3
  train.export: false
  deepspeed.precision: fp32
  tracking.enabled: false
budget:
  steps: 30
axes:
  preset: [hyperbert-tiny, bert-tiny]
  train.seed: [1, 2, 3]
"""


def sweep(tmp: Path, step_s: float) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "SCALE_HYPER_TEST_STEP_SECONDS": str(step_s)}
    cmd = [sys.executable, "-m", "scale_hyper", "sweep", str(tmp / "spec.yaml"), "--local"]
    subprocess.run(cmd, cwd=tmp, env=env, check=True)


def metrics(tmp: Path) -> dict:
    out = {}
    for run_dir in sorted((tmp / "out" / "runs").iterdir()):
        lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        out[run_dir.name] = [{k: r[k] for k in KEYS if k in r} for r in lines]
    return out


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="sweep-clock-") as t:
        tmp = Path(t)
        (tmp / "spec.yaml").write_text(SPEC.format(out=tmp / "out", data=tmp / "data"))
        sweep(tmp, QUIET_S)
        quiet = metrics(tmp)
        for name in SLOWED:
            shutil.rmtree(tmp / "out" / "runs" / name)
        sweep(tmp, SLOW_S)
        slowed = metrics(tmp)
    assert all(slowed[n] == quiet[n] for n in quiet if n not in SLOWED)
    doc = {
        "recorded": datetime.date.today().isoformat(),
        "how": f"tests/data/record_sweep_clock.py: real `sweep --local` runs, every step lengthened by "
        f"SCALE_HYPER_TEST_STEP_SECONDS={QUIET_S}; then {', '.join(SLOWED)} trained again with {SLOW_S}",
        "load_average": os.getloadavg()[0],
        "spec": SPEC,
        "slowed_runs": SLOWED,
        "quiet": quiet,
        "slowed": {n: slowed[n] for n in SLOWED},
    }
    OUT.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
