"""Input files, local or remote, cut into slices that a prepare task can read on its own.

Formats (by name; ``.gz``/``.zst`` compression on top of text formats):

- ``.txt``: documents separated by blank lines (very long ones are cut at a line).
- ``.jsonl``: one JSON object per line, text in ``data.text_field``.
- ``.parquet``: column ``data.text_field`` (needs ``pyarrow``).

A slice is a part of one file that is fixed by the file alone, so the same corpus gives the same
slices however many tasks read it:

- uncompressed local text: byte ranges of ``data.slice_bytes``; a line belongs to the range in
  which it starts (a reader seeks to the range start and skips the rest of the line it lands in).
  A paragraph of a ``.txt`` that crosses a range boundary becomes two documents.
- parquet: one slice per row group (read from the footer, no data is read).
- compressed or remote files: one slice per file (they cannot be entered in the middle).

Remote files are URLs opened through ``storage.open_read`` (``http(s)://`` with curl, ``s3://``);
globs and directories are local only.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
from typing import IO, Any, Dict, Iterator, List

from scale_hyper.data import storage

TEXT_SUFFIXES = (".txt", ".jsonl", ".json")
SUFFIXES = (
    ".txt",
    ".jsonl",
    ".txt.gz",
    ".jsonl.gz",
    ".txt.zst",
    ".jsonl.zst",
    ".parquet",
)
_MAX_TXT_DOC_CHARS = 1_000_000  # a .txt without blank lines is still cut into bounded documents


def is_remote(path: str) -> bool:
    return not storage.is_local(path)


def _compression(path: str) -> str:
    return "gz" if path.endswith(".gz") else "zst" if path.endswith(".zst") else ""


def _base_name(path: str) -> str:
    comp = _compression(path)
    return path[: -len(comp) - 1] if comp else path


def file_slices(path: str, text_field: str, slice_bytes: int) -> List[Dict[str, Any]]:
    """The slices of one input file (without their global ids)."""
    if path.endswith(".parquet"):
        if is_remote(path):
            return [{"kind": "file", "file": path}]
        pf = _parquet_file(path)
        _check_parquet_column(path, pf.schema_arrow.names, text_field)
        return [{"kind": "rowgroup", "file": path, "group": g} for g in range(max(1, pf.metadata.num_row_groups))]
    if is_remote(path) or _compression(path):
        return [{"kind": "file", "file": path}]
    size = os.path.getsize(path)
    n = max(1, -(-size // slice_bytes))
    return [
        {"kind": "bytes", "file": path, "start": k * slice_bytes, "end": min(size, (k + 1) * slice_bytes)}
        for k in range(n)
    ]


def slice_documents(sl: Dict[str, Any], text_field: str) -> Iterator[str]:
    """The raw documents of one file slice (blank ones included; the caller drops them)."""
    path = sl["file"]
    if path.endswith(".parquet"):
        yield from _parquet_documents(path, text_field, sl.get("group"))
        return
    if sl["kind"] == "bytes":
        lines: Iterator[str] = _range_lines(path, sl["start"], sl["end"])
    else:
        lines = _all_lines(path)
    name = _base_name(path)
    if name.endswith(".jsonl") or name.endswith(".json"):
        yield from _jsonl_documents(lines, path, text_field)
    else:
        yield from _txt_documents(lines)


# --- text ---------------------------------------------------------------------------------------


def _open_binary(path: str) -> IO[bytes]:
    if is_remote(path):
        return storage.open_read(path, allow_pipe=False)
    return open(storage.local_path(path), "rb")


def _all_lines(path: str) -> Iterator[str]:
    with _open_binary(path) as raw:
        comp = _compression(path)
        if comp == "gz":
            stream: Any = gzip.GzipFile(fileobj=raw)
        elif comp == "zst":
            import zstandard

            stream = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
        else:
            stream = raw
        yield from _decoded_lines(stream)


def _decoded_lines(stream) -> Iterator[str]:
    """Lines of a binary stream that only offers ``read(n)`` (webdataset's Pipe has no ``readable``)."""
    rest = b""
    while True:
        block = stream.read(1 << 20)
        if not block:
            break
        lines = (rest + block).split(b"\n")
        rest = lines.pop()
        for line in lines:
            yield line.decode("utf-8", errors="replace") + "\n"
    if rest:
        yield rest.decode("utf-8", errors="replace")


def _range_lines(path: str, start: int, end: int) -> Iterator[str]:
    """Lines that start at a byte offset in ``[start, end)``."""
    with open(path, "rb") as f:
        if start > 0:
            f.seek(start - 1)
            f.readline()  # the rest of the line that began before `start` (just "\n" when one ends there)
        pos = f.tell()
        while pos < end:
            line = f.readline()
            if not line:
                return
            pos += len(line)
            yield line.decode("utf-8", errors="replace")


def _jsonl_documents(lines: Iterator[str], path: str, text_field: str) -> Iterator[str]:
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: line {lineno} of its slice is not JSON ({err.msg})") from None
        if not isinstance(row, dict) or text_field not in row:
            keys = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise ValueError(f"{path}: no field data.text_field={text_field!r} (found {keys}) — set data.text_field")
        text = row[text_field]
        if isinstance(text, str):
            yield text


def _txt_documents(lines: Iterator[str]) -> Iterator[str]:
    """Blank-line-separated paragraphs are documents (very long ones are cut at a line)."""
    buf: List[str] = []
    size = 0
    for line in lines:
        if line.strip():
            buf.append(line)
            size += len(line)
            if size < _MAX_TXT_DOC_CHARS:
                continue
        if buf:
            yield "".join(buf).strip()
            buf, size = [], 0
    if buf:
        yield "".join(buf).strip()


# --- parquet ------------------------------------------------------------------------------------


def _parquet_file(path: str):
    import pyarrow.parquet as pq

    return pq.ParquetFile(path)


def _check_parquet_column(path: str, names: List[str], text_field: str) -> None:
    if text_field not in names:
        raise ValueError(
            f"{path} has no column data.text_field={text_field!r} (columns: {names}) — "
            "set data.text_field to the column that holds the text"
        )


def _parquet_documents(path: str, text_field: str, group) -> Iterator[str]:
    if is_remote(path):  # parquet needs random access: copy the file first
        with tempfile.NamedTemporaryFile(suffix=".parquet") as tmp:
            with _open_binary(path) as src:
                shutil.copyfileobj(src, tmp)
            tmp.flush()
            yield from _parquet_documents(tmp.name, text_field, None)
        return
    pf = _parquet_file(path)
    _check_parquet_column(path, pf.schema_arrow.names, text_field)
    groups = [group] if group is not None else range(pf.metadata.num_row_groups)
    for g in groups:
        if pf.metadata.num_row_groups == 0:
            return
        for text in pf.read_row_group(g, columns=[text_field]).column(0).to_pylist():
            if isinstance(text, str):
                yield text
