"""The streaming MLM loaders: coverage across ranks × workers, exact resume, re-splits, bad input.

Most tests use synthetic shards whose sequences carry their own global id (tokens 1 and 2), so
coverage can be checked exactly; masking is undone with the labels.
"""

import collections
import dataclasses
import io
import logging
import tarfile

import numpy as np
import pytest
import torch

from scale_hyper.config.schema import DataConfig
from scale_hyper.data import resplit_cursor, train_loader, val_loader
from scale_hyper.data import shards as shardlib
from scale_hyper.prepare import ensure_prepared
from scale_hyper.prepare.shard_writer import write_arrays

V, S = 1000, 16


def _synthetic(out, sizes, val_sizes=(), seed=0):
    rng = np.random.default_rng(seed)
    gid = 0
    arrays = {"train": [], "val": []}
    for split, szs in (("train", sizes), ("val", val_sizes)):
        for n in szs:
            rows = rng.integers(5, V, size=(n, S))
            g = np.arange(gid, gid + n)
            rows[:, 0], rows[:, 1], rows[:, 2] = 2, 5 + g % 900, 5 + g // 900
            arrays[split].append(rows)
            gid += n
    if not val_sizes:
        del arrays["val"]
    return write_arrays(str(out), arrays, V, sequences_per_block=8)


def _cfg(out, **kw):
    return DataConfig(output=str(out), **{"num_workers": 0, **kw})


def _ids(batch):
    """Global ids of a batch's sequences (masking undone through the labels)."""
    lab, inp = batch["labels"].numpy(), batch["input_ids"].numpy()
    orig = np.where(lab != -100, lab, inp)
    return list((orig[:, 1] - 5) + 900 * (orig[:, 2] - 5))


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x[k], y[k]) for x, y in zip(a, b, strict=False) for k in x)


@pytest.fixture
def synth(tmp_path):
    # 10 shards × 16: 4 slots get 2 whole shards each plus a quarter of the 2 tail shards (40 sequences)
    return _synthetic(tmp_path / "d", [16] * 10), tmp_path / "d"


