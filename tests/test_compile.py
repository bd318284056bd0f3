"""`train.compile=true` (DeepSpeed's `engine.compile()`: in-place torch.compile, inductor) against the
eager run on CPU: the same losses step by step, the same weights at the end and the same checkpoint
layout (parameter names unchanged, so a compiled run's checkpoint resumes or exports like an eager
one's). One rank, a tiny geometry, 3 steps: the compilation itself is most of the time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from launch import prepare_shards, run_ranks, scale_hyper

pytestmark = pytest.mark.slow

COMMON = [
    "data.max_documents=200", "data.vocab_size=512", "data.seq_len=64", "data.sequences_per_shard=128",
    "model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.ffn_size=64", "model.max_position=64",
    "model.hyper_width=16", "model.hyper_heads=2", "model.hyper_ffn_ratio=2", "model.mixer_width=32",
    "model.dropout=0.0",  # inductor draws dropout masks with its own RNG: compare without dropout
    "train.micro_batch_size=8", "train.global_batch_size=8", "train.max_steps=3", "train.log_every=1",
    "train.eval_batches=1", "train.eval_every=1000", "train.export=false", "tracking.enabled=false",
    "deepspeed.precision=fp32", "train.lr=3e-3",
]  # fmt: skip


def losses(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_compiled_training_matches_eager(tmp_path):
    from scale_hyper import runs

    wd = prepare_shards(tmp_path, COMMON)
    out = {}
    for name, compiled in (("eager", "false"), ("compiled", "true")):
        args = scale_hyper("train", *COMMON, f"data.output={wd}/shards", f"train.output_dir={wd}/{name}",
                           f"train.compile={compiled}")  # fmt: skip
        (proc,) = run_ranks(args, 1, wd, timeout=1200)
        assert proc.returncode == 0, proc.stdout[-6000:]
        out[name] = wd / name
    eager, compiled = losses(out["eager"]), losses(out["compiled"])
    assert sorted(compiled) == [1, 2, 3]
    assert [compiled[s] for s in (1, 2, 3)] == pytest.approx([eager[s] for s in (1, 2, 3)], rel=1e-4)
    a, b = (runs.consolidated_state_dict(runs.RunDir(out[n]).step(3)) for n in ("eager", "compiled"))
    assert a.keys() == b.keys()  # no `_orig_mod.` prefixes: the checkpoints are interchangeable
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
