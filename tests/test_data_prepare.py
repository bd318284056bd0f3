"""`prepare`: corpus → tokenizer → shards + manifest; reproducibility, idempotency, formats, sources."""

import dataclasses
import glob
import gzip
import json
import os
import tarfile

import numpy as np
import pytest

from scale_hyper.config.schema import DataConfig
from scale_hyper.data import check_vocab, load_tokenizer
from scale_hyper.data import shards as shardlib
from scale_hyper.prepare import ensure_prepared

SMALL = dict(source="stdlib", max_documents=100, vocab_size=512, seq_len=64, prepare_workers=2, num_workers=0)


def _cfg(out, **kw) -> DataConfig:
    return DataConfig(output=str(out), **{**SMALL, **kw})


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    cfg = _cfg(tmp_path_factory.mktemp("stdlib") / "data")
    return cfg, ensure_prepared(cfg, seed=5)


def _files(root):
    return {
        os.path.relpath(p, root): open(p, "rb").read()
        for p in glob.glob(os.path.join(root, "**", "*"), recursive=True)
        if os.path.isfile(p)
    }


def _rows(manifest, split="train"):
    loc = manifest["location"]
    return [
        shardlib.read_shard(
            os.path.join(loc, s["name"]),
            name=s["name"],
            dtype=manifest["dtype"],
            seq_len=manifest["seq_len"],
            sequences=s["sequences"],
            vocab_size=manifest["vocab_size"],
            sequences_per_block=manifest["sequences_per_block"],
        )
        for s in manifest["splits"][split]["shards"]
    ]


def test_manifest_and_packing(prepared):
    cfg, m = prepared
    assert m["seq_len"] == 64 and m["dtype"] == "uint16" and m["vocab_size"] <= 512
    assert m["special_tokens"] == {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
    train = m["splits"]["train"]
    assert len(train["shards"]) == cfg.min_shards  # a small corpus is still cut into min_shards shards
    sizes = m["sequences_per_shard"]["train"]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == train["sequences"]
    for s in train["shards"]:
        assert set(s) >= {"name", "sequences", "bytes", "sha256", "tokens"}
        assert os.path.getsize(os.path.join(m["location"], s["name"])) == s["bytes"]
    assert m["documents"]["val"] == 2 and m["splits"]["val"]["sequences"] > 0  # 2 % of 100 documents
    rows = np.concatenate(_rows(m))
    assert (rows[:, 0] == 2).all(), "every sequence starts with [CLS]"
    assert (rows == 3).sum() >= m["documents"]["train"] - 1, "document boundaries are marked with [SEP]"
    assert int((rows != 0).sum()) == train["tokens"]
    assert (rows == 0).sum() < 64, "only the last sequence of a split is padded"
    assert rows.max() < m["vocab_size"]


def test_byte_identical_across_runs_and_worker_counts(prepared, tmp_path):
    cfg, m = prepared
    again = ensure_prepared(dataclasses.replace(cfg, output=str(tmp_path / "again"), prepare_workers=1), seed=5)
    a, b = _files(m["location"]), _files(again["location"])
    # 16 train + 1 val shards, 3 tokenizer files, the plan, 1 slice's partial manifest, the manifest
    assert a.keys() == b.keys() and len(a) == 16 + 1 + 3 + 1 + 1 + 1
    assert a == b


def test_idempotent_and_contradiction(prepared):
    cfg, m = prepared
    mtimes = {p: os.path.getmtime(p) for p in glob.glob(os.path.join(m["location"], "*.tar"))}
    assert ensure_prepared(cfg, seed=5) == m
    assert ensure_prepared(cfg, seed=99) == m  # another train.seed reuses the data
    assert {p: os.path.getmtime(p) for p in mtimes} == mtimes
    with pytest.raises(ValueError, match=r"data\.seq_len=64 there but 32 here.*another data\.output.*delete"):
        ensure_prepared(dataclasses.replace(cfg, seq_len=32))
    with pytest.raises(ValueError, match=r"data\.vocab_size"):
        ensure_prepared(dataclasses.replace(cfg, vocab_size=1024))
    with pytest.raises(ValueError, match=r"data\.source"):
        ensure_prepared(dataclasses.replace(cfg, source=os.path.join(m["location"], "manifest.json")))


def test_plain_webdataset_and_tar_read_the_shards(prepared):
    import webdataset as wds

    _, m = prepared
    urls = [os.path.join(m["location"], s["name"]) for s in m["splits"]["train"]["shards"]]
    ds = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=None).decode()
    blocks = [s["npy"] for s in ds]
    assert all(b.dtype == np.uint16 and b.shape[1] == 64 for b in blocks)
    assert sum(len(b) for b in blocks) == m["splits"]["train"]["sequences"]
    with tarfile.open(urls[0]) as tf:
        names = tf.getnames()
        assert names and all(n.endswith(".npy") for n in names)
        assert all(mem.mtime == 0 for mem in tf.getmembers())


