"""data.mixture: weighted mixtures of prepared datasets, mixed per sequence at load time.

Synthetic sources carry their sequences' ids (tokens 1 and 2, see test_data_loader), source b's ids
start at 50 000, so each sequence's source and identity are read back from a batch. The bad-input
and end-to-end tests use shards made by the real `prepare`.
"""

import dataclasses
import logging
import subprocess
import sys

import numpy as np
import pytest
from test_data_loader import _ids, _same, _take

from scale_hyper.config import load_config
from scale_hyper.config.model import ConfigError
from scale_hyper.config.schema import DataConfig, MixtureSource
from scale_hyper.data import resplit_cursor, train_loader
from scale_hyper.data import shards as shardlib
from scale_hyper.prepare import ensure_prepared
from scale_hyper.prepare.shard_writer import write_arrays

V, S, B_OFFSET, C_OFFSET = 1000, 16, 50_000, 100_000


def _source(out, sizes, offset, seed):
    rng = np.random.default_rng(seed)
    parts, gid = [], offset
    for n in sizes:
        rows = rng.integers(5, V, size=(n, S))
        g = np.arange(gid, gid + n)
        rows[:, 0], rows[:, 1], rows[:, 2] = 2, 5 + g % 900, 5 + g // 900
        parts.append(rows)
        gid += n
    return write_arrays(str(out), {"train": parts}, V, sequences_per_block=8)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("mix")
    _source(d / "a", [32] * 8, 0, 0)  # 256 sequences
    _source(d / "b", [16] * 6, B_OFFSET, 1)  # 96: runs out first
    _source(d / "c", [24] * 8, C_OFFSET, 2)
    return d


def _cfg(d, weights=(0.7, 0.3), names="abc", **kw):
    mix = [MixtureSource(str(d / n), w) for n, w in zip(names, weights, strict=False)]
    return DataConfig(output=str(d / "unused"), seq_len=S, mixture=mix, **{"num_workers": 0, **kw})


def _source_of(i):
    return 2 if i >= C_OFFSET else 1 if i >= B_OFFSET else 0


def test_proportions_hold_in_every_window_of_100_batches(sources):
    for weights, world, batch in (((0.7, 0.3), 1, 8), ((0.5, 0.3, 0.2), 2, 4), ((0.9, 0.1), 1, 2)):
        cfg = _cfg(sources, weights, num_workers=2 if world == 1 else 0)
        for rank in range(world):
            ids = [_ids(b) for b in _take(train_loader(cfg, None, 7, rank, world, batch), 250)]
            for lo in range(0, 151):
                window = [_source_of(i) for b in ids[lo : lo + 100] for i in b]
                share = np.bincount(window, minlength=len(weights)) / len(window)
                assert np.abs(share - np.asarray(weights)).max() <= 0.02, (weights, lo, share)


def test_a_source_that_runs_out_starts_its_next_epoch(sources, caplog):
    caplog.set_level(logging.INFO, logger="scale_hyper.data")
    loader = train_loader(_cfg(sources), None, seed=3, rank=0, world_size=1, micro_batch_size=8)
    b = [i for batch in _take(loader, 100) for i in _ids(batch) if i >= B_OFFSET]  # 240 of b: 2.5 epochs of 96
    assert sorted(b[:96]) == sorted(b[96:192]) == list(range(B_OFFSET, B_OFFSET + 96)), "each epoch covers b once"
    assert b[:96] != b[96:192], "a new epoch has a new order"
    assert "data.mixture[1] (" in caplog.text and "ran out: starting its epoch 2" in caplog.text
    assert loader.state_dict()["sources"][1][0] == 2


@pytest.mark.parametrize("stop", [5, 23, 41])  # 41: past source b's first epoch end (at batch 40)
def test_resume_continues_the_identical_stream(sources, stop):
    cfg = _cfg(sources, num_workers=2)
    full = _take(train_loader(cfg, None, seed=5, rank=1, world_size=2, micro_batch_size=4), 60)
    first = train_loader(cfg, None, seed=5, rank=1, world_size=2, micro_batch_size=4)
    head = _take(first, stop)
    resumed = train_loader(cfg, None, seed=5, rank=1, world_size=2, micro_batch_size=4, state=first.state_dict())
    assert _same(head + _take(resumed, 60 - stop), full)


@pytest.mark.parametrize("layouts", [((2, 4), (1, 4)), ((1, 4), (2, 2)), ((2, 4, 2), (1, 8))])
def test_another_world_size_resplits_each_source(sources, layouts):
    """Stopped before any source's epoch ends, resumed on another (world, micro[, workers]): within each
    source's epoch no sequence is read twice."""
    cfg, saved, read = _cfg(sources), None, []
    for (world, micro, *workers), take in zip(layouts, (9, 6), strict=True):
        c = dataclasses.replace(cfg, num_workers=(workers or [0])[0])
        loaders = [
            train_loader(c, None, 2, r, world, micro, state=resplit_cursor(saved, r, world) if saved else None)
            for r in range(world)
        ]
        for ld in loaders:
            read += [i for b in _take(ld, take) for i in _ids(b)]
        saved = [ld.state_dict() for ld in loaders]
    assert len(read) == len(set(read)), "a sequence was read twice in its source's epoch"
    assert {_source_of(i) for i in read} == {0, 1}


