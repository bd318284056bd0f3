"""Input files, local or remote, cut into slices that a prepare task can read on its own.

Formats (by name; ``.gz``/``.zst`` compression on top of text formats):

- ``.txt``: documents separated by blank lines (very long ones are cut at a line).
- ``.jsonl``: one JSON object per line, text in ``data.text_field``.
- ``.parquet``: column ``data.text_field`` (needs ``pyarrow``).

``file_slices`` cuts one file into the parts a slice may hold, fixed by the file alone (so the same
corpus gives the same slices however many tasks read it); ``sources.plan_slices`` then joins
consecutive whole files into slices of up to ``data.slice_bytes``:

- a local file of at most ``data.slice_bytes`` (as stored: compressed files count their compressed
  size): whole (``kind: whole``), to be joined with its neighbours.
- a larger uncompressed local text file: byte ranges of ``data.slice_bytes``; a line belongs to the
  range in which it starts (a reader seeks to the range start and skips the rest of the line it lands
  in). A paragraph of a ``.txt`` that crosses a range boundary becomes two documents.
- a larger parquet file: runs of consecutive row groups of up to ``data.slice_bytes`` (uncompressed,
  from the footer; no data is read).
- a larger compressed file, or a remote one (its size is not asked for): one slice per file (it
  cannot be entered in the middle).

Text must be UTF-8: a file that is not (binary, another encoding) stops prepare with its path, the
offset of the first bad byte and the fix (``InputError``), never a traceback or replaced characters.

Remote files are URLs opened through ``storage.open_read`` (``http(s)://`` with curl, ``s3://``);
globs and directories are local only.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
import zlib
from typing import IO, Any, Dict, Iterable, Iterator, List, Optional, Tuple

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


class InputError(ValueError):
    """An input file that cannot be read as what its name says (one line, exit 2)."""

    user_error = True


def is_remote(path: str) -> bool:
    return not storage.is_local(path)


def _compression(path: str) -> str:
    return "gz" if path.endswith(".gz") else "zst" if path.endswith(".zst") else ""


def _base_name(path: str) -> str:
    comp = _compression(path)
    return path[: -len(comp) - 1] if comp else path


def file_slices(path: str, text_field: str, slice_bytes: int) -> List[Dict[str, Any]]:
    """The parts of one input file (see the module docstring), without slice ids."""
    if is_remote(path):
        return [{"kind": "file", "file": path}]
    size = os.path.getsize(path)
    if size <= slice_bytes:
        if path.endswith(".parquet"):
            _check_parquet_column(path, _parquet_file(path).schema_arrow.names, text_field)
        return [{"kind": "whole", "file": path, "bytes": size}]
    if path.endswith(".parquet"):
        pf = _parquet_file(path)
        _check_parquet_column(path, pf.schema_arrow.names, text_field)
        return [{"kind": "rowgroups", "file": path, "start": a, "end": b} for a, b in _group_runs(pf, slice_bytes)]
    if _compression(path):
        return [{"kind": "file", "file": path}]
    n = -(-size // slice_bytes)
    return [
        {"kind": "bytes", "file": path, "start": k * slice_bytes, "end": min(size, (k + 1) * slice_bytes)}
        for k in range(n)
    ]


def _group_runs(pf, slice_bytes: int) -> List[Tuple[int, int]]:
    """Runs [a, b) of consecutive row groups of up to ``slice_bytes`` (a larger group is a run alone)."""
    runs: List[Tuple[int, int]] = []
    start, size = 0, 0
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).total_byte_size
        if g > start and size + n > slice_bytes:
            runs.append((start, g))
            start, size = g, 0
        size += n
    return runs + [(start, max(start + 1, pf.metadata.num_row_groups))]


def slice_documents(sl: Dict[str, Any], text_field: str) -> Iterator[str]:
    """The raw documents of one file part (blank ones included; the caller drops them)."""
    path = sl["file"]
    if path.endswith(".parquet"):
        groups = range(sl["start"], sl["end"]) if sl["kind"] == "rowgroups" else None
        yield from _parquet_documents(path, text_field, groups)
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
    comp = _compression(path)
    with _open_binary(path) as raw:
        if not comp:
            yield from _decoded_lines(raw, path)
            return
        broken: tuple = (OSError, EOFError, zlib.error)  # gzip.BadGzipFile is an OSError
        if comp == "gz":
            stream: Any = gzip.GzipFile(fileobj=raw)
        else:
            import zstandard

            stream = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
            broken += (zstandard.ZstdError,)
        try:
            yield from _decoded_lines(stream, path)
        except broken as err:
            raise InputError(f"{path} is not a readable .{comp} file ({err}) — {_FIX}") from None


_FIX = "remove it from data.source (or fix the file), then prepare again"


def _decode(line: bytes, path: str, offset: int) -> str:
    """``line`` as text; InputError naming the file and byte for a binary or non-UTF-8 file."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as err:
        bad = offset + err.start
        raise InputError(
            f"{path} is not UTF-8 text (byte 0x{line[err.start]:02x} at offset {bad:,}) — convert it to UTF-8 "
            f"(e.g. `iconv -f latin1 -t utf-8`) or {_FIX}"
        ) from None
    if "\x00" in text:
        raise InputError(f"{path} is not a text file (a NUL byte at offset {offset + line.index(0):,}) — {_FIX}")
    return text


def _decoded_lines(stream, path: str) -> Iterator[str]:
    """Lines of a binary stream that only offers ``read(n)`` (webdataset's Pipe has no ``readable``)."""
    rest, offset = b"", 0
    while True:
        block = stream.read(1 << 20)
        if not block:
            break
        lines = (rest + block).split(b"\n")
        rest = lines.pop()
        for line in lines:
            yield _decode(line, path, offset) + "\n"
            offset += len(line) + 1
    if rest:
        yield _decode(rest, path, offset)


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
            yield _decode(line, path, pos)
            pos += len(line)


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
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except pa.ArrowException as err:
        raise InputError(f"{path} is not a parquet file ({err}) — {_FIX}") from None


def _check_parquet_column(path: str, names: List[str], text_field: str) -> None:
    if text_field not in names:
        raise InputError(
            f"{path} has no column data.text_field={text_field!r} (columns: {names}) — "
            "set data.text_field to the column that holds the text"
        )


def _parquet_documents(path: str, text_field: str, groups: Optional[Iterable[int]]) -> Iterator[str]:
    if is_remote(path):  # parquet needs random access: copy the file first
        with tempfile.NamedTemporaryFile(suffix=".parquet") as tmp:
            with _open_binary(path) as src:
                shutil.copyfileobj(src, tmp)
            tmp.flush()
            yield from _parquet_documents(tmp.name, text_field, None)
        return
    pf = _parquet_file(path)
    _check_parquet_column(path, pf.schema_arrow.names, text_field)
    for g in range(pf.metadata.num_row_groups) if groups is None else groups:
        for text in pf.read_row_group(g, columns=[text_field]).column(0).to_pylist():
            if isinstance(text, str):
                yield text
