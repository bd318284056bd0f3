"""Documents from ``data.source``, streamed one string at a time, in a deterministic order.

- ``stdlib``: real English that exists on every machine with no download: the topics of Python's
  own documentation (``pydoc_data.topics``, one document per topic, sorted by name), then the
  docstrings of standard-library modules, one document per module (files sorted by path). Docstrings
  are read with ``ast`` from the source files, so no module is imported or executed.
- a local file, directory, glob, URL, or a comma-separated list of them: ``.txt``, ``.jsonl``
  (``.gz``/``.zst`` compressed too) and ``.parquet``, read by ``formats``.
- ``hf:NAME``: a Hugging Face ``datasets`` dataset in streaming mode (``data.hf_config``,
  ``data.hf_split``, ``data.hf_data_files``), e.g. ``hf:Salesforce/wikitext`` with
  ``data.hf_config=wikitext-103-raw-v1``, or ``hf:json`` with ``data.hf_data_files=corpus.jsonl``.

Blank documents are dropped; ``data.max_documents`` (0 = all) counts the documents kept.
"""

from __future__ import annotations

import ast
import glob
import itertools
import os
import sys
import sysconfig
from functools import lru_cache
from typing import Any, Callable, Dict, Iterable, Iterator, List

from scale_hyper.prepare import formats

# stdlib parts whose docstrings are tests, vendored code or GUI demos, not documentation.
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "turtledemo"}
_MAX_SOURCE_BYTES = 2_000_000  # a few generated files are huge and hold no prose


def iter_documents(cfg) -> Iterator[str]:
    """The non-blank documents of ``cfg.source`` (a DataConfig), honouring ``cfg.max_documents``."""
    docs = (d for d in _raw_documents(cfg) if d and not d.isspace())
    if cfg.max_documents and cfg.max_documents > 0:
        docs = itertools.islice(docs, cfg.max_documents)
    return docs


def _raw_documents(cfg) -> Iterator[str]:
    source = cfg.source
    if source == "stdlib":
        return iter(_stdlib_documents())
    if source.startswith("hf:"):
        return _hf_documents(cfg)
    return _file_documents(cfg)


def describe(cfg) -> Dict[str, Any]:
    """What the corpus was, for the manifest (local files: names and sizes, so a change is noticed)."""
    out: Dict[str, Any] = {"source": cfg.source, "max_documents": cfg.max_documents}
    if cfg.source == "stdlib":
        out["python"] = sys.version.split()[0]  # the stdlib corpus follows the Python version
    elif cfg.source.startswith("hf:"):
        out.update(
            hf_config=cfg.hf_config, hf_split=cfg.hf_split, hf_data_files=cfg.hf_data_files, text_field=cfg.text_field
        )
    else:
        files = local_files(cfg.source)
        out["files"] = [[p, None] if formats.is_remote(p) else [os.path.basename(p), os.path.getsize(p)] for p in files]
        out["text_field"] = cfg.text_field
    return out


# --- stdlib -----------------------------------------------------------------------------------


class _Memo:
    """Replays a generator's items to any number of readers, generating each item once.

    Prepare reads the corpus twice (tokenizer, then shards); parsing the stdlib takes seconds, and
    a ``max_documents`` slice should parse only the files it needs.
    """

    def __init__(self, make: Callable[[], Iterator[str]]):
        self.make, self.items, self.gen = make, [], None  # type: ignore[var-annotated]
        self.done = False

    def __iter__(self) -> Iterator[str]:
        i = 0
        while True:
            if i < len(self.items):
                yield self.items[i]
                i += 1
                continue
            if self.done:
                return
            if self.gen is None:
                self.gen = self.make()
            try:
                self.items.append(next(self.gen))
            except StopIteration:
                self.done = True


@lru_cache(maxsize=1)
def _stdlib_documents() -> _Memo:
    """≈0.5 MB of pydoc topics, then ≈1.7 MB of module docstrings."""
    return _Memo(lambda: itertools.chain(_pydoc_topics(), _stdlib_docstrings()))


def _pydoc_topics() -> Iterator[str]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield topics[name]


def _stdlib_docstrings() -> Iterator[str]:
    root = sysconfig.get_paths()["stdlib"]
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for fname in sorted(filenames):
            if not fname.endswith(".py"):
                continue
            path = os.path.join(dirpath, fname)
            try:
                if os.path.getsize(path) > _MAX_SOURCE_BYTES:
                    continue
                with open(path, encoding="utf-8") as f:
                    tree = ast.parse(f.read(), filename=path)
            except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
                continue  # unreadable or not Python 3.x source (e.g. lib2to3 test data)
            text = "\n\n".join(_docstrings(tree))
            if text:
                yield text


