"""`scale-hyper bench prepare --files N`: a corpus of N small files against the same text as one file.

The embedded stdlib corpus is cut at paragraph boundaries into N files of a few KB (1–4 KB, drawn
from a fixed seed, the corpus repeated as often as needed) and written once more, unchanged, as one
large ``.txt``. Both are prepared with this config (``data.tokenizer_train_chars`` capped at
``TOKENIZER_CHARS``: the tokenizer is not what is measured). For each: slices, input files per
slice, training and validation shards (count, sequences and bytes), prepare time (wall and CPU) and
the masked tokens per second and per CPU-second of one loader worker over the result (``bench
data``'s pipeline, in-process).
The small-file corpus is prepared a second time as 4 tasks; the two outputs must be byte-identical.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import statistics
import tempfile
import time
from typing import Any, Dict, Iterator, List, Tuple

import numpy as np

from scale_hyper.bench.prepare import cpu_seconds
from scale_hyper.prepare import main as preplib
from scale_hyper.prepare import sources

FILE_BYTES = (1024, 4096)
TOKENIZER_CHARS = 10_000_000


def _paragraphs() -> Iterator[str]:
    """The corpus' paragraphs, over and over (read lazily: a small corpus parses only what it needs)."""
    from scale_hyper.config.schema import DataConfig

    cfg = DataConfig(source="stdlib", max_documents=0)
    while True:  # the stdlib corpus is parsed once and replayed (sources._Memo)
        for d in sources.iter_documents(cfg):
            for p in d.split("\n\n"):
                if p.strip():
                    yield p.strip() + "\n"


