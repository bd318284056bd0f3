"""Prepare's two first steps: the plan (tokenizer + slice list), and one slice → shards + partial manifest.

Files under ``data.output`` (all written through ``storage``, so an ``s3://`` output works):

- ``tokenizer/``: written by the plan step, before any slice.
- ``slices/plan.json``: the plan: the prepare settings, the source, the seed, the tokenizer's hash
  and every slice (with how many input files it holds). Written once; later steps and tasks read it
  and refuse a config that contradicts it, or a plan of an older layout (``PLAN_VERSION``).
- ``train-SSSSSS-JJJJ.tar``/``val-…``: the shards of slice S.
- ``slices/SSSSSS.json``: the slice's partial manifest, written after its shards: its presence
  means the slice is complete. A slice without one (a task killed mid-slice) is redone, and its
  shards overwritten; so is a partial that names another plan (stale).

Each slice is independent: its documents are tokenized, split train/val (document ``i`` of the
slice goes to validation when ``floor((i+1)·f + u) > floor(i·f + u)``, ``f = data.val_fraction``,
``u`` drawn from the seed and the slice id: exactly the fraction ``f``, decided per document), packed,
and the training sequences shuffled within the slice (seeded by seed and slice id). Each split is
cut into shards of ``data.sequences_per_shard`` sequences, the last shard of the slice holding the
rest; where ``ceil(min_shards / slices)`` asks for more training shards than that (a small corpus),
into that many shards of equal size instead. Nothing depends on which task or process made a
slice, so the output bytes do not either.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import math
import os
from typing import Any, Dict, List, Optional

import numpy as np

from scale_hyper.data import shards as shardlib
from scale_hyper.data import storage
from scale_hyper.data import tokenizer as toklib
from scale_hyper.prepare import shard_writer, sources, wordpiece
from scale_hyper.prepare.space import OutOfSpace, is_out_of_space

log = logging.getLogger("scale_hyper.prepare")

PLAN = "slices/plan.json"
PLAN_FORMAT = "scale-hyper-prepare-plan"
# 2: slices are runs of whole small files (or parts of a large one) of up to data.slice_bytes, and
# shards are full but the last. A plan without a version (one slice per file) is refused, not resumed.
PLAN_VERSION = 2
_CHUNK_CHARS = 256_000  # documents per encode_batch call: bounded memory, enough to amortise the call


class PrepareError(ValueError):
    """Bad input or an inconsistent output directory (one line, exit 2)."""

    user_error = True


def partial_name(slice_id: int) -> str:
    return f"slices/{slice_id:06d}.json"


def canonical(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


_SHA: Dict[int, Any] = {}


def plan_sha(plan: Dict[str, Any]) -> str:
    """The plan's hash (every partial names it), computed once per plan object: a plan of 100 000
    files is megabytes of JSON, and every slice checked or made asks for it."""
    hit = _SHA.get(id(plan))
    if hit is None or hit[0] is not plan:
        hit = _SHA[id(plan)] = (plan, hashlib.sha256(canonical(plan)).hexdigest())
        while len(_SHA) > 8:
            _SHA.pop(next(iter(_SHA)))
    return hit[1]


def describe_slices(files: List[Optional[int]]) -> str:
    """'3 slices (10,000 input files, 3,334 per slice at most)', from each slice's file count (None:
    a block of a document stream), as the plan's slices and the manifest's ``slice_files`` give them."""
    n = f"{len(files)} slice{'s' if len(files) != 1 else ''}"
    known = [f for f in files if f]
    if not known:
        return n
    return f"{n} ({sum(known):,} input files, {max(known):,} per slice at most)"


def slice_files(plan: Dict[str, Any]) -> List[Optional[int]]:
    return [sl.get("files") for sl in plan["slices"]]


def check_plan(plan: Dict[str, Any], url: str, output: str) -> None:
    """Refuse a plan this version cannot continue (an older slice layout), with the command that re-prepares."""
    if plan.get("format") != PLAN_FORMAT or plan.get("version") != PLAN_VERSION:
        raise PrepareError(
            f"{url} is a prepare plan of another version of scale-hyper (plan version {plan.get('version', 1)}, "
            f"this one continues version {PLAN_VERSION}: slices of several small files) and its manifest.json was "
            f"never written — delete it and prepare again: `rm -r {output} && scale-hyper prepare CONFIG` "
            "(or choose another data.output)"
        )


# --- the plan (tokenizer step) ------------------------------------------------------------------


def make_plan(data_cfg, config: Dict[str, Any], seed: int) -> Dict[str, Any]:
    """Train (or load) the tokenizer, write it, and return the plan (not yet written)."""
    out, allow_pipe = data_cfg.output, data_cfg.allow_pipe
    slices = sources.plan_slices(data_cfg)  # first: a bad input fails before anything is trained or written
    if data_cfg.tokenizer:
        tok = toklib.load_tokenizer_dir(data_cfg.tokenizer)
    else:
        log.info("training a WordPiece vocabulary of %d on %s", data_cfg.vocab_size, data_cfg.source)
        tok = wordpiece.train_wordpiece(list(_training_texts(data_cfg)), data_cfg.vocab_size)
    vocab = tok.get_vocab_size()
    if vocab > data_cfg.vocab_size:
        raise PrepareError(
            f"data.tokenizer has {vocab} tokens > data.vocab_size={data_cfg.vocab_size} — "
            f"set data.vocab_size={vocab} (and a model.vocab_size at least as large)"
        )
    files = toklib.tokenizer_files(tok, model_max_length=data_cfg.seq_len)
    for name, data in files.items():
        storage.write_bytes(storage.join(out, f"{toklib.TOKENIZER_DIR}/{name}"), data, allow_pipe)
    return {
        "format": PLAN_FORMAT,
        "version": PLAN_VERSION,
        "config": config,
        "source": sources.describe(data_cfg),
        "seed": seed,
        "tokenizer": {"path": toklib.TOKENIZER_DIR, "sha256": toklib.file_hash(files), "vocab_size": vocab},
        "special_tokens": toklib.special_ids(tok),
        "dtype": toklib.token_dtype(vocab),
        "slices": slices,
    }


def _training_texts(data_cfg):
    cap, used = data_cfg.tokenizer_train_chars, 0
    for doc in sources.iter_documents(data_cfg):
        yield doc
        used += len(doc)
        if cap and used >= cap:
            return


def load_tokenizer_of(data_cfg, plan: Dict[str, Any]):
    from tokenizers import Tokenizer

    raw = storage.read_bytes(
        storage.join(data_cfg.output, f"{toklib.TOKENIZER_DIR}/tokenizer.json"), data_cfg.allow_pipe
    )
    if hashlib.sha256(raw).hexdigest() != plan["tokenizer"]["sha256"]:
        raise PrepareError(
            f"{storage.join(data_cfg.output, toklib.TOKENIZER_DIR)} is not the tokenizer of "
            f"{storage.join(data_cfg.output, PLAN)} (another hash) — delete {data_cfg.output} and prepare again"
        )
    return Tokenizer.from_str(raw.decode())


# --- one slice ----------------------------------------------------------------------------------


def read_partial(data_cfg, slice_id: int) -> Optional[Dict[str, Any]]:
    raw = storage.read_optional(storage.join(data_cfg.output, partial_name(slice_id)), data_cfg.allow_pipe)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}  # unreadable: treated as stale, redone by a task and named by the merge


def run_slice(data_cfg, plan: Dict[str, Any], tok, slice_id: int, docs: Optional[List[str]] = None) -> Dict[str, Any]:
    """Tokenize, pack, shuffle and write one slice (``docs``: its documents, already read from a
    stream); returns its partial manifest (written last)."""
    sl = plan["slices"][slice_id]
    seq_len, dtype, special = data_cfg.seq_len, plan["dtype"], plan["special_tokens"]
    bufs = {"train": io.BytesIO(), "val": io.BytesIO()}
    packers = {
        k: shard_writer.Packer(b, seq_len, special["cls"], special["sep"], special["pad"], dtype)
        for k, b in bufs.items()
    }
    frac, phase = float(data_cfg.val_fraction), _val_phase(plan["seed"], slice_id)
    index = 0
    for chunk in _chunks(sources.slice_documents(data_cfg, sl) if docs is None else iter(docs)):
        ids, lengths = wordpiece.encode_with(tok, chunk)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        batch: Dict[str, List[np.ndarray]] = {"train": [], "val": []}
        for j in range(len(lengths)):
            i = index + j
            is_val = frac > 0 and math.floor((i + 1) * frac + phase) > math.floor(i * frac + phase)
            if lengths[j]:
                batch["val" if is_val else "train"].append(ids[offsets[j] : offsets[j + 1]])
        index += len(lengths)
        for split, arrays in batch.items():
            packers[split].add(arrays)
    rows = {}
    for split, packer in packers.items():
        packer.finish()
        rows[split] = np.frombuffer(bufs[split].getbuffer(), dtype=dtype).reshape(-1, seq_len)
    _remove_stale_temp_files(data_cfg.output, slice_id)
    try:  # every file appears whole or not at all (storage.open_write), the partial last
        splits = {k: _write_split(data_cfg, plan, r, k, slice_id, special["pad"]) for k, r in rows.items()}
        partial = {
            "slice": slice_id,
            "plan": plan_sha(plan),
            "tokenizer": plan["tokenizer"]["sha256"],
            "config": plan["config"],
            "files": sl.get("files"),
            "documents": {k: p.documents for k, p in packers.items()},
            "splits": splits,
        }
        url = storage.join(data_cfg.output, partial_name(slice_id))
        storage.write_bytes(url, canonical(partial), data_cfg.allow_pipe)
    except OSError as err:
        if is_out_of_space(err):
            raise OutOfSpace(slice_id, _shard_bytes(data_cfg, plan, rows), err.strerror or str(err)) from None
        raise
    return partial


def _remove_stale_temp_files(output: str, slice_id: int) -> None:
    """Temp files of this slice's shards left by a writer that was killed mid-file (SIGKILL, a
    cancelled array task): only this task writes this slice now, so none of them is being written."""
    if not storage.is_local(output):
        return
    root = storage.local_path(output)
    patterns = (f"*-{slice_id:06d}-*.tar.tmp*", os.path.join("slices", f"{slice_id:06d}.json.tmp*"))
    for stale in (f for pattern in patterns for f in glob.glob(os.path.join(root, pattern))):
        os.remove(stale)


def _shard_bytes(data_cfg, plan, rows: Dict[str, np.ndarray]) -> int:
    """What a slice's shards take on disk, computed before they are written."""
    return sum(
        shard_writer.shard_file_bytes(size, data_cfg.seq_len, plan["dtype"], data_cfg.sequences_per_block)
        for split, r in rows.items()
        for size in _shard_sizes(data_cfg, plan, len(r), split)
    )