_DEFS = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _docstrings(tree: ast.Module) -> List[str]:
    """Module, class and function docstrings in source order (ast.walk's order is breadth-first).

    Only statement bodies are followed (docstrings live nowhere else), which keeps this fast.
    """
    out: List[str] = []
    stack: List[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        doc = ast.get_docstring(node, clean=True)  # type: ignore[arg-type]
        if doc and len(doc) >= 20:  # "Return x." style one-liners add little
            out.append(doc)
        children = [n for n in _statements(node) if isinstance(n, _DEFS)]
        stack.extend(reversed(children))
    return out


def _statements(node: ast.AST) -> Iterator[ast.stmt]:
    """Statements directly or conditionally (if/try/with) inside ``node``'s body."""
    for field in ("body", "orelse", "finalbody", "handlers"):
        for child in getattr(node, field, ()) or ():
            if isinstance(child, _DEFS):
                yield child
            elif isinstance(child, (ast.If, ast.Try, ast.With, ast.ExceptHandler)):
                yield from _statements(child)


# --- files and slices ---------------------------------------------------------------------------


def local_files(source: str) -> List[str]:
    """Expand a file, directory, glob, URL or comma-separated list into a list of files (sorted per part)."""
    files: List[str] = []
    for part in [p.strip() for p in source.split(",") if p.strip()]:
        if formats.is_remote(part):
            found = [part]  # a URL is taken as named: remote stores cannot be globbed here
        else:
            part = os.path.expanduser(part)
            if os.path.isdir(part):
                found = [os.path.join(dp, f) for dp, _, fs in os.walk(part) for f in fs if f.endswith(formats.SUFFIXES)]
            elif any(c in part for c in "*?["):
                found = glob.glob(part, recursive=True)
            elif os.path.isfile(part):
                found = [part]
            else:
                raise ValueError(
                    f"data.source={source!r}: {part!r} is not 'stdlib', 'hf:NAME', a file, a URL, a directory or a glob"
                )
        files.extend(sorted(found))
    if not files:
        raise ValueError(
            f"data.source={source!r} matches no files — check the path or glob; accepted files end in "
            f"{', '.join(formats.SUFFIXES)}"
        )
    return files


def plan_slices(cfg) -> List[Dict[str, Any]]:
    """The corpus cut into slices (see prepare.py), each with its ``id``; fixed by the corpus alone.

    Files are cut into parts by ``formats.file_slices`` and runs of consecutive whole files are
    joined (``_join_whole_files``); a stream that cannot be entered in the middle (stdlib, a one-shard
    ``hf:`` dataset, or any source with ``data.max_documents``) is read once here to count its
    documents and cut into blocks of ``data.slice_documents``.
    """
    if cfg.source.startswith("hf:") and not cfg.max_documents:
        n = _hf_dataset(cfg).num_shards
        if n > 1:
            return [{"id": k, "kind": "hf_shard", "shard": k, "of": n, "files": 1} for k in range(n)]
    if cfg.source == "stdlib" or cfg.source.startswith("hf:") or cfg.max_documents:
        total = sum(1 for _ in iter_documents(cfg))
        if total == 0:
            raise ValueError(f"data.source={cfg.source!r} has no documents (all blank?); check data.source")
        step = cfg.slice_documents
        starts = range(0, max(total, 1), step)
        return [{"id": k, "kind": "docs", "start": a, "end": min(total, a + step)} for k, a in enumerate(starts)]
    return [{"id": k, **sl} for k, sl in enumerate(_file_slices(cfg))]


def _file_slices(cfg) -> Iterator[Dict[str, Any]]:
    parts = (p for path in local_files(cfg.source) for p in formats.file_slices(path, cfg.text_field, cfg.slice_bytes))
    return _join_whole_files(parts, cfg.slice_bytes)


def _join_whole_files(parts: Iterable[Dict[str, Any]], slice_bytes: int) -> Iterator[Dict[str, Any]]:
    """Consecutive whole files joined into slices of up to ``slice_bytes`` (``kind: files``, with
    [path, bytes] per file); every other part (a byte range, row groups, a remote file) is a slice
    alone. Every slice says how many input files it holds (``files``)."""
    run: List[List[Any]] = []
    size = 0
    for part in parts:
        if part["kind"] == "whole" and (not run or size + part["bytes"] <= slice_bytes):
            run.append([part["file"], part["bytes"]])
            size += part["bytes"]
            continue
        if run:
            yield {"kind": "files", "paths": run, "bytes": size, "files": len(run)}
            run, size = [], 0
        if part["kind"] == "whole":
            run, size = [[part["file"], part["bytes"]]], part["bytes"]
        else:
            yield {**part, "files": 1}
    if run:
        yield {"kind": "files", "paths": run, "bytes": size, "files": len(run)}


def slice_documents(cfg, sl: Dict[str, Any]) -> Iterator[str]:
    """The non-blank documents of one slice of ``plan_slices``."""
    if sl["kind"] == "docs":
        docs: Iterator[str] = itertools.islice(iter_documents(cfg), sl["start"], sl["end"])
    elif sl["kind"] == "hf_shard":
        docs = _hf_rows(cfg, _hf_dataset(cfg).shard(num_shards=sl["of"], index=sl["shard"]))
    elif sl["kind"] == "files":
        docs = (d for path, _ in sl["paths"] for d in formats.slice_documents(_whole(path), cfg.text_field))
    else:
        docs = formats.slice_documents(sl, cfg.text_field)
    return (d for d in docs if d and not d.isspace())


def _whole(path: str) -> Dict[str, Any]:
    return {"kind": "whole", "file": path}


def _file_documents(cfg) -> Iterator[str]:
    for sl in _file_slices(cfg):
        yield from slice_documents(cfg, sl)


# --- Hugging Face datasets ----------------------------------------------------------------------


def _hf_dataset(cfg):
    import datasets

    name = cfg.source[len("hf:") :]
    kwargs: Dict[str, Any] = {"split": cfg.hf_split, "streaming": True}  # never hold the corpus
    if cfg.hf_data_files:
        kwargs["data_files"] = cfg.hf_data_files
    return datasets.load_dataset(name, cfg.hf_config, **kwargs)


def _hf_documents(cfg) -> Iterator[str]:
    return _hf_rows(cfg, _hf_dataset(cfg))


def _hf_rows(cfg, ds) -> Iterator[str]:
    for row in ds:
        if cfg.text_field not in row:
            raise ValueError(
                f"data.source={cfg.source!r}: rows have no field data.text_field={cfg.text_field!r} "
                f"(fields: {sorted(row)}); set data.text_field"
            )
        text = row[cfg.text_field]
        if isinstance(text, str):
            yield text
