"""Corpora of many small files: slices are runs of whole files up to data.slice_bytes, so 2,000 files
of a few KB give about ceil(sequences / data.sequences_per_shard) training shards and a few
validation shards, with the same bytes from 1 and from 4 tasks (the benchmark's own measurement, at
a CI size: `scale-hyper bench prepare --files 100000` is the full case, docs/benchmarks.md). Also:
small and large files mixed, inputs that are not text, and corpora of the previous layout."""

import dataclasses
import gzip
import json
import os
import re
from collections import defaultdict

import pytest

from scale_hyper.config.schema import DataConfig
from scale_hyper.data import train_loader
from scale_hyper.prepare import ensure_prepared, sources
from scale_hyper.prepare import main as prepare
from scale_hyper.prepare.slices import PrepareError

SMALL = dict(vocab_size=512, seq_len=64, num_workers=0, prepare_workers=1, tokenizer_train_chars=300_000)


def test_two_thousand_small_files_give_full_shards_and_the_same_bytes_from_4_tasks():
    from scale_hyper.bench import small_files

    per = 256
    cfg = DataConfig(output="unused", sequences_per_shard=per, slice_bytes=400_000, **SMALL)
    r = small_files.measure(cfg, files=2000, seed=3, micro_batch_size=16, seconds=0.2, file_bytes=(200, 800))
    small, large = r["small"], r["large"]
    assert r["identical"], "1 task and 4 tasks wrote different bytes"
    assert 3 <= small["slices"] <= 5 and sum(small["slice_files"]) == 2000  # ~1.3 MB in slices of 400 kB
    assert max(small["slice_files"]) <= 400_000 / 200
    # training shards: ceil(n / per) per slice, so at most one more than the corpus-wide figure per slice
    t = small["train"]
    assert small["full_shards"] <= t["shards"] < small["full_shards"] + small["slices"]
    assert t["seq_median"] == per and t["seq_max"] == per
    assert 1 <= small["val"]["shards"] <= small["slices"], "validation: a few shards, not one per file"
    # the same text as one file: the same shape of output, and a loader that reads both
    assert abs(t["shards"] - large["train"]["shards"]) <= small["slices"]
    assert abs(small["tokens"] - large["tokens"]) < 0.01 * large["tokens"]
    assert small["loader_tokens_per_s"] > 0 and large["loader_tokens_per_s"] > 0


def _shards_by_slice(manifest, split):
    out = defaultdict(list)
    for s in manifest["splits"][split]["shards"]:
        out[int(re.match(r"\w+-(\d+)-", s["name"]).group(1))].append(s["sequences"])
    return out


