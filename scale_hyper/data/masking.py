"""Dynamic BERT masking, vectorised and reproducible without any RNG state.

Each token's random draw is a hash of (seed, epoch, global sequence id, position): a counter-based
generator (splitmix64 finalizer over uint64 arrays). So the mask of a sequence depends only on
which sequence it is and in which epoch — not on batch composition, worker count, world size or
how many batches came before — which is what makes resume exact and re-splits consistent.

Of the non-special positions, ``mask_prob`` are selected; of those 80 % become ``[MASK]``, 10 % a
random non-special token, 10 % stay unchanged. Labels are the original ids at selected positions
and -100 elsewhere. Special tokens ([PAD] [UNK] [CLS] [SEP] [MASK]) are never selected.

The selected positions also leave here as indices (``mlm_positions``: flat into [B × S], row-major,
i.e. the order of ``labels[labels != -100]``) with their labels (``mlm_labels``), padded with
position 0 / label -100 to a count fixed by the batch's shape (``prediction_slots``). The model
gathers its hidden states there with ``index_select``: no boolean indexing, no ``nonzero``, so no
device→host sync and no data-dependent shape on the training step.
"""

from __future__ import annotations

import math
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

    def prediction_slots(self, tokens: int) -> int:
        """How many predicted positions a batch of ``tokens`` tokens carries: the binomial selection count's
        mean + 6 standard deviations (exceeded once in ~10^9 batches), rounded up to a multiple of 8. A
        constant per batch shape, so the LM head's input shape never depends on the data."""
        p = self.t_sel / float(1 << 24)
        bound = tokens * p + 6.0 * math.sqrt(tokens * p * (1.0 - p))
        return _round_up(max(1, math.ceil(bound)), 8)

    def __call__(self, ids: np.ndarray, uids: np.ndarray, key: int) -> Dict[str, np.ndarray]:
        """``ids``: [B, S] uint16/32; ``uids``: [B] global sequence ids. Returns int64 arrays: input_ids and
        labels [B, S], mlm_positions and mlm_labels [prediction_slots(B × S)] (more only in a batch that
        selected more, so no prediction is ever dropped)."""
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
        where = np.flatnonzero(selected)
        slots = max(self.prediction_slots(b * s), _round_up(len(where), 8))
        positions = np.zeros(slots, dtype=np.int64)
        positions[: len(where)] = where
        mlm_labels = np.full(slots, IGNORE_INDEX, dtype=np.int64)
        mlm_labels[: len(where)] = src.reshape(-1)[where]
        return {"input_ids": out, "labels": labels, "mlm_positions": positions, "mlm_labels": mlm_labels}


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def attention_mask(ids: np.ndarray, pad_id: int) -> np.ndarray:
    return (ids != pad_id).astype(np.int64)


def mask_batch(masker: Masker, ids: np.ndarray, uids: np.ndarray, key: int, pad_id: int) -> Tuple[np.ndarray, ...]:
    m = masker(ids, uids, key)
    return m["input_ids"], attention_mask(ids, pad_id), m["labels"]
