"""How the fused HyperMixing kernels are launched: warps, pipeline stages and token tiles per
geometry and GPU family, the dot precision, and the grid limits. Pure torch, no Triton; every figure here comes from the compiler's report
(``python -m scale_hyper.kernels.compile_report``, docs/engine.md "Fused mixer kernel").
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

# CUDA's grid limits: axis 0 up to 2^31 − 1 blocks, axes 1 and 2 up to 65,535. Every launch puts
# its large count (B·H, or B·H × N-tiles) on axis 0; only SPLIT (≤ 264 by the heuristic) is on axis 1.
MAX_GRID_X = 2**31 - 1
MAX_GRID_Y = 65_535

# Launch configurations. The default: 4 warps, 3 pipeline stages (the reductions' loop) and tiles of
# 64 tokens; 8 warps where a tile is 128 wide (d/H or d'/H = 128), where 4 warps need more than the
# 255 registers a thread may hold and spill (e.g. _reduce_bwd at 128×128 bf16 on sm_90: 1.6 KB).
# TUNED holds the geometries where the compiler's report still showed spills (or more shared memory
# than a target has) with that default, and
# the first spill-free configuration `python -m scale_hyper.kernels.compile_report --tune` found for
# them. Keys: (family, dtype class, kernel, d'/H, d/H); "+split" = the split-N partial-sum variant.
WIDE_TILE = 128
FAMILIES = ("sm80", "sm90")  # sm_80/86/89 (mma.sync) and sm_90 (wgmma): separate code generation
TUNED: Dict[Tuple[str, str, str, int, int], Dict[str, int]] = {
    # sm_80/86/89 (found on sm_80 and sm_89 together), 16-bit: the default spilled 8–2,504 bytes here
    ("sm80", "16-bit", "expand_bwd", 128, 32): {"num_warps": 4, "num_stages": 3, "block_n": 16},
    ("sm80", "16-bit", "expand_bwd", 128, 64): {"num_warps": 4, "num_stages": 3, "block_n": 32},
    ("sm80", "16-bit", "reduce_bwd+split", 64, 16): {"num_warps": 8, "num_stages": 3, "block_n": 64},
    ("sm80", "16-bit", "reduce_bwd+split", 128, 16): {"num_warps": 2, "num_stages": 3, "block_n": 64},
    ("sm80", "16-bit", "reduce_fwd", 64, 16): {"num_warps": 8, "num_stages": 3, "block_n": 64},
    ("sm80", "16-bit", "reduce_fwd+split", 64, 16): {"num_warps": 8, "num_stages": 3, "block_n": 64},
    ("sm80", "16-bit", "reduce_fwd+split", 128, 16): {"num_warps": 2, "num_stages": 3, "block_n": 64},
    # sm_80/86/89, fp32 with tf32 dots: the default spilled 228 B to 13 KB here (or needed more shared memory)
    ("sm80", "fp32", "expand_bwd", 64, 64): {"num_warps": 4, "num_stages": 3, "block_n": 32},
    ("sm80", "fp32", "expand_bwd", 64, 128): {"num_warps": 4, "num_stages": 3, "block_n": 32},  # 112 KB > sm_89's 99
    ("sm80", "fp32", "expand_bwd", 128, 32): {"num_warps": 4, "num_stages": 3, "block_n": 16},
    ("sm80", "fp32", "expand_bwd", 128, 64): {"num_warps": 4, "num_stages": 3, "block_n": 32},
    ("sm80", "fp32", "expand_bwd", 128, 128): {"num_warps": 8, "num_stages": 3, "block_n": 16},
    ("sm80", "fp32", "reduce_bwd", 128, 128): {"num_warps": 8, "num_stages": 2, "block_n": 64},
    ("sm80", "fp32", "reduce_bwd+split", 128, 128): {"num_warps": 4, "num_stages": 2, "block_n": 64},
    ("sm80", "fp32", "reduce_fwd", 128, 128): {"num_warps": 8, "num_stages": 2, "block_n": 64},
    ("sm80", "fp32", "reduce_fwd+split", 128, 128): {"num_warps": 4, "num_stages": 2, "block_n": 64},
    # sm_90, fp32 with tf32 dots: 64-token tiles need 288 KB of shared memory (the limit is 227 KB)
    ("sm90", "fp32", "expand_bwd", 128, 128): {"num_warps": 8, "num_stages": 3, "block_n": 32},
}
# Where no configuration --tune tries is spill-free on every target of a family, the model runs the
# reference instead (``hypermixing_triton.reference_route_reason``); (family, dtype class, d'/H, d/H).
NO_CLEAN_LAUNCH: Dict[Tuple[str, str, int, int], str] = {
    ("sm80", "fp32", 128, 16): "_expand_bwd spills 52–1,116 B with every warps × token tile tried on sm_80/sm_89",
}


def device_family(device: torch.device) -> str:
    """The TUNED family of a CUDA device (sm90 for anything off CUDA: the interpreter ignores it)."""
    if device.type != "cuda":
        return "sm90"
    return "sm90" if torch.cuda.get_device_properties(device).major >= 9 else "sm80"


def dtype_class(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "16-bit"


def launch_config(kernel: str, p: int, c: int, dtype: torch.dtype, family: str) -> Dict[str, int]:
    """num_warps, num_stages and block_n (tokens per tile; the expand kernels' may be smaller than the
    reductions') for ``kernel`` (reduce_fwd, expand_fwd, reduce_bwd, expand_bwd, reduce_*+split) at
    d'/H = p, d/H = c."""
    config = {"num_warps": 8 if max(p, c) >= WIDE_TILE else 4, "num_stages": 3, "block_n": 64}
    config.update(TUNED.get((family, dtype_class(dtype), kernel, p, c), {}))
    return config


def launch_options(kernel: str, p: int, c: int, dtype: torch.dtype, family: str, interpret: bool, block_n: int):
    """(tokens per tile, launch options) of one kernel: ``launch_config``; none in the interpreter."""
    if interpret:
        return block_n, {}
    config = launch_config(kernel, p, c, dtype, family)
    return min(block_n, config["block_n"]), {"num_warps": config["num_warps"], "num_stages": config["num_stages"]}


def expand_grid(b: int, heads: int, n: int, tile: int) -> tuple:
    """The expand kernels' grid: one axis of B·H·⌈N/tile⌉ programs (limit 2^31 − 1), tile fastest, so
    the programs of one (batch, head) run together and share its p×c block in L2. (B·H on axis 1
    would stop at 65,535.)"""
    return (b * heads * -(-n // tile),)


def no_clean_launch(p: int, c: int, dtype: torch.dtype, family: str) -> Optional[str]:
    """Why no launch of this geometry is spill-free on ``family`` (NO_CLEAN_LAUNCH), or None."""
    return NO_CLEAN_LAUNCH.get((family, dtype_class(dtype), p, c))


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