def test_cursor_of_other_data_is_refused(sources):
    a = train_loader(_cfg(sources), None, seed=1, rank=0, world_size=1, micro_batch_size=4)
    _take(a, 2)
    with pytest.raises(ValueError, match="not this data.mixture"):
        train_loader(_cfg(sources, names="ac"), None, seed=1, rank=0, world_size=1, micro_batch_size=4,
                     state=a.state_dict())  # fmt: skip


def test_weight_must_be_positive():
    for bad in ("0", "-0.5"):
        with pytest.raises(ConfigError, match=r"data\.mixture\[1\]\.weight=.* must be > 0"):
            load_config([f"data.mixture=[{{output: a, weight: 1}}, {{output: b, weight: {bad}}}]"])
    cfg = load_config(["data.mixture=[{output: a, weight: 0.7}, {output: b, weight: 0.3}]"])
    assert [(m.output, m.weight) for m in cfg.data.mixture] == [("a", 0.7), ("b", 0.3)]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Three real prepares of the stdlib corpus: x, y with x's tokenizer (mixable), z with its own."""
    d = tmp_path_factory.mktemp("prep")
    small = dict(vocab_size=256, seq_len=32, min_shards=4, prepare_workers=1)
    ensure_prepared(DataConfig(output=str(d / "x"), max_documents=40, **small), seed=0)
    ensure_prepared(DataConfig(output=str(d / "y"), max_documents=60, tokenizer=str(d / "x" / "tokenizer"), **small))
    ensure_prepared(DataConfig(output=str(d / "z"), max_documents=50, **{**small, "vocab_size": 300}), seed=0)
    return d


def test_sources_with_different_tokenizers_are_refused(prepared):
    cfg = DataConfig(seq_len=32, mixture=[MixtureSource(str(prepared / n), 1.0) for n in "xz"])
    with pytest.raises(ValueError, match=r"data\.mixture\[0\]\.output=.*/x and data\.mixture\[1\]\.output=.*/z "
                                         r"differ in tokenizer, vocab_size.* — prepare every source"):  # fmt: skip
        train_loader(cfg, None, seed=0, rank=0, world_size=1, micro_batch_size=4)


@pytest.mark.slow
def test_mixture_error_through_the_cli(prepared):
    proc = subprocess.run(
        [sys.executable, "-m", "scale_hyper", "train", f"data.mixture=[{{output: {prepared}/x}}, {{output: {prepared}/z}}]",
         "data.seq_len=32", "data.vocab_size=256", f"train.output_dir={prepared}/run"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("scale-hyper: error: data.mixture[0].output=") and "differ in tokenizer" in line


def test_real_prepared_sources_mix(prepared):
    cfg = DataConfig(seq_len=32, num_workers=1, mixture=[MixtureSource(str(prepared / "x"), 0.6),
                                                          MixtureSource(str(prepared / "y"), 0.4)])  # fmt: skip
    loader = train_loader(cfg, None, seed=0, rank=0, world_size=2, micro_batch_size=8)
    batches = _take(loader, 6)  # through a real DataLoader worker process
    assert all(b["input_ids"].shape == (8, 32) for b in batches)
    again = train_loader(
        dataclasses.replace(cfg, num_workers=0), None, seed=0, rank=0, world_size=2, micro_batch_size=8
    )
    assert _same(batches, _take(again, 6))


# The 2-rank DeepSpeed training over a mixture, interrupted and resumed with equal losses, runs from the
# S3-compatible store in tests/test_s3.py (test_two_ranks_train_on_a_mixture_from_s3_...): one copy of that
# slow test, not two.


def test_a_mixture_runs_tokenizer_is_its_first_sources(prepared, tmp_path):
    """Export and eval load the run's tokenizer from its DataConfig: with a mixture, data.output holds
    nothing (it keeps its default), so the first source's tokenizer must stand for the run."""
    from scale_hyper.data.tokenizer import load_tokenizer

    cfg = DataConfig(seq_len=32, output=str(tmp_path / "nothing-here"),
                     mixture=[MixtureSource(str(prepared / "x"), 0.6), MixtureSource(str(prepared / "y"), 0.4)])  # fmt: skip
    first = shardlib.load_manifest(str(prepared / "x"))
    assert first is not None
    assert load_tokenizer(cfg).get_vocab() == load_tokenizer({**first, "location": str(prepared / "x")}).get_vocab()
