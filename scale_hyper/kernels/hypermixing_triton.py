"""Fused Triton HyperMixing, ``Y_k = W2_k · act(W1_kᵀ X_k)``, with a hand-written backward.

Same maths as the reference ``scale_hyper.models.hypermixing.hyper_mixing``. x [B, N, d] and
w1/w2 [B, N, d'] are read in place as [B, N, H, c] / [B, N, H, p] (c = d/H, p = d'/H) through
their batch and token strides: no permute, no copy. The only intermediate per (batch, head) is the
p×c matrix ``Hpre = W1ᵀX``, kept in fp32.

    forward   _reduce_fwd  grid (B·H, SPLIT)      Hpre = W1ᵀX over all N (fp32 accumulate), ÷ divisor,
                                                   stores Hpre (fp32) and G = gelu(Hpre) (input dtype)
              _expand_fwd  grid (B·H·⌈N/tile⌉,)    Y = W2·G for one tile × c block
    backward  _reduce_bwd  grid (B·H, SPLIT)      dHpre = (W2ᵀdY) · gelu'(Hpre) ÷ divisor (fp32)
              _expand_bwd  grid (B·H·⌈N/tile⌉,)    dW2 = dY·Gᵀ, dW1 = X·dHpreᵀ, dX = W1·dHpre

The kernel bodies are in ``hypermixing_bodies.py``; this module wraps, sizes and launches them.

Launch configuration (warps, pipeline stages, the expand kernels' token tile) per geometry and GPU
family: ``launch.launch_config``, from the compiler's report (``compile_report``); no supported
geometry spills registers or overflows shared memory on sm_80 or sm_90.

Split-N reductions: B·H programs each walking all N tokens leave a GPU idle for long sequences and
small batches (B=8, H=12: 96 programs on 132 SMs). With SPLIT > 1 (``reduction_splits``), program
(bh, s) sums tokens [s·chunk, min((s+1)·chunk, N)) (chunk a multiple of BLOCK_N; a trailing split
may be empty) into an fp32 partial buffer [B, H, SPLIT, p, c], and ``finish_fwd`` / ``finish_bwd`` (splits.py)
add the splits and apply the epilogue (scale, GELU / GELU′) as torch ops on those small tensors.
SPLIT = 1 is the single pass above, epilogue in the kernel, no partial buffer.

Pad tokens are handled outside the kernels: pad rows of x, w1, w2 are replaced by 0 first with a
select (as in the reference; not a multiply, since NaN·0 = NaN would leak a non-finite pad row into
the real tokens' W1ᵀX), so pads contribute nothing, receive zero output, and autograd of that
select zeroes their gradients.

This package is a leaf: it imports nothing from scale_hyper. Choosing between this kernel and the
reference is the caller's job (``hyper_mixing(kernel=...)`` in models/hypermixing.py asks
``unsupported_reason`` and ``reference_route_reason`` first). Triton is optional: without it this module still imports,
``triton_available()`` is False and ``unsupported_reason`` says so. The compiled kernels are wrapped
(``JITFunction``) at import — a lazy ``triton.jit`` under torch.compile would split the graph — and
the interpreted ones by ``triton.jit`` on first use, because ``triton.jit`` decides at wrapping time
between a compiled kernel and the CPU interpreter (``TRITON_INTERPRET=1``); that lets tests turn
the interpreter on after import. The kernel bodies use only Triton builtins (no ``tl.zeros``/``tl.cdiv``, which are themselves jitted
library functions frozen in compiled mode when ``triton`` was imported before the variable was set).
"""

import os
from types import SimpleNamespace

import torch

from .launch import (
    MAX_GRID_Y,
    device_family,
    dot_precision,
    exact_fp32_on_gpu,
    expand_grid,
    grid_problem,
    launch_options,
    no_clean_launch,
)
from .splits import finish_bwd, finish_fwd, reduction_splits, sm_count, split_chunk

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference path is used
    triton = None
    tl = None

