"""The validation loader: a finite, deterministic, re-iterable set of masked batches per rank."""

from __future__ import annotations

import logging
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
import torch

from scale_hyper.data.loader import ShardReader, to_batch
from scale_hyper.data.masking import Masker, stream_key
from scale_hyper.data.plan import LoaderSpec, build_spec, check_world, with_location

log = logging.getLogger("scale_hyper.data")

_VAL_SEED = 0x5EED  # validation masks are fixed, independent of train.seed


class ValLoader:
    """A finite, deterministic, re-iterable list of validation batches for one rank.

    Sequence ``i`` of the validation split goes to rank ``i mod world_size``; every rank gets the
    same number of batches (``N // world_size`` sequences each, the last batch possibly smaller),
    capped by ``max_batches``. Masks are fixed (their own seed, epoch 0), so every evaluation of
    every run sees the same masked tokens. Read in the calling process, once, and kept in memory:
    only the shards needed for ``max_batches`` are read.
    """

    def __init__(self, spec: LoaderSpec, max_batches: Optional[int]):
        self.spec = spec
        total = sum(spec.counts)
        per_rank = total // spec.world_size
        n = -(-per_rank // spec.batch) if per_rank else 0
        if max_batches:
            n = min(n, int(max_batches))
        self.num_batches = n
        self.per_rank = min(per_rank, n * spec.batch)
        self._batches: Optional[List[Dict[str, torch.Tensor]]] = None
        if total and not per_rank:
            raise ValueError(f"{total} validation sequences cannot be shared by world_size={spec.world_size} ranks")
        if not total:
            log.warning("no validation data (data.val_fraction=0 or a tiny corpus): the validation loader is empty")

    def __len__(self) -> int:
        return self.num_batches

    def _load(self) -> List[Dict[str, torch.Tensor]]:
        sp = self.spec
        need = self.per_rank * sp.world_size  # global rows 0 .. need-1, strided by rank
        reader = ShardReader(sp, cache_size=1)
        rows, uids, have = [], [], 0
        for s in range(len(sp.counts)):
            if have >= need:
                break
            r, u = reader.read_or_substitute(s)
            rows.append(r)
            uids.append(u)
            have += len(r)
        ids = np.concatenate(rows)[:need][sp.rank :: sp.world_size]
        gid = np.concatenate(uids)[:need][sp.rank :: sp.world_size]
        masker = Masker(sp.vocab_size, sp.special.values(), sp.special["mask"], sp.mask_prob)
        key = stream_key(_VAL_SEED, 0, salt=1)
        out = []
        for j in range(self.num_batches):
            b_ids, b_uid = ids[j * sp.batch : (j + 1) * sp.batch], gid[j * sp.batch : (j + 1) * sp.batch]
            out.append(to_batch(masker(b_ids, b_uid, key), b_ids, sp.special["pad"]))
        return out

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        if self._batches is None:
            self._batches = self._load() if self.num_batches else []
        # fresh tensors each pass, so a caller that modifies a batch in place cannot change the next eval
        return iter([{k: v.clone() for k, v in b.items()} for b in self._batches])


def val_loader(
    data_cfg,
    manifest: Dict[str, Any],
    rank: int,
    world_size: int,
    micro_batch_size: int,
    max_batches: Optional[int] = None,
) -> ValLoader:
    """The validation batches of one rank (finite, deterministic, re-iterable; ``len()`` works)."""
    check_world(rank, world_size, micro_batch_size)
    manifest = with_location(data_cfg, manifest)
    spec = build_spec(data_cfg, manifest, "val", _VAL_SEED, rank, world_size, 1, micro_batch_size)
    return ValLoader(spec, max_batches)
