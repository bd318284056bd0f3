"""The four Triton kernel bodies of the fused HyperMixing (``hypermixing_triton.py`` wraps and launches
them; its docstring has the maths and the grids). Imported only where Triton is installed.

Shared argument names: P = d'/H, C = d/H (constexpr); s_*b / s_*n = batch / token strides of the
[B, N, ·] tensors (last stride 1); program (b, h) = pid // H, pid % H; Hpre-shaped [B, H, P, C]
buffers are contiguous. PREC: tl.dot input precision for fp32 operands. WIDEN: widen 16-bit dot
operands to fp32 first, only in the interpreter, whose bf16 tl.dot multiplies the raw bit patterns
(observed with triton 3.9 here); exact products + fp32 sum, the same maths as the GPU's bf16 MMA.
Plain functions: the caller wraps them (JITFunction at import for compiled mode, triton.jit for the
interpreter), and they use only Triton builtins (see ``hypermixing_triton``).
"""

import triton.language as tl


def _reduce_fwd(
    w1_ptr, x_ptr, div_ptr, hpre_ptr, g_ptr,
    N, H, CHUNK, s_w1b, s_w1n, s_xb, s_xn,
    P: tl.constexpr, C: tl.constexpr, BLOCK_N: tl.constexpr, PARTIAL: tl.constexpr,
    ACT: tl.constexpr, SCALE: tl.constexpr, PREC: tl.constexpr, WIDEN: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    b = (pid // H).to(tl.int64)
    h = pid % H
    lo = tl.program_id(1) * CHUNK  # this split's tokens: [lo, hi), empty when lo >= N
    hi = tl.minimum(lo + CHUNK, N)
    rn = tl.arange(0, BLOCK_N)
    rp = tl.arange(0, P)
    rc = tl.arange(0, C)
    w1_cols = w1_ptr + b * s_w1b + h * P + rp[None, :]
    x_cols = x_ptr + b * s_xb + h * C + rc[None, :]
    acc = tl.full((P, C), 0.0, tl.float32)
    for start in range(lo, hi, BLOCK_N):
        tok = start + rn
        live = tok[:, None] < hi
        w1 = tl.load(w1_cols + tok[:, None] * s_w1n, mask=live, other=0.0)
        x = tl.load(x_cols + tok[:, None] * s_xn, mask=live, other=0.0)
        if WIDEN:
            w1, x = w1.to(tl.float32), x.to(tl.float32)
        acc += tl.dot(tl.trans(w1), x, input_precision=PREC)
    # [B, H, SPLIT, P, C] offset: the partial buffer, or Hpre/G themselves when SPLIT = 1
    part = pid.to(tl.int64) * tl.num_programs(1) + tl.program_id(1)
    tile = part * (P * C) + rp[:, None] * C + rc[None, :]
    if PARTIAL:  # raw sum of this split; finish_fwd adds the splits and applies the epilogue
        tl.store(hpre_ptr + tile, acc)
    else:
        if SCALE:
            acc = acc / tl.load(div_ptr + b)
        tl.store(hpre_ptr + tile, acc)
        if ACT:  # exact (erf) GELU, as F.gelu
            acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
        tl.store(g_ptr + tile, acc.to(g_ptr.dtype.element_ty))


def _expand_fwd(
    w2_ptr, g_ptr, y_ptr,
    N, H, s_w2b, s_w2n, s_yb, s_yn,
    P: tl.constexpr, C: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr, WIDEN: tl.constexpr,
):  # fmt: skip
    tiles = (N + BLOCK_N - 1) // BLOCK_N  # one axis, tile fastest (see launch.expand_grid)
    pid = tl.program_id(0) // tiles
    b = (pid // H).to(tl.int64)
    h = pid % H
    tok = (tl.program_id(0) % tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    live = tok[:, None] < N
    rp = tl.arange(0, P)
    rc = tl.arange(0, C)
    g = tl.load(g_ptr + pid.to(tl.int64) * (P * C) + rp[:, None] * C + rc[None, :])
    w2 = tl.load(w2_ptr + b * s_w2b + h * P + tok[:, None] * s_w2n + rp[None, :], mask=live, other=0.0)
    if WIDEN:
        w2, g = w2.to(tl.float32), g.to(tl.float32)
    y = tl.dot(w2, g, input_precision=PREC)
    tl.store(y_ptr + b * s_yb + h * C + tok[:, None] * s_yn + rc[None, :], y.to(y_ptr.dtype.element_ty), mask=live)


def _reduce_bwd(
    w2_ptr, dy_ptr, hpre_ptr, div_ptr, dh_ptr,
    N, H, CHUNK, s_w2b, s_w2n, s_dyb, s_dyn,
    P: tl.constexpr, C: tl.constexpr, BLOCK_N: tl.constexpr, PARTIAL: tl.constexpr,
    ACT: tl.constexpr, SCALE: tl.constexpr, PREC: tl.constexpr, WIDEN: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    b = (pid // H).to(tl.int64)
    h = pid % H
    lo = tl.program_id(1) * CHUNK  # this split's tokens: [lo, hi), empty when lo >= N
    hi = tl.minimum(lo + CHUNK, N)
    rn = tl.arange(0, BLOCK_N)
    rp = tl.arange(0, P)
    rc = tl.arange(0, C)
    w2_cols = w2_ptr + b * s_w2b + h * P + rp[None, :]
    dy_cols = dy_ptr + b * s_dyb + h * C + rc[None, :]
    acc = tl.full((P, C), 0.0, tl.float32)  # dG = W2ᵀ dY
    for start in range(lo, hi, BLOCK_N):
        tok = start + rn
        live = tok[:, None] < hi
        w2 = tl.load(w2_cols + tok[:, None] * s_w2n, mask=live, other=0.0)
        dy = tl.load(dy_cols + tok[:, None] * s_dyn, mask=live, other=0.0)
        if WIDEN:
            w2, dy = w2.to(tl.float32), dy.to(tl.float32)
        acc += tl.dot(tl.trans(w2), dy, input_precision=PREC)
    # [B, H, SPLIT, P, C] offset: the partial buffer, or dHpre itself when SPLIT = 1
    part = pid.to(tl.int64) * tl.num_programs(1) + tl.program_id(1)
    tile = part * (P * C) + rp[:, None] * C + rc[None, :]
    if PARTIAL:  # raw dG of this split; finish_bwd adds the splits and applies the epilogue
        tl.store(dh_ptr + tile, acc)
    else:
        if ACT:  # gelu'(h) = Φ(h) + h·φ(h)
            hpre = tl.load(hpre_ptr + tile)
            cdf = 0.5 * (1.0 + tl.math.erf(hpre * 0.7071067811865476))
            pdf = tl.exp(-0.5 * hpre * hpre) * 0.3989422804014327
            acc = acc * (cdf + hpre * pdf)
        if SCALE:
            acc = acc / tl.load(div_ptr + b)
        tl.store(dh_ptr + tile, acc)


def _expand_bwd(
    x_ptr, w1_ptr, dy_ptr, g_ptr, dh_ptr, dx_ptr, dw1_ptr, dw2_ptr,
    N, H, s_xb, s_xn, s_w1b, s_w1n, s_dyb, s_dyn,
    P: tl.constexpr, C: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr, WIDEN: tl.constexpr,
):  # fmt: skip
    # dx [B, N, H·C] and dw1/dw2 [B, N, H·P] are fresh contiguous tensors.
    tiles = (N + BLOCK_N - 1) // BLOCK_N  # one axis, tile fastest (see launch.expand_grid)
    pid = tl.program_id(0) // tiles
    b = (pid // H).to(tl.int64)
    h = pid % H
    tok = (tl.program_id(0) % tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    live = tok[:, None] < N
    rp = tl.arange(0, P)
    rc = tl.arange(0, C)
    tile = pid.to(tl.int64) * (P * C) + rp[:, None] * C + rc[None, :]
    g = tl.load(g_ptr + tile)
    dh = tl.load(dh_ptr + tile)
    dy = tl.load(dy_ptr + b * s_dyb + h * C + tok[:, None] * s_dyn + rc[None, :], mask=live, other=0.0)
    x = tl.load(x_ptr + b * s_xb + h * C + tok[:, None] * s_xn + rc[None, :], mask=live, other=0.0)
    w1 = tl.load(w1_ptr + b * s_w1b + h * P + tok[:, None] * s_w1n + rp[None, :], mask=live, other=0.0)
    if WIDEN:
        dy, g = dy.to(tl.float32), g.to(tl.float32)
    dw2 = tl.dot(dy, tl.trans(g), input_precision=PREC)
    # dHpre stays fp32 (as in the reference backward): X and W1 are widened to meet it.
    dw1 = tl.dot(x.to(tl.float32), tl.trans(dh), input_precision=PREC)
    dx = tl.dot(w1.to(tl.float32), dh, input_precision=PREC)
    p_out = b * N * (H * P) + tok[:, None] * (H * P) + h * P + rp[None, :]
    c_out = b * N * (H * C) + tok[:, None] * (H * C) + h * C + rc[None, :]
    tl.store(dw2_ptr + p_out, dw2.to(dw2_ptr.dtype.element_ty), mask=live)
    tl.store(dw1_ptr + p_out, dw1.to(dw1_ptr.dtype.element_ty), mask=live)
    tl.store(dx_ptr + c_out, dx.to(dx_ptr.dtype.element_ty), mask=live)