def test_two_ranks_two_workers_cover_each_sequence_once_per_epoch(synth):
    manifest, out = synth
    cfg = _cfg(out, num_workers=2)
    per_epoch = {0: [], 1: []}
    for rank in range(2):
        loader = train_loader(cfg, manifest, seed=3, rank=rank, world_size=2, micro_batch_size=8)
        assert loader.batches_per_epoch == 10
        batches = _take(loader, 20)  # two epochs, through real DataLoader worker processes
        assert loader.state_dict()["epoch"] == 2
        for i, b in enumerate(batches):
            assert b["input_ids"].shape == (8, S) and b["input_ids"].dtype == torch.long
            assert b["labels"].dtype == torch.long
            pads = b["input_ids"] == 0  # [PAD]: a mask exactly when the batch has padding
            assert ("attention_mask" in b) == bool(pads.any())
            if "attention_mask" in b:
                assert b["attention_mask"].dtype == torch.long and torch.equal(b["attention_mask"] == 0, pads)
            per_epoch[i // 10] += _ids(b)
    for epoch in (0, 1):
        assert sorted(per_epoch[epoch]) == list(range(160)), f"epoch {epoch} is not an exact cover"
    assert per_epoch[0] != per_epoch[1], "the order must change between epochs"


def test_attention_mask_only_for_batches_with_padding(tmp_path):
    rows = np.random.default_rng(0).integers(5, V, size=(32, S))
    rows[3, S - 5 :] = 0  # one padded sequence (the packer pads only a split's last one)
    manifest = write_arrays(str(tmp_path / "d"), {"train": [rows]}, V, sequences_per_block=8)
    loader = train_loader(_cfg(tmp_path / "d"), manifest, seed=0, rank=0, world_size=1, micro_batch_size=8)
    batches = _take(loader, loader.batches_per_epoch)
    padded = [b for b in batches if (b["input_ids"] == 0).any()]
    assert len(padded) == 1 and all("attention_mask" not in b for b in batches if b is not padded[0])
    assert torch.equal(padded[0]["attention_mask"], (padded[0]["input_ids"] != 0).long())


def test_uneven_data_gives_every_rank_the_same_batch_count(tmp_path):
    sizes = [23, 17, 31, 29, 30, 19, 25]
    manifest = _synthetic(tmp_path / "d", sizes)
    cfg = _cfg(tmp_path / "d", num_workers=1)
    seen, counts = [], set()
    for rank in range(3):
        loader = train_loader(cfg, manifest, seed=0, rank=rank, world_size=3, micro_batch_size=4)
        n = loader.batches_per_epoch
        counts.add(n)
        for b in _take(loader, n):
            seen += _ids(b)
        assert loader.state_dict()["epoch"] == 1
    assert len(counts) == 1
    assert len(seen) == len(set(seen)), "a sequence was served twice in one epoch"
    assert sum(sizes) - len(seen) < 3 * 4 + 3 * max(sizes) - 3 * min(sizes), "too many sequences dropped"


@pytest.mark.parametrize("stop", [7, 10, 13])  # odd: worker order must rotate; 10: an epoch boundary
def test_resume_is_exact(synth, stop):
    manifest, out = synth
    cfg = _cfg(out, num_workers=2)
    for rank in range(2):
        full = _take(train_loader(cfg, manifest, seed=11, rank=rank, world_size=2, micro_batch_size=8), 25)
        first = train_loader(cfg, manifest, seed=11, rank=rank, world_size=2, micro_batch_size=8)
        head = _take(first, stop)
        state = first.state_dict()
        assert state["batches"] == stop and state["batches_in_epoch"] == stop % 10
        resumed = train_loader(cfg, manifest, seed=11, rank=rank, world_size=2, micro_batch_size=8, state=state)
        tail = _take(resumed, 25 - stop)
        assert _same(head + tail, full)


def test_cursor_is_rank_independent_and_checked(synth):
    manifest, out = synth
    cfg = _cfg(out)
    loaders = [train_loader(cfg, manifest, seed=1, rank=r, world_size=2, micro_batch_size=8) for r in range(2)]
    for ld in loaders:
        _take(ld, 3)
    assert loaders[0].state_dict() == loaders[1].state_dict()
    with pytest.raises(ValueError, match="train.seed=1"):
        train_loader(cfg, manifest, seed=2, rank=0, world_size=2, micro_batch_size=8, state=loaders[0].state_dict())
    other = _synthetic(out.parent / "other", [16] * 10, seed=1)
    with pytest.raises(ValueError, match="different shards"):
        train_loader(cfg, other, seed=1, rank=0, world_size=2, micro_batch_size=8, state=loaders[0].state_dict())


def _read_epoch0(cfg, manifest, layouts, takes):
    """Read epoch 0 through a chain of layouts [(world, micro), ...], taking ``takes[i]`` batches per rank
    in layout i (None: to the end of the epoch), resuming each from the cursors the previous one saved.
    Returns the global ids read, in order."""
    read, saved = [], None
    for layout, take in zip(layouts, takes, strict=True):
        world, batch, workers = (*layout, 0)[:3]  # (world, micro[, data.num_workers])
        cfg = dataclasses.replace(cfg, num_workers=workers)
        loaders = []
        for r in range(world):
            state = resplit_cursor(saved, rank=r, world_size=world) if saved else None
            loaders.append(train_loader(cfg, manifest, seed=4, rank=r, world_size=world, micro_batch_size=batch,
                                        state=state))  # fmt: skip
        its = [iter(ld) for ld in loaders]
        n = 0
        while (take is None or n < take) and loaders[0].state_dict()["epoch"] == 0:
            for it in its:
                read += _ids(next(it))
            n += 1
        saved = [ld.state_dict() for ld in loaders]  # what the trainer gathers into the checkpoint
    return read


# (layouts as (world, micro), batches per rank taken in each before the next resume); 256 sequences in
# 16 shards of 16. Measured: re-splitting reads no sequence twice in the epoch and skips only the end-of-
# epoch remainder, fewer than new world × workers × micro sequences (the uninterrupted run skips its own).
RESPLITS = {
    "2->1": ([(2, 4), (1, 4)], [13, None]),
    "1->2": ([(1, 4), (2, 4)], [21, None]),
    "2->4": ([(2, 4), (4, 4)], [13, None]),
    "2->4 (micro 4->2)": ([(2, 4), (4, 2)], [13, None]),
    "micro 4->3 (same world)": ([(2, 4), (2, 3)], [9, None]),
    "2->3->1 (chained)": ([(2, 4), (3, 4), (1, 2)], [5, 7, None]),
    "2x2 workers->1x1": ([(2, 4, 2), (1, 4)], [11, None]),  # DataLoader worker processes, odd batch count
    "1->2x2 workers": ([(1, 4), (2, 4, 2)], [9, None]),
}


@pytest.mark.parametrize("case", list(RESPLITS))
def test_resume_with_another_layout_resplits_at_sample_granularity(tmp_path, case):
    layouts, takes = RESPLITS[case]
    manifest = _synthetic(tmp_path / "d", [16] * 16)
    cfg = _cfg(tmp_path / "d")
    read = _read_epoch0(cfg, manifest, layouts, takes)
    repeated = len(read) - len(set(read))
    skipped = 256 - len(set(read))
    world, batch, workers = (*layouts[-1], 1)[:3]
    assert repeated == 0, f"{case}: {repeated} sequences read twice"
    assert skipped < world * max(1, workers) * batch, f"{case}: {skipped} sequences skipped"
    straight = _read_epoch0(cfg, manifest, layouts[-1:], [None])  # the same epoch without interruption
    assert len(straight) == len(set(straight)) and 256 - len(straight) < world * max(1, workers) * batch


def test_resume_after_a_resplit_is_exact(tmp_path):
    """A re-split epoch resumed again at the same layout continues with exactly the same batches."""
    manifest = _synthetic(tmp_path / "d", [16] * 16)
    cfg = _cfg(tmp_path / "d")
    old = [train_loader(cfg, manifest, seed=4, rank=r, world_size=2, micro_batch_size=4) for r in range(2)]
    for ld in old:
        _take(ld, 5)
    state = resplit_cursor([ld.state_dict() for ld in old], rank=0, world_size=1)
    a = train_loader(cfg, manifest, seed=4, rank=0, world_size=1, micro_batch_size=4, state=state)
    first = _take(a, 3)
    assert a.state_dict()["resplits"] == [[2, 1, 4, 5, 4, 1024]]  # + data.shards_per_worker, data.shuffle_buffer
    b = train_loader(cfg, manifest, seed=4, rank=0, world_size=1, micro_batch_size=4, state=a.state_dict())
    c = train_loader(cfg, manifest, seed=4, rank=0, world_size=1, micro_batch_size=4, state=state)
    assert _same(_take(b, 60), _take(c, 63)[3:])  # across the epoch boundary too
    assert _same(
        first, _take(train_loader(cfg, manifest, seed=4, rank=0, world_size=1, micro_batch_size=4, state=state), 3)
    )


def test_fewer_shards_than_readers_is_a_clear_error(tmp_path):
    manifest = _synthetic(tmp_path / "d", [16] * 3)
    with pytest.raises(ValueError, match=r"3 training shard.*world_size=2 × data.num_workers=2 = 4.*min_shards"):
        train_loader(_cfg(tmp_path / "d", num_workers=2), manifest, seed=0, rank=0, world_size=2, micro_batch_size=4)


def test_corrupt_shard_is_skipped_or_fails(tmp_path, caplog):
    manifest = _synthetic(tmp_path / "d", [16] * 4)
    path = tmp_path / "d" / "train-000001.tar"
    path.write_bytes(path.read_bytes()[:700])  # truncated mid-member
    with pytest.raises(shardlib.CorruptShardError, match="train-000001.tar"):
        _take(
            train_loader(
                _cfg(tmp_path / "d", on_corrupt="fail"), manifest, seed=0, rank=0, world_size=1, micro_batch_size=8
            ),
            8,
        )
    caplog.set_level(logging.WARNING, logger="scale_hyper.data")
    loader = train_loader(
        _cfg(tmp_path / "d", on_corrupt="skip"), manifest, seed=0, rank=0, world_size=1, micro_batch_size=8
    )
    assert loader.batches_per_epoch == 8
    ids = [i for b in _take(loader, 8) for i in _ids(b)]
    assert len(ids) == 64 and not set(range(16, 32)) & set(ids), "the corrupt shard's rows are gone"
    assert "skipping corrupt shard (1 so far" in caplog.text and "train-000001.tar" in caplog.text


def test_out_of_range_ids_and_pickles_are_refused(tmp_path):
    bad = np.full((16, S), 7)
    bad[3, 5] = V + 5
    manifest = write_arrays(str(tmp_path / "d"), {"train": [np.full((16, S), 6), bad]}, V)
    with pytest.raises(ValueError, match=r"shard train-000001.tar: token id 1005 is outside the vocabulary"):
        _take(
            train_loader(
                _cfg(tmp_path / "d", on_corrupt="skip"), manifest, seed=0, rank=0, world_size=1, micro_batch_size=16
            ),
            2,
        )
    # an object array needs pickle: never loaded, the shard counts as corrupt
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.array([[object()] * S] * 16, dtype=object), allow_pickle=True)
    with tarfile.open(tmp_path / "d" / "train-000001.tar", "w") as tf:
        info = tarfile.TarInfo("train-000001-000000.npy")
        info.size = len(buf.getvalue())
        tf.addfile(info, io.BytesIO(buf.getvalue()))
    with pytest.raises(shardlib.CorruptShardError, match="train-000001.tar"):
        shardlib.read_shard(
            str(tmp_path / "d" / "train-000001.tar"),
            name="train-000001.tar",
            dtype="uint16",
            seq_len=S,
            sequences=16,
            vocab_size=V,
            sequences_per_block=64,
        )