def write_corpus(root: str, files: int, file_bytes: Tuple[int, int] = FILE_BYTES, seed: int = 0) -> Dict[str, Any]:
    """``files`` small .txt files under ``root/files/`` (paragraphs separated by blank lines) and
    ``root/all.txt``, their concatenation (the same paragraphs, in the same order)."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(file_bytes[0], file_bytes[1] + 1, size=files)
    paras = _paragraphs()
    os.makedirs(os.path.join(root, "files"), exist_ok=True)
    total = 0
    with open(os.path.join(root, "all.txt"), "w", encoding="utf-8") as big:
        for i, want in enumerate(sizes):
            parts: List[str] = []
            size = 0
            while size < want:
                p = next(paras)
                parts.append(p)
                size += len(p.encode())
            text = "\n".join(parts)
            # 1,000 files per directory, as sharded dumps are laid out; sorted names keep the order
            sub = os.path.join(root, "files", f"{i // 1000:04d}")
            if i % 1000 == 0:
                os.makedirs(sub, exist_ok=True)
            with open(os.path.join(sub, f"{i:07d}.txt"), "w", encoding="utf-8") as f:
                f.write(text)
            big.write(text + "\n")
            total += len(text.encode())
    return {"bytes": total, "small": os.path.join(root, "files"), "large": os.path.join(root, "all.txt")}


def _tree_digest(root: str) -> str:
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            h.update(os.path.relpath(path, root).encode())
            with open(path, "rb") as f:
                h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()


def _shards(manifest: Dict[str, Any], split: str) -> Dict[str, float]:
    shards = manifest["splits"].get(split, {}).get("shards", [])
    seqs, sizes = [s["sequences"] for s in shards], [s["bytes"] for s in shards]
    if not shards:
        return {"shards": 0}
    return {"shards": len(shards), "sequences": sum(seqs), "seq_min": min(seqs), "seq_median": statistics.median(seqs),
            "seq_max": max(seqs), "bytes_min": min(sizes), "bytes_median": statistics.median(sizes),
            "bytes_max": max(sizes), "bytes": sum(sizes)}  # fmt: skip


def _prepare(cfg, seed: int, tasks: int = 1) -> Dict[str, Any]:
    t0, c0 = time.perf_counter(), cpu_seconds()
    preplib.get_plan(cfg, seed, create=True)  # timed apart: listing the files, training the tokenizer
    plan_s = time.perf_counter() - t0
    manifest: Dict[str, Any] = {}
    for task in range(tasks):  # one after another: the last to finish merges, as on a cluster
        manifest = preplib.prepare(cfg, seed, task=task, tasks=tasks) or manifest
    return {"manifest": manifest, "plan_seconds": plan_s, "seconds": time.perf_counter() - t0,
            "cpu_seconds": cpu_seconds() - c0}  # fmt: skip


def measure(data_cfg, files: int, seed: int = 1234, micro_batch_size: int = 32, seconds: float = 3.0,
            file_bytes: Tuple[int, int] = FILE_BYTES) -> Dict[str, Any]:  # fmt: skip
    """Figures of both corpora (``small``, ``large``) and whether 1 and 4 tasks wrote the same bytes."""
    from scale_hyper.bench import data as benchdata

    with tempfile.TemporaryDirectory(prefix="scale-hyper-bench-files-") as tmp:
        t0 = time.perf_counter()
        corpus = write_corpus(os.path.join(tmp, "corpus"), files, file_bytes)
        out: Dict[str, Any] = {"files": files, "bytes": corpus["bytes"], "write_s": time.perf_counter() - t0}
        print(f"corpus: {out['bytes'] / 1e6:,.1f} MB of text, written in {out['write_s']:.1f} s", flush=True)
        base = dataclasses.replace(
            data_cfg, max_documents=0, num_workers=0, tokenizer_train_chars=min(
                data_cfg.tokenizer_train_chars or TOKENIZER_CHARS, TOKENIZER_CHARS))  # fmt: skip
        runs = {"small": (corpus["small"], 1), "large": (corpus["large"], 1), "small_4_tasks": (corpus["small"], 4)}
        for name, (source, tasks) in runs.items():
            print(f"preparing {name.replace('_', ' ')} ...", flush=True)
            cfg = dataclasses.replace(base, source=source, output=os.path.join(tmp, name))
            r = _prepare(cfg, seed, tasks)
            m = r.pop("manifest")
            tokens = m["splits"]["train"]["tokens"] + m["splits"]["val"]["tokens"]
            r.update(slices=m["slices"], slice_files=m["slice_files"], tokens=tokens, digest=_tree_digest(cfg.output),
                     train=_shards(m, "train"), val=_shards(m, "val"),
                     full_shards=math.ceil(m["splits"]["train"]["sequences"] / cfg.sequences_per_shard))  # fmt: skip
            if tasks == 1:
                wall, cpu = benchdata.loader_tokens_per_s(cfg, m, micro_batch_size, seconds)
                r.update(loader_tokens_per_s=wall, loader_tokens_per_cpu_s=cpu)
            out[name] = r
        out["identical"] = out["small"]["digest"] == out["small_4_tasks"]["digest"]
    return out


def main(cfg, files: int) -> int:
    d = cfg.data
    print(f"prepare: {files:,} small files of the embedded corpus ({FILE_BYTES[0]}–{FILE_BYTES[1]} bytes) against "
          f"the same text as one file; data.slice_bytes={d.slice_bytes:,}, data.sequences_per_shard="
          f"{d.sequences_per_shard:,}, seq_len {d.seq_len}, data.prepare_workers={d.prepare_workers}; "
          f"{os.cpu_count()} CPU cores here, load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    r = measure(d, files, seed=cfg.train.seed, micro_batch_size=cfg.train.micro_batch_size)
    head = ("corpus", "slices", "files/slice", "train shards", "ceil(seq/per)", "val shards", "train shard seq",
            "train shard MB", "prepare s (plan)", "CPU s", "tokens/CPU-s", "loader tokens/s", "per CPU-s")  # fmt: skip
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name in ("small", "large", "small_4_tasks"):
        x = r[name]
        t, v = x["train"], x["val"]
        per = [f for f in x["slice_files"] if f]
        row = [name.replace("_", " "), f"{x['slices']:,}", f"{min(per):,}–{max(per):,}" if per else "–",
               f"{t['shards']:,}", f"{x['full_shards']:,}", f"{v['shards']:,}",
               f"{t['seq_min']:,}–{t['seq_max']:,} (median {t['seq_median']:,.0f})",
               f"{t['bytes_min'] / 1e6:.2f}–{t['bytes_max'] / 1e6:.2f}",
               f"{x['seconds']:.1f} ({x['plan_seconds']:.1f})", f"{x['cpu_seconds']:.1f}",
               f"{x['tokens'] / max(x['cpu_seconds'], 1e-9) / 1e6:.2f}M",
               *[f"{x[k] / 1e6:.2f}M" if k in x else "–" for k in ("loader_tokens_per_s", "loader_tokens_per_cpu_s")]]  # fmt: skip
        print("| " + " | ".join(row) + " |")
    print(f"1 task and 4 tasks wrote the same bytes: {'yes' if r['identical'] else 'NO'}")
    return 0 if r["identical"] else 1
