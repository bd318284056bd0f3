"""`scale-hyper bench data`: masked tokens/s of ONE loader worker at seq 128 and 512.

Runs the worker's whole pipeline in-process (read tar shards → per-epoch permutation → k shards
interleaved and the shuffle buffer → masking → int64 tensors) on synthetic shards written to a
temporary directory (random ids over ``data.vocab_size``), so it needs no prepared data. Each
sequence length is timed three ways: one shard at a time without buffer (``plain``), with this
config's ``data.shards_per_worker``/``data.shuffle_buffer`` (``mixing``), and a 2-source
``data.mixture`` (0.7/0.3) with the same mixing. Masking alone is timed as well. Inter-process
transfer to the trainer is not included: that is the DataLoader's cost, not the worker's.
"""

from __future__ import annotations

import tempfile
import time
from typing import Dict, List, Tuple

import numpy as np

from scale_hyper.data.loader import train_loader
from scale_hyper.data.masking import Masker, stream_key
from scale_hyper.prepare.shard_writer import write_arrays

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
    return write_arrays(tmp, {"train": parts}, vocab_size)


def _tokens_per_s(loader, seconds: float) -> float:
    return _rates(loader, seconds)[0]


def _rates(loader, seconds: float) -> Tuple[float, float]:
    """Tokens per wall-clock second and per CPU-second of this process (an in-process loader: on a
    machine shared with other work only the latter says what the loader costs)."""
    it = iter(loader)
    next(it)  # first shards read outside the timing, like a warmed-up worker
    tokens, start, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        tokens += next(it)["input_ids"].numel()
    return tokens / (time.perf_counter() - start), tokens / max(time.process_time() - cpu, 1e-9)


def loader_tokens_per_s(data_cfg, manifest: dict, micro_batch_size: int, seconds: float = 3.0) -> Tuple[float, float]:
    """Masked tokens per second and per CPU-second of one in-process loader worker over a prepared
    ``manifest`` (rank 0 of 1)."""
    loader = train_loader(data_cfg, manifest, seed=0, rank=0, world_size=1, micro_batch_size=micro_batch_size)
    return _rates(loader, seconds)


def measure(data_cfg, seq_len: int, micro_batch_size: int, seconds: float = 3.0) -> Dict[str, float]:
    from scale_hyper.config.schema import MixtureSource

    with tempfile.TemporaryDirectory(prefix="scale-hyper-bench-") as tmp:
        manifest = _synthetic(f"{tmp}/a", seq_len, data_cfg.vocab_size)
        _synthetic(f"{tmp}/b", seq_len, data_cfg.vocab_size)
        base = dict(output=f"{tmp}/a", num_workers=0, seq_len=seq_len)
        variants = {
            "plain": _copy(data_cfg, **base, shards_per_worker=1, shuffle_buffer=0, mixture=[]),
            "mixing": _copy(data_cfg, **base, mixture=[]),
            "mixture": _copy(
                data_cfg, **base, mixture=[MixtureSource(f"{tmp}/a", 0.7), MixtureSource(f"{tmp}/b", 0.3)]
            ),
        }
        out: Dict[str, float] = {"seq_len": seq_len}
        for name, cfg in variants.items():
            out[f"{name}_tokens_per_s"] = loader_tokens_per_s(cfg, manifest, micro_batch_size, seconds)[0]
        out["loader_tokens_per_s"] = out["mixing_tokens_per_s"]

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
        out["masking_tokens_per_s"] = reps * ids.size / (time.perf_counter() - start)
    return out


def _copy(data_cfg, **changes):
    from dataclasses import is_dataclass, replace

    if is_dataclass(data_cfg) and not isinstance(data_cfg, type):
        return replace(data_cfg, **changes)
    from types import SimpleNamespace

    return SimpleNamespace(**{**vars(data_cfg), **changes})


def main(cfg) -> int:
    b, d = cfg.train.micro_batch_size, cfg.data
    print(f"data loader, one worker, micro_batch_size={b}, vocab {d.vocab_size}, mask_prob {d.mask_prob}; "
          f"mixing = data.shards_per_worker={d.shards_per_worker}, data.shuffle_buffer={d.shuffle_buffer}")  # fmt: skip
    print(f"{'seq_len':>8} {'plain':>10} {'mixing':>10} {'mixture':>10} {'masking only':>14}  (tokens/s)")
    for s in SEQ_LENS:
        r = measure(cfg.data, s, b)
        cols = " ".join(f"{r[k + '_tokens_per_s'] / 1e6:>9.2f}M" for k in ("plain", "mixing", "mixture"))
        print(f"{s:>8} {cols} {r['masking_tokens_per_s'] / 1e6:>12.1f}M")
    return 0
