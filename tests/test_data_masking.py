"""Dynamic MLM masking: statistics, special tokens, determinism (pure numpy, fast)."""

import numpy as np
import pytest

from scale_hyper.data.masking import IGNORE_INDEX, Masker, stream_key

V, MASK = 1000, 4
SPECIAL = [0, 1, 2, 3, 4]


def _batch(b=256, s=128, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, V, size=(b, s)).astype(np.uint16)
    ids[:, 0] = 2  # [CLS]
    ids[:, s // 2] = 3  # [SEP]
    ids[:8, s * 3 // 4 :] = 0  # padding at the end of a few rows
    return ids, np.arange(b, dtype=np.int64)


def test_masking_statistics():
    ids, uids = _batch()
    out = Masker(V, SPECIAL, MASK, 0.15)(ids, uids, stream_key(1, 0))
    src = ids.astype(np.int64)
    normal = ~np.isin(src, SPECIAL)
    sel = out["labels"] != IGNORE_INDEX
    assert not (sel & ~normal).any(), "a special token ([CLS]/[SEP]/[PAD]) was selected"
    assert (out["labels"][sel] == src[sel]).all()
    rate = sel.sum() / normal.sum()
    assert abs(rate - 0.15) < 0.01, rate
    masked = out["input_ids"][sel] == MASK
    kept = out["input_ids"][sel] == src[sel]
    random = ~masked & ~kept
    assert abs(masked.mean() - 0.8) < 0.02
    # a random replacement can hit the original id by chance (1/995): "kept" is ≈ 10 %
    assert abs(kept.mean() - 0.1) < 0.015 and abs(random.mean() - 0.1) < 0.015
    assert not np.isin(out["input_ids"][sel][random], SPECIAL).any()
    # unselected positions are untouched
    assert (out["input_ids"][~sel] == src[~sel]).all()


def test_masks_depend_on_sequence_identity_not_batching():
    ids, uids = _batch(b=64, s=32)
    m = Masker(V, SPECIAL, MASK)
    key = stream_key(7, 3)
    whole = m(ids, uids, key)
    halves = [m(ids[i : i + 16], uids[i : i + 16], key) for i in range(0, 64, 16)]
    for k in ("input_ids", "labels"):
        assert np.array_equal(whole[k], np.concatenate([h[k] for h in halves]))
    again = m(ids, uids, key)
    assert np.array_equal(whole["labels"], again["labels"])
    other_epoch = m(ids, uids, stream_key(7, 4))
    assert not np.array_equal(whole["labels"], other_epoch["labels"])
    other_seed = m(ids, uids, stream_key(8, 3))
    assert not np.array_equal(whole["labels"], other_seed["labels"])


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_mask_prob_is_honoured(p):
    ids, uids = _batch(b=128, s=64)
    out = Masker(V, SPECIAL, MASK, p)(ids, uids, stream_key(0, 0))
    normal = ~np.isin(ids, SPECIAL)
    rate = (out["labels"] != IGNORE_INDEX).sum() / normal.sum()
    assert abs(rate - p) < 0.015