def _val_phase(seed: int, slice_id: int) -> float:
    return (((seed * 2654435761) + slice_id * 0x9E3779B1) % (1 << 32)) / float(1 << 32)


def _chunks(docs):
    chunk: List[str] = []
    size = 0
    for d in docs:
        chunk.append(d)
        size += len(d)
        if size >= _CHUNK_CHARS:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _shard_sizes(data_cfg, plan, n: int, split: str) -> List[int]:
    if n == 0:
        return []
    at_least = 1
    if split == "train":  # a small corpus still gives about min_shards shards in all
        at_least = min(math.ceil(data_cfg.min_shards / len(plan["slices"])), n)
    return shard_sizes(n, data_cfg.sequences_per_shard, at_least)


def _write_split(data_cfg, plan, rows: np.ndarray, split: str, slice_id: int, pad_id: int) -> Dict[str, Any]:
    n = len(rows)
    if n == 0:
        return {"sequences": 0, "tokens": 0, "shards": []}
    if split == "train":
        order = np.random.default_rng([plan["seed"] & 0xFFFFFFFF, 0x5AD, slice_id]).permutation(n)
        rows = rows[order]
    entries, start = [], 0
    for index, size in enumerate(_shard_sizes(data_cfg, plan, n, split)):
        url = storage.join(data_cfg.output, shardlib.shard_name(split, index, slice_id))
        part = rows[start : start + size]
        start += size
        entries.append(
            shard_writer.write_shard(
                url, part, split, index, data_cfg.sequences_per_block, pad_id, data_cfg.allow_pipe, slice_id
            )
        )
    return {"sequences": n, "tokens": sum(e["tokens"] for e in entries), "shards": entries}


def shard_sizes(n: int, per_shard: int, at_least: int = 1) -> List[int]:
    """``n`` sequences as full shards of ``per_shard`` and the rest in the last; or, when that gives
    fewer than ``at_least`` shards, ``at_least`` shards of equal size (±1)."""
    full, rest = divmod(n, per_shard)
    if full + (rest > 0) < at_least:
        return shard_writer.even_sizes(n, at_least)
    return [per_shard] * full + ([rest] if rest else [])