BLOCK_N = 64  # tokens per tile (a tl.dot dimension: a power of two >= 16)
MIN_DIM, MAX_DIM = 16, 128  # tl.dot needs >= 16; a p×c fp32 tile above 128×128 would spill registers
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SCALES = ("none", "sqrt", "mean")


def triton_available() -> bool:
    return triton is not None


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    if triton is None:
        return False
    knobs = getattr(triton, "knobs", None)
    if torch.compiler.is_compiling():  # the knob reads the variable through a C++ call TorchDynamo cannot trace
        knobs = None
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


_JITTED: dict = {}  # interpreting() -> the four kernels wrapped for that mode
if triton is not None:  # compiled mode at import: a lazy triton.jit under torch.compile splits the graph
    from triton.runtime.jit import JITFunction

    from . import hypermixing_bodies as _bodies

    _FNS = (_bodies._reduce_fwd, _bodies._expand_fwd, _bodies._reduce_bwd, _bodies._expand_bwd)
    _JITTED[False] = SimpleNamespace(**{fn.__name__.lstrip("_"): JITFunction(fn) for fn in _FNS})


def _kernels(mode: bool) -> SimpleNamespace:
    if mode not in _JITTED:  # the CPU interpreter (tests, doctor): triton.jit wraps for it on first use
        _JITTED[mode] = SimpleNamespace(**{fn.__name__.lstrip("_"): triton.jit(fn) for fn in _FNS})
    return _JITTED[mode]