def test_tokenizer_directory_loads_offline(prepared):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    _, m = prepared
    tok_dir = os.path.join(m["location"], "tokenizer")
    tok = AutoTokenizer.from_pretrained(tok_dir)
    assert len(tok) == m["vocab_size"] and tok.mask_token_id == 4 and tok.pad_token_id == 0
    enc = tok("The return statement leaves the function.")["input_ids"]
    assert enc[0] == 2 and enc[-1] == 3 and 1 not in enc  # [CLS] … [SEP], no [UNK]
    assert "function" in tok.decode(enc)
    assert isinstance(load_tokenizer(m), PreTrainedTokenizerFast)
    import hashlib

    assert (
        hashlib.sha256(open(os.path.join(tok_dir, "tokenizer.json"), "rb").read()).hexdigest()
        == m["tokenizer"]["sha256"]
    )


def test_existing_tokenizer_is_reused(prepared, tmp_path):
    cfg, m = prepared
    other = dataclasses.replace(
        cfg, output=str(tmp_path / "reuse"), tokenizer=os.path.join(m["location"], "tokenizer"), max_documents=30
    )
    m2 = ensure_prepared(other, seed=5)
    assert m2["tokenizer"]["sha256"] == m["tokenizer"]["sha256"]
    with pytest.raises(ValueError, match=r"data\.vocab_size"):  # 512 real tokens do not fit a 256 target
        ensure_prepared(dataclasses.replace(other, output=str(tmp_path / "small"), vocab_size=256))


def test_check_vocab(prepared):
    _, m = prepared
    check_vocab(m, m["vocab_size"])
    check_vocab(m, m["vocab_size"] + 100)
    with pytest.raises(ValueError, match=r"model\.vocab_size=100 is smaller than the tokenizer's vocabulary"):
        check_vocab(m, 100)


def test_datasets_and_file_sources_agree(tmp_path, monkeypatch):
    """hf:json (streamed by `datasets` from a local file), .jsonl and .jsonl.gz give the same shards."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from pydoc_data.topics import topics

    docs = [topics[k] for k in sorted(topics)][:60]
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"id": i, "body": d}) + "\n" for i, d in enumerate(docs)))
    with gzip.open(tmp_path / "corpus2.jsonl.gz", "wt") as f:
        f.write(path.read_text())
    common = dict(text_field="body", max_documents=0, vocab_size=256, seq_len=32, min_shards=4)
    hf = ensure_prepared(_cfg(tmp_path / "hf", source="hf:json", hf_data_files=str(path), **common))
    jl = ensure_prepared(_cfg(tmp_path / "jl", source=str(path), **common))
    gz = ensure_prepared(_cfg(tmp_path / "gz", source=str(tmp_path / "*.gz"), **common))
    assert hf["documents"]["train"] + hf["documents"]["val"] == 60
    assert hf["source"]["source"] == "hf:json" and hf["source"]["hf_data_files"] == str(path)
    shas = [[s["sha256"] for s in m["splits"]["train"]["shards"]] for m in (hf, jl, gz)]
    assert shas[0] == shas[1] == shas[2]
    with pytest.raises(ValueError, match=r"data\.text_field='text'"):
        ensure_prepared(_cfg(tmp_path / "bad", source=str(path), **{**common, "text_field": "text"}))


def test_txt_source_and_bad_source(tmp_path):
    (tmp_path / "a.txt").write_text("First paragraph about functions and classes.\n\nSecond one.\n")
    from scale_hyper.prepare.sources import iter_documents

    assert list(iter_documents(_cfg(tmp_path / "o", source=str(tmp_path / "a.txt")))) == [
        "First paragraph about functions and classes.",
        "Second one.",
    ]
    with pytest.raises(ValueError, match=r"data\.source="):
        ensure_prepared(_cfg(tmp_path / "o", source=str(tmp_path / "missing.txt")))


def test_token_dtype_for_large_vocabularies():
    from scale_hyper.data.tokenizer import token_dtype

    assert token_dtype(65536) == "uint16" and token_dtype(65537) == "uint32"


def test_cli_entry_points(prepared, capsys):
    from scale_hyper.bench import data as bench
    from scale_hyper.config import load_config
    from scale_hyper.prepare import main as prepare

    cfg, m = prepared
    run = load_config([f"data.{k}={v}" for k, v in dataclasses.asdict(cfg).items() if v is not None])
    assert prepare.main(run) == 0
    out = capsys.readouterr().out
    assert "16 train shards" in out and m["location"] in out
    bad = load_config([f"data.output={m['location']}", "data.seq_len=32", "data.vocab_size=512"])
    assert prepare.main(bad) == 2 and "data.seq_len" in capsys.readouterr().err
    r = bench.measure(cfg, seq_len=128, micro_batch_size=32, seconds=0.3)
    assert r["loader_tokens_per_s"] > 0 and r["masking_tokens_per_s"] > 0
