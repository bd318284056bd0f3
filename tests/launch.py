"""Start N real CPU ranks (gloo) of a command, the way torchrun or srun would, and collect them."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world: int, port: int, extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = dict(os.environ)
    env.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
        OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
    )  # fmt: skip
    env.update(extra or {})
    return env


def start_ranks(args: Sequence[str], world: int, cwd: Path, extra_env=None) -> List[subprocess.Popen]:
    port = free_port()
    return [
        subprocess.Popen(
            list(args),
            cwd=cwd,
            env=rank_env(r, world, port, extra_env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for r in range(world)
    ]


def run_ranks(
    args: Sequence[str], world: int, cwd: Path, timeout: float = 600, extra_env=None
) -> List[subprocess.CompletedProcess]:
    procs = start_ranks(args, world, cwd, extra_env)
    results = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, ""))
    return results


def scale_hyper(*args: str) -> List[str]:
    return [sys.executable, "-m", "scale_hyper", *args]


# The tiny 2-layer run the multi-rank fault, bf16 and tracking tests share (their COMMON adds the rest).
TINY_RUN = [
    "data.max_documents=400", "data.vocab_size=512", "data.seq_len=64", "data.sequences_per_shard=128",
    "model.num_layers=2", "train.micro_batch_size=8", "train.global_batch_size=0", "train.log_every=1",
    "train.eval_batches=2", "train.eval_every=1000", "train.lr=3e-3",
]  # fmt: skip


def prepare_shards(workdir: Path, common: Sequence[str]) -> Path:
    """Prepare one shard set in ``workdir`` (shared by a module's tests: preparing is not what they test)."""
    proc = subprocess.run(
        scale_hyper("prepare", *common, f"data.output={workdir}/shards"), cwd=workdir, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return workdir