def _constants(p: int, c: int, block_n: int, dtype: torch.dtype, prec: str, interpret: bool) -> dict:
    return dict(P=p, C=c, BLOCK_N=block_n, PREC=prec, WIDEN=dtype == torch.bfloat16 and interpret)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class FusedHyperMixing(torch.autograd.Function):
    """``Y = W2·act(W1ᵀX ÷ divisor)`` per (batch, head) on already-masked x, w1, w2 (same dtype).

    divisor: fp32 [B] or None. split: token ranges per (batch, head) in the two N-reductions
    (1: single pass). prec: ``tl.dot``'s input precision (``launch.dot_precision``); interpret:
    Triton's CPU interpreter runs the kernels; family: the GPU's (``launch.device_family``), which
    picks each kernel's warps, stages and token tile. Returns y [B, N, d] in the input dtype.
    Everything that reads global state (torch's matmul precision, Triton's knobs, the device's
    properties) is decided by the caller: under torch.compile such a call inside an
    autograd.Function splits the graph.
    """

    @staticmethod
    def forward(ctx, x, w1, w2, divisor, heads, activation, block_n, split, prec, interpret, family):
        x, w1, w2 = (_last_dim_contiguous(t) for t in (x, w1, w2))
        b, n, d = x.shape
        c, p = d // heads, w1.shape[-1] // heads
        chunk = split_chunk(n, block_n, split)
        hpre = x.new_empty((b, heads, p, c), dtype=torch.float32)
        g = x.new_empty((b, heads, p, c))
        part = hpre if split == 1 else x.new_empty((b, heads, split, p, c), dtype=torch.float32)
        y = x.new_empty((b, n, d))
        scaled = divisor is not None
        kernels = _kernels(interpret)
        reduce_name = "reduce_fwd+split" if split > 1 else "reduce_fwd"
        tile, options = launch_options(reduce_name, p, c, x.dtype, family, interpret, block_n)
        kernels.reduce_fwd[(b * heads, split)](
            w1, x, divisor if scaled else hpre, part, g,
            n, heads, chunk, w1.stride(0), w1.stride(1), x.stride(0), x.stride(1),
            PARTIAL=split > 1, ACT=bool(activation), SCALE=scaled,
            **_constants(p, c, block_n, x.dtype, prec, interpret), **options,
        )  # fmt: skip
        if split > 1:
            hpre, g = finish_fwd(part, divisor, activation, x.dtype)
        tile, options = launch_options("expand_fwd", p, c, x.dtype, family, interpret, block_n)
        kernels.expand_fwd[expand_grid(b, heads, n, tile)](
            w2, g, y, n, heads, w2.stride(0), w2.stride(1), y.stride(0), y.stride(1),
            **_constants(p, c, tile, x.dtype, prec, interpret), **options,
        )  # fmt: skip
        ctx.save_for_backward(x, w1, w2, hpre, g, divisor)
        ctx.heads, ctx.activation, ctx.block_n, ctx.split = heads, bool(activation), block_n, split
        ctx.prec, ctx.interpret, ctx.family = prec, interpret, family
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w1, w2, hpre, g, divisor = ctx.saved_tensors
        heads, block_n, interpret, prec, family = ctx.heads, ctx.block_n, ctx.interpret, ctx.prec, ctx.family
        dy = _last_dim_contiguous(dy)
        b, n, d = x.shape
        c, p = d // heads, w1.shape[-1] // heads
        split = ctx.split  # the forward's
        chunk = split_chunk(n, block_n, split)
        dh = torch.empty_like(hpre) if split == 1 else hpre.new_empty((b, heads, split, p, c))
        dx = x.new_empty((b, n, d))
        dw1 = w1.new_empty((b, n, heads * p))
        dw2 = w1.new_empty((b, n, heads * p))
        scaled = divisor is not None
        kernels = _kernels(interpret)
        reduce_name = "reduce_bwd+split" if split > 1 else "reduce_bwd"
        tile, options = launch_options(reduce_name, p, c, x.dtype, family, interpret, block_n)
        kernels.reduce_bwd[(b * heads, split)](
            w2, dy, hpre, divisor if scaled else hpre, dh,
            n, heads, chunk, w2.stride(0), w2.stride(1), dy.stride(0), dy.stride(1),
            PARTIAL=split > 1, ACT=ctx.activation, SCALE=scaled,
            **_constants(p, c, block_n, x.dtype, prec, interpret), **options,
        )  # fmt: skip
        if split > 1:
            dh = finish_bwd(dh, hpre, divisor, ctx.activation)
        tile, options = launch_options("expand_bwd", p, c, x.dtype, family, interpret, block_n)
        kernels.expand_bwd[expand_grid(b, heads, n, tile)](
            x, w1, dy, g, dh, dx, dw1, dw2,
            n, heads, x.stride(0), x.stride(1), w1.stride(0), w1.stride(1), dy.stride(0), dy.stride(1),
            **_constants(p, c, tile, x.dtype, prec, interpret), **options,
        )  # fmt: skip
        return dx, dw1, dw2, None, None, None, None, None, None, None, None


