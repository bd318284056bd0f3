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
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import warnings
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, Iterable, Iterator, List, Optional, Sequence

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
    block_n: int = 64  # tokens per tile
    tuned: bool = False  # --tune: the clean configuration found for a spilling default (not what runs yet)

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
    fused._kernels = lambda mode: SimpleNamespace(**{n: _Recorder(n, calls) for n in names})
    try:
        yield
    finally:
        fused._kernels = original


@contextmanager
def _fp32_precision(precision: str) -> Iterator[None]:
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def family(arch: int) -> str:
    return "sm90" if arch >= 90 else "sm80"


def launches(p: int, c: int, dtype: torch.dtype, split: int = 1, gpu_family: str = "sm90", heads: int = 2,
             n: int = 256) -> list:  # fmt: skip
    """The kernel launches of one forward + backward at d'/H = p, d/H = c on a GPU of ``gpu_family``:
    [(name, args, kwargs)], kwargs with the launch options (``launch.launch_config``).

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
        w1, w2 = w.chunk(2, dim=-1)
        y = fused.FusedHyperMixing.apply(x, w1, w2, divisor, heads, True, fused.BLOCK_N, split, prec, False, gpu_family)
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


# --tune: what is tried, in order, where the default launch spills (the first clean one is kept)
TUNE_REDUCE = [{"num_warps": w, "num_stages": st} for st in (3, 2, 4) for w in (4, 8, 2)]
TUNE_EXPAND = [{"num_warps": w, "BLOCK_N": bn} for bn in (64, 32, 16) for w in (4, 8, 16, 2)]


def _row(name: str, args, kwargs: dict, arch: int, label: str, p: int, c: int, kernel: str) -> KernelReport:
    compiled, ptxas = compile_launch(name, args, kwargs, arch)
    meta = compiled.metadata
    return KernelReport(kernel, arch, label, p, c, meta.num_warps, meta.num_stages, block_n=kwargs["BLOCK_N"],
                        shared=meta.shared, shared_limit=SHARED_LIMIT[arch], **ptxas)  # fmt: skip


def geometry_rows(dtype_name: str, p: int, c: int, archs: Sequence[int], splits: Sequence[int],
                  fp32_precision: str, tune: bool = False) -> List[KernelReport]:  # fmt: skip
    """Every kernel of one (dtype, d'/H = p, d/H = c) for every arch, launched as FusedHyperMixing
    launches it there. tune: where that spills on an arch, also the first TUNE_* candidate that is
    clean on every requested arch of its family (rows with tuned=True)."""
    rows = []
    dtype = DTYPES[dtype_name]
    with _fp32_precision(fp32_precision):
        label = dtype_name if dtype != torch.float32 else f"fp32/{fused.dot_precision(dtype, False)}"
        for fam in dict.fromkeys(family(a) for a in archs):
            members = [a for a in archs if family(a) == fam]
            seen = set()
            for split in splits:
                for name, args, kwargs in launches(p, c, dtype, split, fam):
                    kernel = name + ("+split" if kwargs.get("PARTIAL") else "")
                    if kernel in seen:  # the expand kernels do not depend on SPLIT
                        continue
                    seen.add(kernel)
                    found = [_row(name, args, kwargs, arch, label, p, c, kernel) for arch in members]
                    rows += found
                    if not tune or not any(r.problem for r in found):
                        continue
                    for candidate in TUNE_EXPAND if name.startswith("expand") else TUNE_REDUCE:
                        tried = [_row(name, args, {**kwargs, **candidate}, a, label, p, c, kernel) for a in members]
                        if not any(r.problem for r in tried):
                            for r in tried:
                                r.tuned = True
                            rows += tried
                            break
    return rows


def tuned_entries(rows: Iterable[KernelReport]) -> Dict[tuple, Dict[str, int]]:
    """launch.TUNED entries from a --tune report: the clean configuration per spilling default."""
    out: Dict[tuple, Dict[str, int]] = {}
    for r in rows:
        if r.tuned:
            key = (family(r.arch), "fp32" if r.dtype.startswith("fp32") else "16-bit", r.kernel, r.p, r.c)
            entry = {"num_warps": r.num_warps, "num_stages": r.num_stages, "block_n": r.block_n}
            if out.get(key, entry) != entry:
                raise RuntimeError(f"{key}: the archs of one family need different configurations: {out[key]}, {entry}")
            out[key] = entry
    return out


def report(
    archs: Iterable[int] = ARCHS,
    dtypes: Iterable[str] = ("bf16", "fp16", "fp32"),
    dims: Iterable[int] = DIMS,
    fp32_precision: str = "high",
    splits: Iterable[int] = (1, 2),
    log=None,
    jobs: int = 1,
    tune: bool = False,
) -> List[KernelReport]:
    """Every kernel at every (d'/H, d/H) in dims × dims, dtype and arch, as ``FusedHyperMixing``
    launches it. splits: 1 = the single pass (epilogue in the kernel), 2 = the split-N variants of
    the reductions. fp32_precision: torch's float32 matmul precision for the fp32 rows ("high" =
    tf32 dots, the route the model takes; "highest" = exact fp32 dots, which it avoids on GPUs).
    jobs > 1 compiles the geometries in that many processes."""
    dims = list(dims)
    work = [(d, p, c, tuple(archs), tuple(splits), fp32_precision, tune) for d in dtypes for p in dims for c in dims]
    rows: List[KernelReport] = []
    if jobs <= 1:
        results: Iterable[List[KernelReport]] = (geometry_rows(*w) for w in work)
        for part in results:
            rows += _logged(part, log)
        return rows
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for part in pool.map(geometry_rows, *zip(*work, strict=True)):
            rows += _logged(part, log)
    return rows


def _logged(rows: List[KernelReport], log) -> List[KernelReport]:
    for row in rows if log else ():
        log(format_row(row))
    return rows


def problems(rows: Iterable[KernelReport]) -> List[str]:
    """Every launch as it runs (not a --tune candidate) that spills or overflows shared memory."""
    return [f"{format_row(r)}: {r.problem}" for r in rows if r.problem and not r.tuned]


def format_row(r: KernelReport) -> str:
    return (f"sm_{r.arch} {r.dtype:<9} {r.kernel:<16} d'/H={r.p:<3} d/H={r.c:<3} warps {r.num_warps} "
            f"stages {r.num_stages} tile {r.block_n:<3} regs {r.registers:>3} spill {r.spill_stores:>6} B "
            f"smem {r.shared / 1024:6.1f} KB{' (tuned)' if r.tuned else ''}")  # fmt: skip


def format_table(rows: Iterable[KernelReport]) -> str:
    head = "| arch | dtype | kernel | d'/H | d/H | warps | stages | tile | registers | spill stores | spill loads | shared KB |"
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        out.append(f"| sm_{r.arch} | {r.dtype} | {r.kernel}{' (tuned)' if r.tuned else ''} | {r.p} | {r.c} | "
                   f"{r.num_warps} | {r.num_stages} | {r.block_n} | {r.registers} | {r.spill_stores} | "
                   f"{r.spill_loads} | {r.shared / 1024:.1f} |")  # fmt: skip
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
    parser.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1), help="compiler processes")
    parser.add_argument("--json", help="also write the rows as JSON to this path")
    parser.add_argument("--quiet", action="store_true", help="print the table only")
    parser.add_argument("--tune", action="store_true",
                        help="where a launch spills, search for a clean one and print launch.TUNED entries")  # fmt: skip
    opts = parser.parse_args(argv)
    archs = [int(a) for a in opts.arch.split(",")]
    unknown = [a for a in archs if a not in SHARED_LIMIT]
    if unknown:
        parser.error(f"--arch {unknown}: choose from {', '.join(map(str, SHARED_LIMIT))}")
    odd = [d for d in opts.dtypes.split(",") if d not in DTYPES]
    if odd:
        parser.error(f"--dtypes {odd}: choose from {', '.join(DTYPES)}")
    rows = report(archs, opts.dtypes.split(","), [int(d) for d in opts.dims.split(",")], opts.fp32_precision,
                  log=None if opts.quiet else lambda s: print(s, flush=True), jobs=opts.jobs, tune=opts.tune)  # fmt: skip
    print(format_table(rows))
    if opts.json:
        Path(opts.json).write_text(json.dumps([asdict(r) | {"problem": r.problem} for r in rows], indent=1))
    if opts.tune:
        print("TUNED entries (scale_hyper/kernels/launch.py):")
        for key, entry in sorted(tuned_entries(rows).items()):
            print(f"    {key}: {entry},")
    bad = problems(rows)
    for line in bad:
        print(f"PROBLEM {line}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
