"""Packed sequences on disk, the writing side: the packer, the shard writer, and the manifest's bytes.

Packing: each document's token ids are followed by ``[SEP]``; the resulting stream is cut into
pieces of ``seq_len - 1`` tokens and each piece gets a leading ``[CLS]``, so every sequence is
``[CLS] … [SEP] next document … [SEP] …`` with no padding except in the very last sequence of a
split. A document longer than a sequence continues in the next one.

Shards are written by webdataset's ``TarWriter`` with ``mtime=0`` (reproducible bytes), in the format
``scale_hyper.data.shards`` describes and reads.
"""

from __future__ import annotations

import io
import json
from typing import IO, Any, Dict, List, Optional

import numpy as np

from scale_hyper.data import storage
from scale_hyper.data.shards import FORMAT, MANIFEST, VERSION, load_manifest, shard_name, shard_stem


class Packer:
    """Packs documents into fixed-length sequences, appending them to a binary spill file."""

    def __init__(self, out: IO[bytes], seq_len: int, cls_id: int, sep_id: int, pad_id: int, dtype: str):
        self.out, self.seq_len, self.dtype = out, seq_len, np.dtype(dtype)
        self.cls_id, self.pad_id = cls_id, pad_id
        self.sep = np.array([sep_id], dtype=self.dtype)
        self.carry = np.empty(0, dtype=self.dtype)
        self.sequences = 0
        self.tokens = 0  # non-padding ids, [CLS]/[SEP] included
        self.documents = 0

    def add(self, docs: List[np.ndarray]) -> None:
        if not docs:
            return
        parts = [self.carry]
        for d in docs:
            parts += [d.astype(self.dtype, copy=False), self.sep]
        self.documents += len(docs)
        stream = np.concatenate(parts)
        width = self.seq_len - 1
        n = len(stream) // width
        if n:
            rows = np.empty((n, self.seq_len), dtype=self.dtype)
            rows[:, 0] = self.cls_id
            rows[:, 1:] = stream[: n * width].reshape(n, width)
            self.out.write(rows.tobytes())
            self.sequences += n
            self.tokens += n * self.seq_len
        self.carry = stream[n * width :].copy()

    def finish(self) -> None:
        if len(self.carry):
            row = np.full(self.seq_len, self.pad_id, dtype=self.dtype)
            row[0] = self.cls_id
            row[1 : 1 + len(self.carry)] = self.carry
            self.out.write(row.tobytes())
            self.sequences += 1
            self.tokens += 1 + len(self.carry)
            self.carry = self.carry[:0]


def npy_bytes(block: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(block), allow_pickle=False)
    return buf.getvalue()


def write_shard(
    url: str,
    rows: np.ndarray,
    split: str,
    index: int,
    sequences_per_block: int,
    pad_id: int,
    allow_pipe: bool = False,
    slice_id: Optional[int] = None,
) -> Dict[str, Any]:
    """Write one shard; returns its manifest entry (name, sequences, tokens, bytes, sha256)."""
    from webdataset import TarWriter

    with storage.open_write(url, allow_pipe) as f:
        hw = storage.HashingWriter(f)
        # mtime=0 and fixed user/group/mode: the same rows give the same bytes on every machine.
        with TarWriter(hw, encoder=False, mtime=0, user="scale-hyper", group="scale-hyper", mode=0o444) as tw:
            for b, start in enumerate(range(0, len(rows), sequences_per_block)):
                block = rows[start : start + sequences_per_block]
                tw.write({"__key__": f"{shard_stem(split, index, slice_id)}-{b:06d}", "npy": npy_bytes(block)})
    return {
        "name": shard_name(split, index, slice_id),
        "sequences": int(len(rows)),
        "tokens": int(np.count_nonzero(rows != pad_id)),
        "bytes": hw.size,
        "sha256": hw.sha.hexdigest(),
    }


def shard_file_bytes(sequences: int, seq_len: int, dtype: str, sequences_per_block: int) -> int:
    """The size of the tar ``write_shard`` makes of ``sequences`` rows: per .npy member a 512-byte
    header and its data rounded up to 512, two zero blocks at the end, all rounded up to tar's
    10 KiB record. (The full-disk message's estimate, before anything is written.)"""
    total = 0
    for start in range(0, sequences, sequences_per_block):
        rows = min(sequences_per_block, sequences - start)
        total += 512 + -(-len(npy_bytes(np.zeros((rows, seq_len), dtype=dtype))) // 512) * 512
    return -(-(total + 1024) // 10240) * 10240


def even_sizes(total: int, parts: int) -> List[int]:
    """``total`` split into ``parts`` sizes that differ by at most one (larger first)."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


# --- manifest ----------------------------------------------------------------------------------


def manifest_bytes(manifest: Dict[str, Any]) -> bytes:
    """Canonical JSON (sorted keys, no timestamps): the same data gives the same manifest bytes."""
    clean = {k: v for k, v in manifest.items() if k not in ("location", "allow_pipe")}
    return (json.dumps(clean, indent=2, sort_keys=True) + "\n").encode()


def make_manifest(
    *,
    config: Dict[str, Any],
    source: Dict[str, Any],
    seed: int,
    seq_len: int,
    vocab_size: int,
    dtype: str,
    special: Dict[str, int],
    tokenizer: Dict[str, Any],
    sequences_per_block: int,
    splits: Dict[str, Dict[str, Any]],
    documents: Dict[str, int],
) -> Dict[str, Any]:
    return {
        "format": FORMAT,
        "version": VERSION,
        "config": config,
        "source": source,
        "seed": seed,
        "seq_len": seq_len,
        "vocab_size": vocab_size,
        "dtype": dtype,
        "special_tokens": special,
        "tokenizer": tokenizer,
        "sequences_per_block": sequences_per_block,
        "sequences_per_shard": {k: [s["sequences"] for s in v["shards"]] for k, v in splits.items()},
        "documents": documents,
        "splits": splits,
    }


def write_arrays(
    output: str,
    arrays: Dict[str, List[np.ndarray]],
    vocab_size: int,
    *,
    sequences_per_block: int = 64,
    special: Optional[Dict[str, int]] = None,
) -> Dict[str, Any]:
    """Shards + manifest from ready-made ``[n, seq_len]`` arrays, one per shard (benchmarks and tests)."""
    special = special or {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
    first = next(a for parts in arrays.values() for a in parts)
    dtype = "uint16" if vocab_size <= 65536 else "uint32"
    splits = {}
    for split, parts in arrays.items():
        entries = [
            write_shard(
                storage.join(output, shard_name(split, i)),
                np.asarray(a, dtype=dtype),
                split,
                i,
                sequences_per_block,
                special["pad"],
            )
            for i, a in enumerate(parts)
        ]
        splits[split] = {
            "sequences": sum(e["sequences"] for e in entries),
            "tokens": sum(e["tokens"] for e in entries),
            "shards": entries,
        }
    splits.setdefault("val", {"sequences": 0, "tokens": 0, "shards": []})
    manifest = make_manifest(
        config={},
        source={"source": "arrays"},
        seed=0,
        seq_len=int(first.shape[1]),
        vocab_size=vocab_size,
        dtype=dtype,
        special=special,
        tokenizer={"path": "tokenizer", "sha256": "", "vocab_size": vocab_size},
        sequences_per_block=sequences_per_block,
        splits=splits,
        documents={k: 0 for k in splits},
    )
    storage.write_bytes(storage.join(output, MANIFEST), manifest_bytes(manifest), False)
    return load_manifest(output)  # type: ignore[return-value]
