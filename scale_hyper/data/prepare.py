"""`scale-hyper prepare`: corpus → WordPiece tokenizer → packed, shuffled WebDataset shards + manifest.

Steps (all deterministic: the same input and config give byte-identical shards and manifest):

1. Tokenizer: train WordPiece on the corpus' first ``data.tokenizer_train_chars`` characters, or
   load ``data.tokenizer``. Its real vocabulary must fit ``data.vocab_size``.
2. Tokenize documents in ``data.prepare_workers`` spawned processes (order preserved, bounded
   in-flight work so a streamed corpus is never held in memory) and pack them into ``seq_len``
   sequences (see ``shards``). Document ``i`` goes to validation when ``floor((i+1)·f + u) >
   floor(i·f + u)`` with ``f = data.val_fraction`` and ``u`` drawn from the seed: exactly the
   fraction ``f`` of documents, spread evenly, decided while streaming. Packed sequences are spilled
   to a local temporary file.
3. Train sequences are shuffled globally (seeded) and cut into ``max(ceil(N / sequences_per_shard),
   min(min_shards, N))`` shards of equal size (±1), so every shard is a random sample of the corpus
   and small corpora still give enough shards for several ranks × workers. Validation keeps corpus
   order.
4. The tokenizer directory, then ``manifest.json`` (last: its presence means "complete").

``ensure_prepared`` reuses a directory whose manifest matches the config and refuses one that
contradicts it. The seed only decides the split and the shuffle; a manifest prepared with another
seed is reused (with a note in the log) rather than rebuilt.
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Dict, Iterable, Iterator, List, Tuple

import numpy as np

from scale_hyper.data import shards as shardlib
from scale_hyper.data import sources, storage
from scale_hyper.data import tokenizer as toklib
from scale_hyper.data.progress import Progress

log = logging.getLogger("scale_hyper.data")

# DataConfig keys that change what prepare writes; a manifest must agree on all of them.
PREPARE_KEYS = (
    "source",
    "hf_config",
    "hf_split",
    "hf_data_files",
    "text_field",
    "max_documents",
    "tokenizer",
    "tokenizer_train_chars",
    "vocab_size",
    "seq_len",
    "sequences_per_block",
    "sequences_per_shard",
    "min_shards",
    "val_fraction",
)
_CHUNK_CHARS = 256_000  # text per tokenizer task: large enough to amortise IPC, small enough to stream


def prepare_config(data_cfg) -> Dict[str, Any]:
    return {k: getattr(data_cfg, k) for k in PREPARE_KEYS}


def _validate(data_cfg) -> None:
    if data_cfg.seq_len < 4:
        raise ValueError(f"data.seq_len={data_cfg.seq_len} is too short (at least 4)")
    if data_cfg.vocab_size < 16:
        raise ValueError(f"data.vocab_size={data_cfg.vocab_size} is too small")
    if data_cfg.sequences_per_block < 1 or data_cfg.sequences_per_shard < 1 or data_cfg.min_shards < 1:
        raise ValueError("data.sequences_per_block, data.sequences_per_shard and data.min_shards must be >= 1")
    if not 0.0 <= data_cfg.val_fraction < 1.0:
        raise ValueError(f"data.val_fraction={data_cfg.val_fraction} must be in [0, 1)")


def ensure_prepared(data_cfg, seed: int = 1234) -> Dict[str, Any]:
    """The manifest of ``data.output``, preparing it first if needed (call on one rank only).

    Raises ValueError naming the conflicting keys when ``data.output`` holds data prepared with a
    different configuration.
    """
    _validate(data_cfg)
    storage.check_pipe(data_cfg.output, data_cfg.allow_pipe)
    existing = shardlib.load_manifest(data_cfg.output, data_cfg.allow_pipe)
    if existing is None:
        return prepare(data_cfg, seed)
    _check_matches(existing, data_cfg)
    if existing.get("seed") != seed:
        log.info(
            "reusing %s (split and shuffled with seed %s; this run's seed %s only affects the loader)",
            data_cfg.output,
            existing.get("seed"),
            seed,
        )
    if storage.is_local(data_cfg.output):
        missing = [
            s["name"]
            for split in existing["splits"].values()
            for s in split["shards"]
            if not os.path.exists(storage.join(data_cfg.output, s["name"]))
        ]
        if missing:
            raise ValueError(
                f"data.output={data_cfg.output!r} is incomplete: {len(missing)} shard(s) listed in its manifest "
                f"are missing (e.g. {missing[0]}); delete {data_cfg.output} to re-prepare"
            )
    return existing


def _check_matches(manifest: Dict[str, Any], data_cfg) -> None:
    have = manifest.get("config", {})
    want = prepare_config(data_cfg)
    diffs = [k for k in PREPARE_KEYS if have.get(k) != want[k]]
    if not diffs and data_cfg.source != "stdlib" and not data_cfg.source.startswith("hf:"):
        # the same file names but other content: sizes are recorded, compare them
        if manifest.get("source", {}).get("files") != sources.describe(data_cfg).get("files"):
            diffs = ["source"]
            have = dict(have, source=f"{have.get('source')} (files of other sizes)")
    if diffs:
        parts = ", ".join(f"data.{k}={have.get(k)!r} there but {want[k]!r} here" for k in diffs)
        raise ValueError(
            f"data.output={data_cfg.output!r} already holds data prepared differently: {parts}. "
            f"Choose another data.output (e.g. data/{_suggest_name(data_cfg)}) or delete {data_cfg.output} "
            "to re-prepare it"
        )


def _suggest_name(data_cfg) -> str:
    src = "stdlib" if data_cfg.source == "stdlib" else "corpus"
    return f"{src}-v{data_cfg.vocab_size}-s{data_cfg.seq_len}"


# --- the pipeline -------------------------------------------------------------------------------


def _training_texts(data_cfg) -> Callable[[], Iterator[str]]:
    cap = data_cfg.tokenizer_train_chars

    def texts() -> Iterator[str]:
        used = 0
        for doc in sources.iter_documents(data_cfg):
            yield doc
            used += len(doc)
            if cap and used >= cap:
                return

    return texts


def _chunks(docs: Iterable[str]) -> Iterator[List[str]]:
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


def _encoded(data_cfg, tok) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """(ids, lengths) per chunk of documents, in corpus order."""
    chunks = _chunks(sources.iter_documents(data_cfg))
    workers = int(data_cfg.prepare_workers)
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if workers > 1 and "fork" not in mp.get_all_start_methods() and main_file and not os.path.exists(main_file):
        # spawn re-imports __main__ by path; a script read from stdin has none
        log.info("tokenizing in-process: the main script (%s) cannot be re-imported by worker processes", main_file)
        workers = 1
    if workers <= 1:
        for c in chunks:
            yield toklib.encode_with(tok, c)
        return
    # fork where possible: a spawned worker would re-import the scale_hyper package (torch,
    # transformers: seconds each); the workers only run tokenizers on plain strings.
    # An executor (not Pool) so that a crashed worker raises instead of being respawned forever.
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    env_was = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core; silences the fork warning
    try:
        with ProcessPoolExecutor(
            workers, mp_context=ctx, initializer=toklib.init_worker, initargs=(tok.to_str(),)
        ) as pool:
            pending: deque = deque()
            for c in chunks:
                pending.append(pool.submit(toklib.encode_chunk, c))
                if len(pending) >= 2 * workers:  # back-pressure: never read the corpus far ahead
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
    finally:
        if env_was is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = env_was


def _val_phase(seed: int) -> float:
    return ((seed * 2654435761) % (1 << 32)) / float(1 << 32)


def prepare(data_cfg, seed: int = 1234) -> Dict[str, Any]:
    """Build ``data.output`` from scratch (overwriting any shards there) and return its manifest."""
    _validate(data_cfg)
    out = data_cfg.output
    allow_pipe = data_cfg.allow_pipe
    storage.check_pipe(out, allow_pipe)

    if data_cfg.tokenizer:
        tok = toklib.load_tokenizer_dir(data_cfg.tokenizer)
    else:
        log.info("training a WordPiece vocabulary of %d on %s", data_cfg.vocab_size, data_cfg.source)
        tok = toklib.train_wordpiece(list(_training_texts(data_cfg)()), data_cfg.vocab_size)
    vocab = tok.get_vocab_size()
    if vocab > data_cfg.vocab_size:
        raise ValueError(
            f"data.tokenizer has {vocab} tokens > data.vocab_size={data_cfg.vocab_size}; "
            f"set data.vocab_size={vocab} (and a model.vocab_size at least as large)"
        )
    special = toklib.special_ids(tok)
    dtype = toklib.token_dtype(vocab)
    seq_len = data_cfg.seq_len

    tmp = (
        os.path.join(storage.local_path(out), ".prepare-tmp")
        if storage.is_local(out)
        else tempfile.mkdtemp(prefix="scale-hyper-prepare-")
    )
    os.makedirs(tmp, exist_ok=True)
    try:
        spills = {split: os.path.join(tmp, f"{split}.bin") for split in ("train", "val")}
        with open(spills["train"], "wb") as ft, open(spills["val"], "wb") as fv:
            packers = {
                "train": shardlib.Packer(ft, seq_len, special["cls"], special["sep"], special["pad"], dtype),
                "val": shardlib.Packer(fv, seq_len, special["cls"], special["sep"], special["pad"], dtype),
            }
            _tokenize_and_pack(data_cfg, tok, packers, seed)
        n_train = packers["train"].sequences
        if n_train == 0:
            raise ValueError(f"data.source={data_cfg.source!r} produced no training sequences")
        splits = {
            "train": _write_split(data_cfg, spills["train"], packers["train"], "train", dtype, special["pad"], seed),
            "val": _write_split(data_cfg, spills["val"], packers["val"], "val", dtype, special["pad"], None),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    files = toklib.tokenizer_files(tok, model_max_length=seq_len)
    for name, data in files.items():
        storage.write_bytes(storage.join(out, f"{toklib.TOKENIZER_DIR}/{name}"), data, allow_pipe)
    manifest = shardlib.make_manifest(
        config=prepare_config(data_cfg),
        source=sources.describe(data_cfg),
        seed=seed,
        seq_len=seq_len,
        vocab_size=vocab,
        dtype=dtype,
        special=special,
        tokenizer={"path": toklib.TOKENIZER_DIR, "sha256": toklib.file_hash(files), "vocab_size": vocab},
        sequences_per_block=data_cfg.sequences_per_block,
        splits=splits,
        documents={k: p.documents for k, p in packers.items()},
    )
    storage.write_bytes(storage.join(out, shardlib.MANIFEST), shardlib.manifest_bytes(manifest), allow_pipe)
    return shardlib.load_manifest(out, allow_pipe)  # type: ignore[return-value]


def _tokenize_and_pack(data_cfg, tok, packers: Dict[str, shardlib.Packer], seed: int) -> None:
    frac, phase = float(data_cfg.val_fraction), _val_phase(seed)
    progress = Progress(f"prepare {data_cfg.source}")
    doc_index = 0
    for ids, lengths in _encoded(data_cfg, tok):
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        batch: Dict[str, List[np.ndarray]] = {"train": [], "val": []}
        for j in range(len(lengths)):
            i = doc_index + j
            is_val = frac > 0 and math.floor((i + 1) * frac + phase) > math.floor(i * frac + phase)
            if lengths[j]:
                batch["val" if is_val else "train"].append(ids[offsets[j] : offsets[j + 1]])
        doc_index += len(lengths)
        for split, docs in batch.items():
            packers[split].add(docs)
        progress.update(len(lengths), int(lengths.sum()))
    for p in packers.values():
        p.finish()
    progress.close()


def _write_split(
    data_cfg, spill: str, packer: shardlib.Packer, split: str, dtype: str, pad_id: int, shuffle_seed
) -> Dict[str, Any]:
    n = packer.sequences
    if n == 0:
        return {"sequences": 0, "tokens": 0, "shards": []}
    n_shards = math.ceil(n / data_cfg.sequences_per_shard)
    if split == "train":
        n_shards = max(n_shards, min(data_cfg.min_shards, n))
    rows_all = np.memmap(spill, dtype=dtype, mode="r", shape=(n, data_cfg.seq_len))
    order = (
        np.random.default_rng([shuffle_seed & 0xFFFFFFFF, 0x5AD]).permutation(n) if shuffle_seed is not None else None
    )
    entries, start = [], 0
    for index, size in enumerate(shardlib.even_sizes(n, n_shards)):
        if order is None:
            rows = np.asarray(rows_all[start : start + size])
        else:
            rows = rows_all[np.sort(order[start : start + size])]  # sorted: sequential reads of the spill
        start += size
        url = storage.join(data_cfg.output, shardlib.shard_name(split, index))
        entries.append(
            shardlib.write_shard(url, rows, split, index, data_cfg.sequences_per_block, pad_id, data_cfg.allow_pipe)
        )
    del rows_all
    return {"sequences": n, "tokens": sum(e["tokens"] for e in entries), "shards": entries}


# --- CLI ----------------------------------------------------------------------------------------


def summary(manifest: Dict[str, Any]) -> str:
    sp = manifest["splits"]
    val = sp.get("val", {"shards": [], "sequences": 0, "tokens": 0})
    return (
        f"{manifest['location']}: {len(sp['train']['shards'])} train shards ({sp['train']['sequences']:,} sequences, "
        f"{sp['train']['tokens']:,} tokens), {len(val['shards'])} val shards ({val['sequences']:,} sequences, "
        f"{val['tokens']:,} tokens); seq_len {manifest['seq_len']}, vocab {manifest['vocab_size']} "
        f"({manifest['dtype']}); tokenizer in {manifest['tokenizer']['path']}/"
    )


def main(cfg) -> int:
    """``scale-hyper prepare``: make sure ``cfg.data.output`` holds prepared data; print a summary."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        manifest = ensure_prepared(cfg.data, seed=cfg.train.seed)
    except ValueError as err:
        print(f"scale-hyper prepare: error: {err}", file=sys.stderr)
        return 2
    print(f"prepared {summary(manifest)}")
    return 0
