"""Dynamic BERT masking, vectorised and reproducible without any RNG state.

Each token's random draw is a hash of (seed, epoch, global sequence id, position): a counter-based
generator (splitmix64 finalizer over uint64 arrays). So the mask of a sequence depends only on
which sequence it is and in which epoch — not on batch composition, worker count, world size or
how many batches came before — which is what makes resume exact and re-splits consistent.

Of the non-special positions, ``mask_prob`` are selected; of those 80 % become ``[MASK]``, 10 % a
random non-special token, 10 % stay unchanged. Labels are the original ids at selected positions
and -100 elsewhere. Special tokens ([PAD] [UNK] [CLS] [SEP] [MASK]) are never selected.
"""

from __future__ import annotations

from typing import Dict, Iterable, Tuple

import numpy as np

IGNORE_INDEX = -100
_U64 = np.uint64
_GOLDEN = _U64(0x9E3779B97F4A7C15)
_M1 = _U64(0xBF58476D1CE4E5B9)
_M2 = _U64(0x94D049BB133111EB)
_MASK64 = (1 << 64) - 1


def splitmix64(x: np.ndarray) -> np.ndarray:
    """A bijective 64-bit mixer (Steele et al.); wraps modulo 2**64 by design."""
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> _U64(30))) * _M1
        z = (z ^ (z >> _U64(27))) * _M2
        return z ^ (z >> _U64(31))


def stream_key(seed: int, epoch: int, salt: int = 0) -> int:
    """One 64-bit key per (seed, epoch, salt); different epochs give unrelated masks."""
    k = np.array([(seed * 0x100000001B3 + epoch * 0x9E3779B1 + salt) & _MASK64], dtype=_U64)
    return int(splitmix64(splitmix64(k))[0])


class Masker:
    def __init__(
        self,
        vocab_size: int,
        special_ids: Iterable[int],
        mask_id: int,
        mask_prob: float = 0.15,
        replace_prob: float = 0.8,
        random_prob: float = 0.1,
    ):
        if not 0.0 <= mask_prob <= 1.0:
            raise ValueError(f"data.mask_prob={mask_prob} must be in [0, 1]")
        self.vocab_size, self.mask_id = vocab_size, mask_id
        self.special = np.zeros(vocab_size, dtype=bool)
        self.special[list(special_ids)] = True
        self.normal_ids = np.flatnonzero(~self.special).astype(np.int64)  # random replacements
        # Thresholds on a 24-bit uniform u: selected if u < t_sel; then [MASK] / random / keep by u.
        scale = float(1 << 24)
        self.t_sel = int(round(mask_prob * scale))
        self.t_mask = int(round(mask_prob * replace_prob * scale))
        self.t_rand = int(round(mask_prob * (replace_prob + random_prob) * scale))

    def __call__(self, ids: np.ndarray, uids: np.ndarray, key: int) -> Dict[str, np.ndarray]:
        """``ids``: [B, S] uint16/32; ``uids``: [B] global sequence ids. Returns int64 arrays."""
        b, s = ids.shape
        pos = uids.astype(_U64)[:, None] * _U64(s) + np.arange(s, dtype=_U64)[None, :]
        with np.errstate(over="ignore"):
            h = splitmix64(pos ^ _U64(key))
        u = (h >> _U64(40)).astype(np.int64)  # top 24 bits: selection and the 80/10/10 choice
        src = ids.astype(np.int64)
        selected = (u < self.t_sel) & ~self.special[src]
        out = src.copy()
        out[selected & (u < self.t_mask)] = self.mask_id
        rand = selected & (u >= self.t_mask) & (u < self.t_rand)
        if rand.any():
            pick = (h[rand] & _U64(0xFFFFFFFF)).astype(np.int64) % len(self.normal_ids)  # low 32 bits
            out[rand] = self.normal_ids[pick]
        labels = np.where(selected, src, IGNORE_INDEX)
        return {"input_ids": out, "labels": labels}


def attention_mask(ids: np.ndarray, pad_id: int) -> np.ndarray:
    return (ids != pad_id).astype(np.int64)


def mask_batch(masker: Masker, ids: np.ndarray, uids: np.ndarray, key: int, pad_id: int) -> Tuple[np.ndarray, ...]:
    m = masker(ids, uids, key)
    return m["input_ids"], attention_mask(ids, pad_id), m["labels"]
