"""Packed sequences on disk, the reading side: the shard format, reading a shard, and the manifest.

A shard is a plain tar file (``train-000003.tar``) of members ``<split>-<shard>-<block>.npy``, each a
2-D array of up to ``sequences_per_block`` sequences × ``seq_len`` ids, uint16 (uint32 when the
vocabulary has more than 65,536 tokens). Blocks, rather than one sequence per member, keep the tar
overhead near zero. ``webdataset.WebDataset(url).decode()``, ``tarfile`` + ``numpy.load`` or ``tar x``
read them. They are written by ``scale_hyper.prepare.shard_writer`` (packing, the tar writer, the
manifest's bytes); this module is what training and evaluation need at run time.

Reading never unpickles (``allow_pickle=False``) and validates dtype, shape, sequence count and
the id range against the manifest.

``manifest.json`` is written last, as the commit marker of a prepared directory.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from typing import Any, Dict, List, Optional

import numpy as np

from scale_hyper.data import storage

FORMAT = "scale-hyper-mlm-shards"
VERSION = 1
MANIFEST = "manifest.json"
# A manifest's "loader_deal" (written by prepare's merge): its shards are full but the last of each
# slice, so whole shards dealt round-robin would leave the loader's slots of unequal length (each cut
# to the shortest); the loader cuts each epoch by sequences instead (``plan.plan_slots``). Manifests
# without it (earlier versions, ``shard_writer.write_arrays``) keep the round-robin layout they were read with.
DEAL_BY_SEQUENCES = "sequences"
# train-000003.tar (one-pass prepare) or train-000012-0003.tar (shard 3 of slice 12)
_SHARD_NAME = re.compile(r"^(train|val)-[0-9]{6,}(-[0-9]{4,})?\.tar$")


class CorruptShardError(ValueError):
    """A shard that cannot be read or does not match its manifest entry."""

    user_error = True  # scale_hyper.config.errors: one line, exit 2


def shard_name(split: str, index: int, slice_id: Optional[int] = None) -> str:
    return f"{shard_stem(split, index, slice_id)}.tar"


def shard_stem(split: str, index: int, slice_id: Optional[int] = None) -> str:
    return f"{split}-{index:06d}" if slice_id is None else f"{split}-{slice_id:06d}-{index:04d}"


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


def shard_urls(manifest: Dict[str, Any], split: str) -> List[str]:
    base = manifest["location"]
    return [storage.join(base, s["name"]) for s in manifest["splits"].get(split, {}).get("shards", [])]
