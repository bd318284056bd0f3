"""`scale-hyper bench data`: masked tokens/s of ONE loader worker at seq 128 and 512.

Runs the worker's whole pipeline in-process (read tar shards → per-epoch permutation → masking →
int64 tensors) on synthetic shards written to a temporary directory (random ids over
``data.vocab_size``), so it needs no prepared data. Masking alone is timed as well. Inter-process
transfer to the trainer is not included: that is the DataLoader's cost, not the worker's.
"""

from __future__ import annotations

import tempfile
import time
from typing import Dict, List

import numpy as np

from scale_hyper.data import shards as shardlib
from scale_hyper.data.loader import train_loader
from scale_hyper.data.masking import Masker, stream_key

SEQ_LENS = (128, 512)
_TOKENS_PER_SHARD = 1 << 20
_SHARDS = 4


def _synthetic(tmp: str, seq_len: int, vocab_size: int) -> dict:
    rng = np.random.default_rng(0)
    n = _TOKENS_PER_SHARD // seq_len
    parts: List[np.ndarray] = []
    for _ in range(_SHARDS):
        rows = rng.integers(5, vocab_size, size=(n, seq_len), dtype=np.int64)
        rows[:, 0] = 2  # [CLS]
        parts.append(rows)
    return shardlib.write_arrays(tmp, {"train": parts}, vocab_size)


def measure(data_cfg, seq_len: int, micro_batch_size: int, seconds: float = 3.0) -> Dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="scale-hyper-bench-") as tmp:
        manifest = _synthetic(tmp, seq_len, data_cfg.vocab_size)
        cfg = _copy(data_cfg, output=tmp, num_workers=0)
        loader = train_loader(cfg, manifest, seed=0, rank=0, world_size=1, micro_batch_size=micro_batch_size)
        it = iter(loader)
        next(it)  # first shard read outside the timing, like a warmed-up worker
        tokens, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            batch = next(it)
            tokens += batch["input_ids"].numel()
        loader_tps = tokens / (time.perf_counter() - start)

        masker = Masker(data_cfg.vocab_size, range(5), 4, data_cfg.mask_prob)
        ids = (
            np.random.default_rng(1)
            .integers(5, data_cfg.vocab_size, size=(micro_batch_size, seq_len))
            .astype(np.uint16)
        )
        uids = np.arange(micro_batch_size, dtype=np.int64)
        key, reps, start = stream_key(0, 0), 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 3:
            masker(ids, uids + reps * micro_batch_size, key)
            reps += 1
        mask_tps = reps * ids.size / (time.perf_counter() - start)
    return {"seq_len": seq_len, "loader_tokens_per_s": loader_tps, "masking_tokens_per_s": mask_tps}


def _copy(data_cfg, **changes):
    from dataclasses import is_dataclass, replace

    if is_dataclass(data_cfg) and not isinstance(data_cfg, type):
        return replace(data_cfg, **changes)
    from types import SimpleNamespace

    return SimpleNamespace(**{**vars(data_cfg), **changes})


def main(cfg) -> int:
    b = cfg.train.micro_batch_size
    print(f"data loader, one worker, micro_batch_size={b}, vocab {cfg.data.vocab_size}, mask_prob {cfg.data.mask_prob}")
    print(f"{'seq_len':>8} {'worker tokens/s':>16} {'masking only':>14}")
    for s in SEQ_LENS:
        r = measure(cfg.data, s, b)
        print(f"{s:>8} {r['loader_tokens_per_s'] / 1e6:>14.2f}M {r['masking_tokens_per_s'] / 1e6:>12.1f}M")
    return 0
