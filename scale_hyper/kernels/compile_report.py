"""What the GPU compiler makes of the fused HyperMixing kernels, without a GPU.

Triton compiles for any NVIDIA target on a CPU-only machine (``triton.compile`` with a
``GPUTarget``) and ships the ``ptxas`` it uses; ``ptxas -v`` reports each kernel's registers per
thread, spill stores/loads and stack frame, and Triton's metadata the shared memory a program
needs. This module compiles the kernels exactly as ``FusedHyperMixing`` launches them: it runs the
real forward and backward on small CPU tensors with the launches recorded instead of executed, then
specialises each recorded call (argument types, 16-byte divisibility, constexprs, ``num_warps``) for
the target the way Triton's launcher does, and compiles it.

    python -m scale_hyper.kernels.compile_report            # every supported geometry, sm_80 + sm_90
    python -m scale_hyper.kernels.compile_report --arch 90 --dims 64,128 --dtypes bf16 --json r.json

``report()`` returns the rows; ``problems()`` names every spill or shared-memory overflow
(``tests/test_kernels.py`` fails on any). Imports Triton only (a leaf, like the kernels).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Iterable, Iterator, List, Optional, Sequence

import torch

from . import hypermixing_triton as fused

DIMS = (16, 32, 64, 128)  # every supported d/H and d'/H (powers of two in [MIN_DIM, MAX_DIM])
ARCHS = (80, 90)
# The largest shared memory one block may opt into, bytes (CUDA programming guide, compute capabilities).
SHARED_LIMIT = {80: 166_912, 86: 101_376, 89: 101_376, 90: 232_448}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MAX_REGISTERS = 255


@dataclass
class KernelReport:
    kernel: str  # reduce_fwd | expand_fwd | reduce_bwd | expand_bwd, "+split" for the partial-sum variant
    arch: int  # compute capability ×10: 80 = sm_80 (A100), 90 = sm_90a (H100/H200)
    dtype: str  # bf16 | fp16 | fp32 (fp32 notes its dot precision: "fp32/tf32", "fp32/ieee")
    p: int  # d'/H
    c: int  # d/H
    num_warps: int
    num_stages: int
    registers: int
    spill_stores: int  # bytes
    spill_loads: int  # bytes
    stack_frame: int  # bytes
    shared: int  # bytes of shared memory per program
    shared_limit: int

    @property
    def problem(self) -> Optional[str]:
        what = []
        if self.spill_stores or self.spill_loads:
            what.append(f"spills {self.spill_stores} B stores / {self.spill_loads} B loads")
        if self.shared > self.shared_limit:
            what.append(f"needs {self.shared:,} B shared memory > {self.shared_limit:,}")
        return ", ".join(what) or None


class _Recorder:
    """Stands in for one jitted kernel: ``kernel[grid](*args, **kwargs)`` records instead of launching."""

    def __init__(self, name: str, calls: list):
        self.name, self.calls = name, calls

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((self.name, args, kwargs))

        return launch


@contextmanager
def _recording(calls: list) -> Iterator[None]:
    names = ("reduce_fwd", "expand_fwd", "reduce_bwd", "expand_bwd")
    original = fused._kernels
    fused._kernels = lambda mode: SimpleNamespace(**{n: _Recorder(n, calls) for n in names})  # type: ignore[assignment]
    try:
        yield
    finally:
        fused._kernels = original  # type: ignore[assignment]


@contextmanager
def _fp32_precision(precision: str) -> Iterator[None]:
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def launches(p: int, c: int, dtype: torch.dtype, split: int = 1, heads: int = 2, n: int = 256) -> list:
    """The kernel launches of one forward + backward at d'/H = p, d/H = c: [(name, args, kwargs)].

    CPU tensors with the real layouts (W1/W2 as the two halves of one [B, N, 2·H·p] tensor, as
    the hypernetwork produces them); N = 256 tokens, a multiple of 16 like every training length.
    """
    if fused.interpreting():
        raise RuntimeError("the compile report needs compiled kernels: unset TRITON_INTERPRET")
    x = torch.zeros(2, n, heads * c, dtype=dtype, requires_grad=True)
    w = torch.zeros(2, n, 2 * heads * p, dtype=dtype, requires_grad=True)
    divisor = torch.full((2,), float(n), dtype=torch.float32)
    calls: list = []
    with _recording(calls):
        prec = fused.dot_precision(dtype, interpreting=False)
        y = fused.FusedHyperMixing.apply(
            x, *w.chunk(2, dim=-1), divisor, heads, True, fused.BLOCK_N, split, prec, False
        )
        y.backward(torch.zeros_like(y))
    return calls


def _ptxas_report(ptx: str, arch: int, fp_fusion: bool) -> dict:
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        cmd = [get_ptxas(arch).path, "-v", "-lineinfo", "--regAllocOptLevel=2", *([] if fp_fusion else ["--fmad=false"]),
               f"--gpu-name={sm_arch_from_capability(arch)}", str(src), "-o", str(Path(tmp) / "kernel.o")]  # fmt: skip
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr

    def number(pattern: str) -> int:
        found = re.search(pattern, log)
        if found is None:
            raise RuntimeError(f"ptxas -v printed no '{pattern}':\n{log}")
        return int(found.group(1))

    return {
        "registers": number(r"Used (\d+) registers"),
        "spill_stores": number(r"(\d+) bytes spill stores"),
        "spill_loads": number(r"(\d+) bytes spill loads"),
        "stack_frame": number(r"(\d+) bytes stack frame"),
    }


def compile_launch(name: str, args: Sequence, kwargs: dict, arch: int):
    """One recorded launch compiled for sm_{arch}, specialised as Triton's launcher would: (compiled, ptxas)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kernel = getattr(fused._JITTED[False], name)  # compiled mode whatever TRITON_INTERPRET says
    bind = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = bind(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Triton 3.9's notice about its future FP-fusion default
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)  # fmt: skip
    return compiled, _ptxas_report(compiled.asm["ptx"], arch, compiled.metadata.enable_fp_fusion)