def test_manifest_cannot_smuggle_urls(tmp_path):
    _synthetic(tmp_path / "d", [8, 8])
    raw = (tmp_path / "d" / "manifest.json").read_text()
    for evil in ("pipe:touch /tmp/pwned", "../../etc/passwd.tar", "s3://x/y.tar"):
        (tmp_path / "d" / "manifest.json").write_text(raw.replace("train-000001.tar", evil))
        with pytest.raises(ValueError, match="unexpected name"):
            shardlib.load_manifest(str(tmp_path / "d"))


def test_pipe_urls_need_allow_pipe(tmp_path):
    manifest = _synthetic(tmp_path / "d", [8] * 4)
    url = f"pipe:cat {tmp_path / 'd'}/{{name}}"
    with pytest.raises(ValueError, match=r"data\.allow_pipe=true"):
        ensure_prepared(_cfg(url))
    with pytest.raises(ValueError, match=r"data\.allow_pipe=true"):
        shardlib.load_manifest(url)
    cfg = _cfg(url, allow_pipe=True)
    piped = shardlib.load_manifest(url, allow_pipe=True)  # the manifest itself comes through the pipe
    assert piped["splits"] == manifest["splits"] and piped["location"] == url
    a = _take(train_loader(cfg, piped, seed=0, rank=0, world_size=1, micro_batch_size=4), 8)
    b = _take(train_loader(_cfg(tmp_path / "d"), manifest, seed=0, rank=0, world_size=1, micro_batch_size=4), 8)
    assert _same(a, b)