def _compute_dtype(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.dtype | None:
    """Autocast's dtype when autocast is on (a matmul's inputs are cast to it), else the common dtype."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype if x.dtype == w1.dtype == w2.dtype else None


def _usable_dim(size: int) -> bool:
    return MIN_DIM <= size <= MAX_DIM and size & (size - 1) == 0


def unsupported_reason(
    x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, heads: int, block_n: int = BLOCK_N
) -> str | None:
    """Why the fused kernel cannot run on these inputs, or None when it can."""
    if triton is None:
        return "triton is not installed"
    if not (x.is_cuda or interpreting()):
        return f"tensors are on {x.device.type}; the kernel needs CUDA (or TRITON_INTERPRET=1)"
    if x.dim() != 3 or w1.dim() != 3 or w1.shape != w2.shape or w1.shape[:2] != x.shape[:2]:
        return f"shapes x {tuple(x.shape)}, w1 {tuple(w1.shape)}, w2 {tuple(w2.shape)} are not [B, N, d], [B, N, d'] ×2"
    if not x.device == w1.device == w2.device:
        return "x, w1 and w2 are on different devices"
    if x.numel() == 0 or w1.numel() == 0:
        return "empty input"
    d, width = x.shape[-1], w1.shape[-1]
    if heads <= 0 or d % heads or width % heads:
        return f"d={d} and d'={width} are not divisible by heads={heads}"
    for name, size in (("d/H", d // heads), ("d'/H", width // heads), ("BLOCK_N", block_n)):
        if not _usable_dim(size):
            return f"{name}={size} is not a power of two in [{MIN_DIM}, {MAX_DIM}]"
    dtype = _compute_dtype(x, w1, w2)
    if dtype is None:
        return f"mixed dtypes outside autocast (x {x.dtype}, w1 {w1.dtype}, w2 {w2.dtype})"
    if dtype not in DTYPES:
        return f"dtype {dtype} is not float32, float16 or bfloat16"
    b, n = x.shape[:2]
    return grid_problem(b * heads * -(-n // block_n))  # the expand kernels' one-axis grid


def reference_route_reason(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, heads: int) -> str | None:
    """Why the torch reference is the better route for inputs the kernel supports, or None.

    fp32 on a GPU without TF32 would need the kernel's exact-fp32 dots: FMA loops without tensor
    cores that spill registers (launch.exact_fp32_on_gpu); and a few geometries have no spill-free
    launch on some GPU families (launch.NO_CLEAN_LAUNCH).
    """
    dtype = _compute_dtype(x, w1, w2)
    if dtype is None:
        return None
    if exact_fp32_on_gpu(dtype, x.is_cuda):
        return (
            "fp32 without TF32 (torch.backends.cuda.matmul.allow_tf32 is False, the default): the kernel's "
            "exact-fp32 dots run without tensor cores and spill registers; torch.set_float32_matmul_precision('high') "
            "runs it with tf32 dots"
        )
    p, c = w1.shape[-1] // heads, x.shape[-1] // heads
    spills = no_clean_launch(p, c, dtype, device_family(x.device)) if x.is_cuda else None
    return f"no spill-free launch at d'/H={p}, d/H={c} in {dtype} on this GPU: {spills}" if spills else None


def fused_hyper_mixing(
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    heads: int,
    mask: torch.Tensor | None = None,
    activation: bool = True,
    scale: str = "none",
    *,
    block_n: int = BLOCK_N,
    split: int | None = None,
) -> torch.Tensor:
    """The fused path only (no fallback): raises ValueError where ``unsupported_reason`` says why.

    split: token ranges per (batch, head) in the N-reductions; None picks ``reduction_splits``.
    """
    reason = unsupported_reason(x, w1, w2, heads, block_n)
    if reason is not None:
        raise ValueError(f"fused HyperMixing cannot run: {reason}")
    if scale not in SCALES:
        raise ValueError(f"scale={scale!r} is not one of {', '.join(SCALES)}")
    dtype = _compute_dtype(x, w1, w2)
    assert dtype is not None  # unsupported_reason checked it
    x, w1, w2 = x.to(dtype), w1.to(dtype), w2.to(dtype)
    if mask is not None:  # a select, not a multiply: NaN·0 = NaN (see the module docstring)
        keep = mask[..., None].to(torch.bool)
        zero = torch.zeros((), dtype=dtype, device=x.device)
        x, w1, w2 = (torch.where(keep, t, zero) for t in (x, w1, w2))
    divisor = None
    if scale != "none":  # real tokens per sequence (at least 1), as the reference counts them
        count = x.new_full(x.shape[:1], float(x.shape[1]), dtype=torch.float32)
        if mask is not None:
            count = mask.sum(dim=1).clamp(min=1).to(torch.float32)
        divisor = (count.sqrt() if scale == "sqrt" else count).contiguous()
    if split is not None and (split < 1 or grid_problem(1, split)):
        raise ValueError(f"split={split} must be in [1, {MAX_GRID_Y:,}]")
    if split is None:
        split = reduction_splits(x.shape[0] * heads, x.shape[1], block_n, sm_count(x.device))
    interpret = interpreting()
    prec, family = dot_precision(dtype, interpret), device_family(x.device)
    return FusedHyperMixing.apply(x, w1, w2, divisor, heads, activation, block_n, split, prec, interpret, family)