def test_small_and_large_files_mixed(tmp_path):
    """Whole small files are joined until the next would pass data.slice_bytes; a larger file between
    them is cut into byte ranges and closes the run; the documents come in the corpus' order."""
    from pydoc_data.topics import topics

    docs = [" ".join(topics[k].split()) for k in sorted(topics)]
    short, long = [d for d in docs if len(d) < 1000], [d for d in docs if len(d) >= 1000]
    root = tmp_path / "c"
    root.mkdir()
    parts = {"a.txt": short[0:2], "b.txt": short[2:4], "c.jsonl.gz": short[4:6], "d.txt": long, "e.txt": short[6:8],
             "f.txt": short[8:10]}  # fmt: skip
    want = [d for part in parts.values() for d in part]
    for name, part in parts.items():
        if name.endswith(".gz"):
            with gzip.open(root / name, "wt") as f:
                f.write("".join(json.dumps({"text": d}) + "\n" for d in part))
        else:
            (root / name).write_text("\n\n".join(part) + "\n")
    cfg = DataConfig(output=str(tmp_path / "out"), source=str(root), slice_bytes=8192, max_documents=0,
                     min_shards=2, sequences_per_shard=64, **SMALL)  # fmt: skip
    plan = sources.plan_slices(cfg)
    big = -(-os.path.getsize(root / "d.txt") // 8192)
    assert [(s["kind"], s["files"]) for s in plan] == [("files", 3), *[("bytes", 1)] * big, ("files", 2)]
    assert plan[0]["paths"] == [[str(root / n), os.path.getsize(root / n)] for n in ("a.txt", "b.txt", "c.jsonl.gz")]
    assert all(s["bytes"] <= 8192 for s in plan if s["kind"] == "files")
    assert [d for s in plan for d in sources.slice_documents(cfg, s)] == want
    m = ensure_prepared(cfg, seed=1)
    assert m["slice_files"] == [s["files"] for s in plan] and m["loader_deal"] == "sequences"
    for split in ("train", "val"):  # full shards but the last of each slice
        for sizes_of_slice in _shards_by_slice(m, split).values():
            assert all(n == 64 for n in sizes_of_slice[:-1]) and 0 < sizes_of_slice[-1] <= 64
    assert f"from {len(plan)} slices ({5 + big} input files, 3 per slice at most)" in prepare.summary(m)


@pytest.mark.parametrize(
    "name, content, says",
    [("bin.txt", b"text\x00\x01\x02binary" * 40, r"bin\.txt is not a text file \(a NUL byte at offset 4\)"),
     # after good.txt, which alone trains the tokenizer: found by a slice in a worker process
     ("latin.txt", "plain line\ncaf\u00e9 cr\u00e8me\n".encode("latin-1"),
      r"latin\.txt is not UTF-8 text \(byte 0xe9 at offset 14\) — convert it to UTF-8"),
     ("broken.jsonl.gz", b"\x1f\x8b\x08\x00broken", r"broken\.jsonl\.gz is not a readable \.gz file"),
     ("fake.parquet", b"PAR1 not really", r"fake\.parquet is not a parquet file")],
    ids=["binary", "latin-1", "gzip", "parquet"],
)  # fmt: skip
def test_input_that_is_not_text_is_one_line_naming_the_file(tmp_path, capsys, name, content, says):
    from scale_hyper.config import load_config

    root = tmp_path / "c"
    root.mkdir()
    # 4,090 bytes: with any other file more than data.slice_bytes=4096, so a slice alone (2 slices, 2 processes)
    (root / "good.txt").write_text(("A document about nothing in particular.\n\n" * 100)[:4090])
    (root / name).write_bytes(content)
    out = tmp_path / "out"
    run = load_config([f"data.source={root}", f"data.output={out}", "data.vocab_size=512", "data.seq_len=64",
                       "data.tokenizer_train_chars=20", "data.slice_bytes=4096", "data.prepare_workers=2"])  # fmt: skip
    assert prepare.main(run) == 2
    err = capsys.readouterr().err
    assert re.search(says, err) and "remove it from data.source" in err, err
    assert err.count("\n") == 1 and err.startswith("scale-hyper: error: ") and "Traceback" not in err
    assert not (out / "manifest.json").exists()


def test_previous_layout_finished_loads_unfinished_is_refused(tmp_path):
    cfg = DataConfig(output=str(tmp_path / "d"), source="stdlib", max_documents=40, **SMALL)
    m = ensure_prepared(cfg, seed=1)
    # a finished corpus of the previous version: its manifest had no slice_files
    path = tmp_path / "d" / "manifest.json"
    old = json.loads(path.read_text())
    del old["slice_files"]
    path.write_text(json.dumps(old))
    again = ensure_prepared(cfg, seed=1)
    assert again["splits"] == m["splits"] and "slice_files" not in again
    assert prepare.summary(again).startswith(f"{again['location']}: ")
    # an unfinished one (no manifest) with a plan of the previous layout: refused with the command
    path.unlink()
    plan_path = tmp_path / "d" / "slices" / "plan.json"
    plan = json.loads(plan_path.read_text())
    del plan["version"]
    plan_path.write_text(json.dumps(plan))
    with pytest.raises(PrepareError, match=r"plan version 1.*`rm -r .*/d && scale-hyper prepare CONFIG`"):
        ensure_prepared(dataclasses.replace(cfg), seed=1)


# --- the loader over shards full but the last of each slice --------------------------------------

# 3 "slices" of 16-sequence shards whose last shard is short, as prepare writes them
SLICED = [16, 16, 16, 3, 16, 16, 5, 16, 16, 16, 16, 2]


def _sliced(out, deal=True):
    from test_data_loader import _synthetic

    manifest = _synthetic(out, SLICED)
    if deal:  # what prepare's merge writes (test_small_and_large_files_mixed checks it does)
        path = os.path.join(out, "manifest.json")
        doc = json.loads(open(path).read())
        doc["loader_deal"] = "sequences"
        open(path, "w").write(json.dumps(doc))
        from scale_hyper.data import load_manifest

        manifest = load_manifest(str(out))
    return manifest


@pytest.mark.parametrize("layouts, takes", [([(2, 4, 2)], [None]), ([(2, 4), (3, 4)], [5, None])],
                         ids=["2 ranks x 2 workers", "resumed 2 -> 3 ranks"])  # fmt: skip
def test_loader_cuts_unequal_shards_by_sequences(tmp_path, layouts, takes):
    """Every slot gets the same share: an epoch reads each sequence at most once and leaves fewer than
    R × W × B; whole shards dealt round-robin (earlier manifests) leave much more over."""
    from test_data_loader import _cfg, _read_epoch0

    total = sum(SLICED)
    read = _read_epoch0(_cfg(tmp_path / "d"), _sliced(tmp_path / "d"), layouts, takes)
    world, batch, workers = (*layouts[-1], 1)[:3]
    assert len(read) == len(set(read)), "a sequence was read twice in one epoch"
    assert total - len(read) < world * max(1, workers) * batch
    if len(layouts) == 1:
        old = _read_epoch0(_cfg(tmp_path / "rr"), _sliced(tmp_path / "rr", deal=False), layouts, takes)
        assert len(old) < len(read), (len(old), len(read))  # measured: 128 against 144 of 154


def test_loader_over_unequal_shards_resumes_exactly(tmp_path):
    from test_data_loader import _cfg, _same, _take

    manifest = _sliced(tmp_path / "d")
    cfg = _cfg(tmp_path / "d", num_workers=2)
    for rank in range(2):
        full = _take(train_loader(cfg, manifest, seed=2, rank=rank, world_size=2, micro_batch_size=4), 17)
        first = train_loader(cfg, manifest, seed=2, rank=rank, world_size=2, micro_batch_size=4)
        head = _take(first, 7)
        resumed = train_loader(cfg, manifest, seed=2, rank=rank, world_size=2, micro_batch_size=4,
                               state=first.state_dict())  # fmt: skip
        assert _same(head + _take(resumed, 10), full)
