"""Packed sequences on disk: the packer, the shard format, and the manifest.

Packing: each document's token ids are followed by ``[SEP]``; the resulting stream is cut into
pieces of ``seq_len - 1`` tokens and each piece gets a leading ``[CLS]``, so every sequence is
``[CLS] … [SEP] next document … [SEP] …`` with no padding except in the very last sequence of a
split. A document longer than a sequence continues in the next one.

A shard is a plain tar file (``train-000003.tar``) written by webdataset's ``TarWriter`` with
``mtime=0`` (reproducible bytes). Each member ``<split>-<shard>-<block>.npy`` is a 2-D array of up
to ``sequences_per_block`` sequences × ``seq_len`` ids, uint16 (uint32 when the vocabulary has more
than 65,536 tokens). Blocks, rather than one sequence per member, keep the tar overhead near zero.
``webdataset.WebDataset(url).decode()``, ``tarfile`` + ``numpy.load`` or ``tar x`` read them.

Reading never unpickles (``allow_pickle=False``) and validates dtype, shape, sequence count and
the id range against the manifest.

``manifest.json`` is written last, as the commit marker of a prepared directory.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from typing import IO, Any, Dict, List, Optional

import numpy as np

from scale_hyper.data import storage

FORMAT = "scale-hyper-mlm-shards"
VERSION = 1
MANIFEST = "manifest.json"
# train-000003.tar (one-pass prepare) or train-000012-0003.tar (shard 3 of slice 12)
_SHARD_NAME = re.compile(r"^(train|val)-[0-9]{6,}(-[0-9]{4,})?\.tar$")


class CorruptShardError(ValueError):
    """A shard that cannot be read or does not match its manifest entry."""

    user_error = True  # scale_hyper.config.errors: one line, exit 2


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


def shard_name(split: str, index: int, slice_id: Optional[int] = None) -> str:
    return f"{shard_stem(split, index, slice_id)}.tar"


def shard_stem(split: str, index: int, slice_id: Optional[int] = None) -> str:
    return f"{split}-{index:06d}" if slice_id is None else f"{split}-{slice_id:06d}-{index:04d}"


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


def read_shard(
    url: str,
    *,
    name: str,
    dtype: str,
    seq_len: int,
    sequences: int,
    vocab_size: int,
    sequences_per_block: int,
    allow_pipe: bool = False,
) -> np.ndarray:
    """All sequences of one shard as a ``[sequences, seq_len]`` array.

    Raises CorruptShardError for anything unreadable or inconsistent with the manifest entry, and a
    plain ValueError (never skipped) for token ids outside the vocabulary.
    """
    want = np.dtype(dtype)
    max_member = sequences_per_block * seq_len * want.itemsize + 4096  # a block plus its .npy header
    blocks: List[np.ndarray] = []
    try:
        with storage.open_read(url, allow_pipe) as f:
            with tarfile.open(fileobj=f, mode="r|") as tf:
                for member in tf:
                    if not member.isfile() or not member.name.endswith(".npy"):
                        continue  # tolerate extra members (e.g. a README added by hand)
                    if member.size > max_member:
                        raise CorruptShardError(f"member {member.name} is {member.size} bytes, larger than a block")
                    data = tf.extractfile(member).read()  # type: ignore[union-attr]
                    arr = np.load(io.BytesIO(data), allow_pickle=False)
                    if arr.dtype != want or arr.ndim != 2 or arr.shape[1] != seq_len:
                        raise CorruptShardError(
                            f"member {member.name} is {arr.dtype}{list(arr.shape)}, expected {want}[*, {seq_len}]"
                        )
                    blocks.append(arr)
    except CorruptShardError as err:
        raise CorruptShardError(f"shard {name}: {err}") from None
    except storage.RemoteStorageError:
        raise  # the store, not the shard, failed (after retries): never skipped as corrupt; names the URL
    except (tarfile.TarError, OSError, EOFError, ValueError) as err:
        raise CorruptShardError(f"shard {name} is unreadable ({type(err).__name__}: {err})") from None
    rows = np.concatenate(blocks) if blocks else np.empty((0, seq_len), dtype=want)
    if len(rows) != sequences:
        raise CorruptShardError(f"shard {name} holds {len(rows)} sequences, the manifest says {sequences}")
    if len(rows) and int(rows.max()) >= vocab_size:
        bad = int(rows.max())
        raise ValueError(
            f"shard {name}: token id {bad} is outside the vocabulary (size {vocab_size}); the shards and "
            "the tokenizer/manifest do not belong together; re-run `scale-hyper prepare` into a fresh data.output"
        )
    return rows


# --- manifest ----------------------------------------------------------------------------------


def manifest_bytes(manifest: Dict[str, Any]) -> bytes:
    """Canonical JSON (sorted keys, no timestamps): the same data gives the same manifest bytes."""
    clean = {k: v for k, v in manifest.items() if k not in ("location", "allow_pipe")}
    return (json.dumps(clean, indent=2, sort_keys=True) + "\n").encode()


def load_manifest(output: str, allow_pipe: bool = False) -> Optional[Dict[str, Any]]:
    """The validated manifest under ``data.output``, or None when there is none yet.

    ``location`` and ``allow_pipe`` are set from the caller's config, never from the file.
    """
    storage.check_pipe(output, allow_pipe)
    raw = storage.read_optional(storage.join(output, MANIFEST), allow_pipe)
    if raw is None:
        return None
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(
            f"{storage.join(output, MANIFEST)} is not valid JSON ({err}); delete {output} and re-prepare"
        ) from None
    validate_manifest(manifest, where=storage.join(output, MANIFEST))
    manifest["location"] = storage.local_path(output) if storage.is_local(output) else output
    manifest["allow_pipe"] = bool(allow_pipe)
    return manifest


def validate_manifest(m: Any, where: str = MANIFEST) -> None:
    """Reject a manifest whose fields could mislead the loader (it is data, not code)."""

    def bad(msg: str) -> ValueError:
        return ValueError(f"{where}: {msg}")

    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise bad(f"not a {FORMAT} manifest")
    if m.get("version") != VERSION:
        raise bad(f"manifest version {m.get('version')!r}, this code reads version {VERSION}")
    for key in ("seq_len", "vocab_size", "sequences_per_block"):
        if not isinstance(m.get(key), int) or m[key] <= 0:
            raise bad(f"{key} must be a positive integer")
    if m.get("dtype") not in ("uint16", "uint32"):
        raise bad(f"dtype {m.get('dtype')!r} is not uint16/uint32")
    specials = m.get("special_tokens")
    if not isinstance(specials, dict) or any(
        not isinstance(specials.get(k), int) or not 0 <= specials[k] < m["vocab_size"]
        for k in ("pad", "unk", "cls", "sep", "mask")
    ):
        raise bad("special_tokens must map pad/unk/cls/sep/mask to ids inside the vocabulary")
    splits = m.get("splits")
    if not isinstance(splits, dict) or not isinstance(splits.get("train"), dict):
        raise bad("no train split")
    for split, info in splits.items():
        shards = info.get("shards") if isinstance(info, dict) else None
        if split not in ("train", "val") or not isinstance(shards, list):
            raise bad(f"split {split!r} is malformed")
        for s in shards:
            if not isinstance(s, dict) or not isinstance(s.get("name"), str) or not _SHARD_NAME.match(s["name"]):
                raise bad(f"split {split!r} has a shard with an unexpected name: {s!r:.80}")
            if not isinstance(s.get("sequences"), int) or s["sequences"] < 0:
                raise bad(f"shard {s['name']}: sequences must be a non-negative integer")


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


def shard_urls(manifest: Dict[str, Any], split: str) -> List[str]:
    base = manifest["location"]
    return [storage.join(base, s["name"]) for s in manifest["splits"].get(split, {}).get("shards", [])]