def report(
    archs: Iterable[int] = ARCHS,
    dtypes: Iterable[str] = ("bf16", "fp16", "fp32"),
    dims: Iterable[int] = DIMS,
    fp32_precision: str = "high",
    splits: Iterable[int] = (1, 2),
    log=None,
) -> List[KernelReport]:
    """Every kernel at every (d'/H, d/H) in dims × dims, dtype and arch, as ``FusedHyperMixing``
    launches it. splits: 1 = the single pass (epilogue in the kernel), 2 = the split-N variants of
    the reductions. fp32_precision: torch's float32 matmul precision for the fp32 rows ("high" =
    tf32 dots, the route the model takes; "highest" = exact fp32 dots, which it avoids on GPUs)."""
    rows: List[KernelReport] = []
    dims = list(dims)
    with _fp32_precision(fp32_precision):
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            label = dtype_name if dtype != torch.float32 else f"fp32/{fused.dot_precision(dtype, False)}"
            for p in dims:
                for c in dims:
                    seen = set()
                    for split in splits:
                        for name, args, kwargs in launches(p, c, dtype, split):
                            kernel = name + ("+split" if kwargs.get("PARTIAL") else "")
                            if kernel in seen:  # the expand kernels do not depend on SPLIT
                                continue
                            seen.add(kernel)
                            for arch in archs:
                                compiled, ptxas = compile_launch(name, args, kwargs, arch)
                                meta = compiled.metadata
                                row = KernelReport(kernel, arch, label, p, c, meta.num_warps, meta.num_stages,
                                                   shared=meta.shared, shared_limit=SHARED_LIMIT[arch], **ptxas)  # fmt: skip
                                rows.append(row)
                                if log:
                                    log(format_row(row))
    return rows


def problems(rows: Iterable[KernelReport]) -> List[str]:
    return [f"{format_row(r)}: {r.problem}" for r in rows if r.problem]


def format_row(r: KernelReport) -> str:
    return (f"sm_{r.arch} {r.dtype:<9} {r.kernel:<16} d'/H={r.p:<3} d/H={r.c:<3} warps {r.num_warps} "
            f"regs {r.registers:>3} spill {r.spill_stores:>6} B smem {r.shared / 1024:6.1f} KB")  # fmt: skip


def format_table(rows: Iterable[KernelReport]) -> str:
    head = (
        "| arch | dtype | kernel | d'/H | d/H | warps | stages | registers | spill stores | spill loads | shared KB |"
    )
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        out.append(f"| sm_{r.arch} | {r.dtype} | {r.kernel} | {r.p} | {r.c} | {r.num_warps} | {r.num_stages} | "
                   f"{r.registers} | {r.spill_stores} | {r.spill_loads} | {r.shared / 1024:.1f} |")  # fmt: skip
    return "\n".join(out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scale_hyper.kernels.compile_report", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--arch", default="80,90", help="compute capabilities ×10, comma-separated (80, 86, 89, 90)")
    parser.add_argument("--dtypes", default="bf16,fp16,fp32", help="bf16, fp16, fp32 (comma-separated)")
    parser.add_argument("--dims", default=",".join(map(str, DIMS)), help="d/H and d'/H values (comma-separated)")
    parser.add_argument("--fp32-precision", default="high", choices=("high", "highest"),
                        help="torch float32 matmul precision for the fp32 rows: high = tf32 dots, highest = exact")  # fmt: skip
    parser.add_argument("--json", help="also write the rows as JSON to this path")
    parser.add_argument("--quiet", action="store_true", help="print the table only")
    opts = parser.parse_args(argv)
    archs = [int(a) for a in opts.arch.split(",")]
    unknown = [a for a in archs if a not in SHARED_LIMIT]
    if unknown:
        parser.error(f"--arch {unknown}: choose from {', '.join(map(str, SHARED_LIMIT))}")
    rows = report(archs, opts.dtypes.split(","), [int(d) for d in opts.dims.split(",")], opts.fp32_precision,
                  log=None if opts.quiet else lambda s: print(s, flush=True))  # fmt: skip
    print(format_table(rows))
    if opts.json:
        Path(opts.json).write_text(json.dumps([asdict(r) | {"problem": r.problem} for r in rows], indent=1))
    bad = problems(rows)
    for line in bad:
        print(f"PROBLEM {line}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
