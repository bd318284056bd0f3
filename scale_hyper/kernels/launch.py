"""How the fused HyperMixing kernels are launched: warps per program, the dot precision, and the
grid limits. Pure torch, no Triton; every figure here comes from the compiler's report
(``python -m scale_hyper.kernels.compile_report``, docs/engine.md "Fused mixer kernel").
"""

from __future__ import annotations

import torch

# CUDA's grid limits: axis 0 up to 2^31 − 1 blocks, axes 1 and 2 up to 65,535. Every launch puts
# its large count (B·H, or B·H × N-tiles) on axis 0; only SPLIT (≤ 264 by the heuristic) is on axis 1.
MAX_GRID_X = 2**31 - 1
MAX_GRID_Y = 65_535

# Warps per program. With 4 warps the 128-wide tiles of a 16-bit model need more than the 255
# registers a thread may hold and spill to local memory (sm_80 and sm_90); 8 warps share the same
# tile over twice the threads and compile without spills. Below 128, 4 warps are spill-free and
# keep more programs resident per SM.
WIDE_TILE = 128


def num_warps(kernel: str, p: int, c: int, dtype: torch.dtype) -> int:
    """Warps for ``kernel`` (reduce_fwd, expand_fwd, reduce_bwd, expand_bwd) at d'/H = p, d/H = c."""
    del kernel, dtype  # one rule fits all four today; the report checks every kernel and dtype
    return 8 if max(p, c) >= WIDE_TILE else 4


def dot_precision(dtype: torch.dtype, interpreting: bool) -> str:
    """``tl.dot``'s input precision: "ieee" (exact fp32 products) or "tf32" (tensor cores).

    16-bit operands are exact in tf32, so only the backward's fp32 dHpre is rounded (10-bit
    mantissa). An fp32 model follows the switch of torch's own fp32 matmuls (the reference's
    einsums): ``torch.backends.cuda.matmul.allow_tf32``, False by default, True after
    ``torch.set_float32_matmul_precision("high")``. (Read there rather than through
    ``get_float32_matmul_precision``, whose string result TorchDynamo cannot trace.) The CPU
    interpreter always computes exactly.
    """
    if dtype != torch.float32:
        return "tf32"
    return "tf32" if not interpreting and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def exact_fp32_on_gpu(dtype: torch.dtype, is_cuda: bool) -> bool:
    """True where the kernel would run exact fp32 dots on a GPU: FMA loops without tensor cores that
    spill heavily (``_reduce_fwd`` at d/H = 128: 41.7 KB of spill stores, ``_expand_bwd`` 93 KB on
    sm_90), where the reference's cuBLAS GEMMs are the faster route. The model dispatch then takes
    the reference; ``torch.set_float32_matmul_precision("high")`` puts fp32 on the kernel's tf32 dots."""
    return dtype == torch.float32 and is_cuda and dot_precision(dtype, interpreting=False) == "ieee"


def grid_problem(programs_x: int, programs_y: int = 1) -> str | None:
    """Why a launch of (programs_x, programs_y) blocks exceeds CUDA's grid limits, or None."""
    if programs_x > MAX_GRID_X:
        return f"{programs_x:,} programs exceed CUDA's grid limit of {MAX_GRID_X:,} on axis 0"
    if programs_y > MAX_GRID_Y:
        return f"SPLIT={programs_y:,} exceeds CUDA's grid limit of {MAX_GRID_Y:,} on axis 1"
    return None