def test_val_loader_is_finite_deterministic_and_split_by_rank(tmp_path):
    manifest = _synthetic(tmp_path / "d", [16] * 4, val_sizes=[10, 9])
    cfg = _cfg(tmp_path / "d")
    loaders = [val_loader(cfg, manifest, rank=r, world_size=2, micro_batch_size=4) for r in range(2)]
    assert [len(v) for v in loaders] == [3, 3]  # 19 // 2 = 9 each: batches of 4, 4, 1
    ids = [[i for b in v for i in _ids(b)] for v in loaders]
    assert not set(ids[0]) & set(ids[1]) and len(ids[0]) == len(ids[1]) == 9
    assert min(ids[0] + ids[1]) >= 64, "validation sequences only"
    assert _same(list(loaders[0]), list(loaders[0]))  # re-iterable, same masks
    assert _same(list(loaders[0]), list(val_loader(cfg, manifest, rank=0, world_size=2, micro_batch_size=4)))
    assert len(val_loader(cfg, manifest, rank=0, world_size=2, micro_batch_size=4, max_batches=2)) == 2


def test_prepared_stdlib_end_to_end_with_spawned_workers(tmp_path):
    """Real corpus, two ranks: equal batch counts, disjoint sequences, spawn-safe workers."""
    cfg = DataConfig(
        output=str(tmp_path / "d"),
        max_documents=40,
        vocab_size=256,
        seq_len=32,
        min_shards=4,
        prepare_workers=1,
        num_workers=1,
    )
    manifest = ensure_prepared(cfg, seed=0)
    batches = []
    for rank in range(2):
        ctx = "spawn" if rank == 0 else None
        loader = train_loader(
            cfg, manifest, seed=0, rank=rank, world_size=2, micro_batch_size=16, multiprocessing_context=ctx
        )
        batches.append(_take(loader, 3))
    plain = _take(
        train_loader(
            dataclasses.replace(cfg, num_workers=0), manifest, seed=0, rank=0, world_size=2, micro_batch_size=16
        ),
        3,
    )
    assert _same(batches[0], plain), "a spawned worker yields what the in-process iterator yields"
    rows = [
        tuple(r)
        for bs in batches
        for b in bs
        for r in torch.where(b["labels"] != -100, b["labels"], b["input_ids"]).tolist()
    ]
    assert all(r[0] == 2 for r in rows)
    assert collections.Counter(rows).most_common(1)[0][1] <= 2  # ranks read different data


