"""Split-N reductions of the fused HyperMixing kernels: how many token ranges each (batch, head)
reduction is cut into, and the epilogues that add the splits' fp32 partials (torch ops on small
[B, H, SPLIT, P, C] tensors). Pure torch, no Triton.
"""

from __future__ import annotations

import torch

PROGRAMS_PER_SM = 2  # split-N reductions: aim for this many reduction programs per SM
MIN_SPLIT_TILES = 4  # ... with at least this many BLOCK_N tiles per split
INTERPRETER_SMS = 132  # stand-in SM count off CUDA (an H100 SXM), so the interpreter plans like one


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; INTERPRETER_SMS (an H100's 132) elsewhere."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return INTERPRETER_SMS


def reduction_splits(programs: int, n: int, block_n: int, sms: int) -> int:
    """SPLIT for the two N-reductions: how many token ranges each (batch, head) is cut into.

    1 when the B·H programs already give every SM ~PROGRAMS_PER_SM of them (or N is short); else
    enough splits to reach that, but at least MIN_SPLIT_TILES tiles of BLOCK_N tokens per split (so
    a split's loop still amortises its partial store and the epilogue's extra launches), hence
    never more than ⌈N/BLOCK_N⌉. E.g. B=8, H=12, N=8192, BLOCK_N=64 on 132 SMs: 96 programs → 3.
    """
    target = PROGRAMS_PER_SM * sms
    if programs >= target:
        return 1
    return max(1, min(cdiv(target, programs), cdiv(n, block_n) // MIN_SPLIT_TILES))


def split_chunk(n: int, block_n: int, split: int) -> int:
    """Tokens per split, a multiple of BLOCK_N; so the last split may be short, a forced one empty."""
    return cdiv(cdiv(n, block_n), split) * block_n


def finish_fwd(part, divisor, activation, dtype):
    """Epilogue of a split forward reduction on the small fp32 [B, H, SPLIT, P, C] partials."""
    hpre = part.sum(dim=2)
    if divisor is not None:
        hpre = hpre / divisor[:, None, None, None]
    g = 0.5 * hpre * (1.0 + torch.erf(hpre * 0.7071067811865476)) if activation else hpre
    return hpre, g.to(dtype)


def finish_bwd(part, hpre, divisor, activation):
    """Epilogue of a split backward reduction: dHpre = ΣdG · gelu'(Hpre) ÷ divisor, fp32."""
    dh = part.sum(dim=2)
    if activation:
        cdf = 0.5 * (1.0 + torch.erf(hpre * 0.7071067811865476))
        pdf = torch.exp(-0.5 * hpre * hpre) * 0.3989422804014327
        dh = dh * (cdf + hpre * pdf)
    if divisor is not None:
        dh = dh / divisor[:, None, None, None]
    return dh
