"""One benchmark result row per (mixer, size, seq_len), and the markdown table `bench train` prints."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional


@dataclass
class Row:
    mixer: str
    size: str
    seq_len: int
    batch: int
    status: str = "ok"  # ok | OOM | skipped | error: ...
    step_ms: Optional[float] = None
    tokens_per_s: Optional[float] = None
    mfu: Optional[float] = None
    peak_mem_bytes: Optional[int] = None
    vs_hf: Optional[float] = None
    step_times_ms: List[float] = field(default_factory=list)
    step: str = ""  # what one step ran (plain torch and its precision, or the trainer's DeepSpeed engine)


COLUMNS = ("mixer", "size", "seq_len", "batch", "tokens/s", "x HF", "MFU", "peak mem", "step ms")


def _fmt_mem(b: Optional[int]) -> str:
    if b is None:
        return "-"
    return f"{b / 2**20:,.0f} MiB" if b < 2**30 else f"{b / 2**30:,.2f} GiB"


def format_table(rows: List[Row]) -> str:
    lines = []
    for r in rows:
        if r.status != "ok":
            cells = [r.mixer, r.size, str(r.seq_len), str(r.batch), r.status, "-", "-", "-", "-"]
        else:
            cells = [
                r.mixer, r.size, str(r.seq_len), str(r.batch), f"{r.tokens_per_s:,.0f}",
                f"{r.vs_hf:.2f}" if r.vs_hf else "-", f"{100 * r.mfu:.1f} %" if r.mfu is not None else "-",
                _fmt_mem(r.peak_mem_bytes), f"{r.step_ms:.1f}",
            ]  # fmt: skip
        lines.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in lines)) if lines else len(h) for i, h in enumerate(COLUMNS)]
    out = ["| " + " | ".join(h.ljust(w) for h, w in zip(COLUMNS, widths, strict=True)) + " |"]
    out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    out += ["| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |" for cells in lines]
    return "\n".join(out)