def test_http_shards_through_curl(tmp_path):
    import functools
    import http.server
    import threading

    manifest = _synthetic(tmp_path / "d", [8] * 4)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "d"))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        remote = shardlib.load_manifest(url)
        assert remote["splits"] == manifest["splits"]
        a = _take(train_loader(_cfg(url), remote, seed=0, rank=0, world_size=1, micro_batch_size=4), 8)
        b = _take(train_loader(_cfg(tmp_path / "d"), manifest, seed=0, rank=0, world_size=1, micro_batch_size=4), 8)
        assert _same(a, b)
    finally:
        server.shutdown()


def _shard_of(ids, sizes):
    return set(np.searchsorted(np.cumsum(sizes), ids, side="right").tolist())


@pytest.mark.parametrize("workers,buffer", [(0, 0), (0, 1024), (2, 64)])
def test_every_micro_batch_mixes_at_least_four_shards(tmp_path, workers, buffer):
    """data.shards_per_worker=4: a worker with ≥ 4 shards puts sequences of ≥ 4 shards in every micro-batch."""
    sizes = [32] * 16  # 1 rank: 16 (or 2 × 8) shards per worker
    manifest = _synthetic(tmp_path / "d", sizes)
    cfg = _cfg(tmp_path / "d", num_workers=workers, shuffle_buffer=buffer)
    loader = train_loader(cfg, manifest, seed=9, rank=0, world_size=1, micro_batch_size=8)
    batches = _take(loader, 2 * loader.batches_per_epoch)
    assert min(len(_shard_of(_ids(b), sizes)) for b in batches) >= 4
    assert sorted(i for b in batches[: loader.batches_per_epoch] for i in _ids(b)) == list(range(512))
    one = train_loader(_cfg(tmp_path / "d", shards_per_worker=1, shuffle_buffer=0), manifest, 9, 0, 1, 8)
    assert max(len(_shard_of(_ids(b), sizes)) for b in _take(one, 64)) <= 2, "without mixing: one shard (two at a seam)"


@pytest.mark.parametrize("stop", [7, 30, 35])
def test_resume_is_exact_with_small_shuffle_windows(tmp_path, stop):
    manifest = _synthetic(tmp_path / "d", [20] * 9 + [13])
    cfg = _cfg(tmp_path / "d", num_workers=2, shuffle_buffer=12, shards_per_worker=3)  # windows of 4 per lane
    full = _take(train_loader(cfg, manifest, seed=2, rank=0, world_size=1, micro_batch_size=5), 50)
    first = train_loader(cfg, manifest, seed=2, rank=0, world_size=1, micro_batch_size=5)
    head = _take(first, stop)
    resumed = train_loader(cfg, manifest, seed=2, rank=0, world_size=1, micro_batch_size=5, state=first.state_dict())
    assert _same(head + _take(resumed, 50 - stop), full)


@pytest.mark.parametrize("case", ["2->1", "2x2 workers->1x1", "2->3->1 (chained)"])
def test_resplit_with_small_shuffle_windows(tmp_path, case):
    layouts, takes = RESPLITS[case]
    manifest = _synthetic(tmp_path / "d", [16] * 16)
    read = _read_epoch0(_cfg(tmp_path / "d", shuffle_buffer=8, shards_per_worker=2), manifest, layouts, takes)
    world, batch, workers = (*layouts[-1], 1)[:3]
    assert len(read) == len(set(read)) and 256 - len(read) < world * max(1, workers) * batch


def test_cursor_from_before_mixing_resumes_without_repeats(tmp_path):
    """A cursor saved without data.shards_per_worker/shuffle_buffer was read one shard at a time: it is
    re-split onto the mixing layout (none read twice)."""
    manifest = _synthetic(tmp_path / "d", [16] * 16)
    old = train_loader(_cfg(tmp_path / "d", shards_per_worker=1, shuffle_buffer=0), manifest, 4, 0, 1, 4)
    read = [i for b in _take(old, 13) for i in _ids(b)]
    state = {k: v for k, v in old.state_dict().items() if k not in ("shards_per_worker", "shuffle_buffer")}
    new = train_loader(_cfg(tmp_path / "d"), manifest, 4, 0, 1, 4, state=state)
    read += [i for b in _take(new, new.batches_per_epoch) for i in _ids(b)]
    assert len(read) == len(set(read)) and len(read) > 250
