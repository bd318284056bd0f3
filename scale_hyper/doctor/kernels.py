"""Kernels on this device: the fused Triton HyperMixing kernel against the torch reference (forward
and backward, at bf16 tolerances on CUDA) at the model's own geometry on both reduction paths
(``kernel_cases``), and which SDPA backend BERT's attention and the hypernetwork's attention get
(flash or not)."""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Tuple

import torch

from scale_hyper.config import RunConfig
from scale_hyper.doctor.results import FAIL, PASS, SKIPPED, Result, faults

INTERPRET_ENV = "SCALE_HYPER_DOCTOR_INTERPRET"  # 1: on CPU, run the kernel in Triton's interpreter


def _inputs(b: int, n: int, heads: int, c: int, p: int, dtype, device, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x, w1, w2 = (torch.randn(b, n, heads * k, generator=gen) for k in (c, p, p))
    dy = torch.randn(b, n, heads * c, generator=gen)
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[-1, n - n // 5 :] = False  # some padding in the last sequence
    return [t.to(device=device, dtype=dtype) for t in (x, w1, w2, dy)] + [mask.to(device)]


def _run(fn, x, w1, w2, dy) -> List[torch.Tensor]:
    leaves = [t.detach().clone().requires_grad_() for t in (x, w1, w2)]
    y = fn(*leaves)
    y.backward(dy.to(y.dtype))
    return [y.detach()] + [t.grad.detach() for t in leaves if t.grad is not None]


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref).abs().max() / ref.abs().max().clamp(min=1e-30))


def _compare(case: Dict[str, Any], dtype, device) -> Dict[str, Any]:
    from scale_hyper.kernels import hypermixing_triton as fused
    from scale_hyper.models.hypermixing import hyper_mixing

    heads = case["heads"]
    x, w1, w2, dy, mask = _inputs(case["b"], case["n"], heads, case["c"], case["p"], dtype, device)
    m = mask if case["mask"] else None
    kw = {"mask": m, "activation": case["activation"], "scale": case["scale"]}
    reference = _run(lambda a, b, c: hyper_mixing(a, b, c, heads, kernel="torch", **kw), x, w1, w2, dy)
    exact = _run(lambda a, b, c: hyper_mixing(a, b, c, heads, kernel="torch", **kw),
                 *(t.double() for t in (x, w1, w2, dy)))  # fmt: skip
    inject = "kernel" in faults()

    def kernel(a, b, c):
        y = fused.fused_hyper_mixing(a, b, c, heads, **kw, split=case["split"])
        return y + 0.05 * y.detach().abs().max() if inject else y  # test-only: a kernel that is wrong

    got = _run(kernel, x, w1, w2, dy)
    names = ("forward", "dX", "dW1", "dW2")
    rows = []
    for name, g, r, e in zip(names, got, reference, exact, strict=True):
        err_kernel, err_ref = _rel_err(g, e), _rel_err(r, e)
        # the kernel may be as far from fp64 as 4× the torch path in the same dtype (+ a floor for fp32)
        tol = 4 * err_ref + (1e-4 if dtype == torch.float32 else 4e-3)
        rows.append({"tensor": name, "kernel_err": err_kernel, "reference_err": err_ref, "tol": tol,
                     "ok": err_kernel <= tol})  # fmt: skip
    return {"case": case, "rows": rows}


def model_geometry_reason(run: RunConfig, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why the fused kernel cannot take this model's mixer geometry on ``device``, or None."""
    from scale_hyper.kernels import hypermixing_triton as fused

    mc = run.model
    probe = torch.empty(1, 64, mc.hidden_size, device=device, dtype=dtype)
    wprobe = torch.empty(1, 64, mc.mixer_width, device=device, dtype=dtype)
    return fused.unsupported_reason(probe, wprobe, wprobe, mc.effective_mixer_heads)


def kernel_cases(run: RunConfig, gpu_sms: Optional[int], supported: bool) -> List[Dict[str, Any]]:
    """What the kernel row runs: the model's own d/H and d'/H (heads, GELU, scale) at the trainer's
    micro-batch × seq_len with the SPLIT the kernel picks there on ``gpu_sms`` SMs (B·H ≥ 2 × SMs:
    the single pass with the in-kernel epilogue), padded; and 2 sequences on the other reduction
    path (split-N partial sums, or the single pass if training splits). A geometry the kernel cannot
    take (``supported`` False) is replaced by 4 heads of 64. In the CPU interpreter (``gpu_sms``
    None): 2 heads of 16 × 80 tokens, SPLIT 1 and 2 forced."""
    from scale_hyper.kernels.hypermixing_triton import BLOCK_N
    from scale_hyper.kernels.splits import reduction_splits

    mc = run.model
    heads = mc.effective_mixer_heads
    base = {"activation": mc.mixer != "hyperbert" or mc.hyper_mlp == "mlp", "scale": mc.mixer_scale}
    if gpu_sms is None:  # the interpreter is slow: tiny tiles, both reduction paths forced
        shape = {"heads": 2, "c": 16, "p": 16, "n": 80, "b": 2}
        return [{**base, **shape, "mask": True, "split": 1}, {**base, **shape, "mask": False, "split": 2}]
    shape = {"heads": heads, "c": mc.hidden_size // heads, "p": mc.mixer_width // heads}
    if not supported:
        shape = {"heads": 4, "c": 64, "p": 64}
    b, n = run.train.micro_batch_size, run.data.seq_len
    split = reduction_splits(b * shape["heads"], n, BLOCK_N, gpu_sms)
    other = max(2, reduction_splits(2 * shape["heads"], n, BLOCK_N, gpu_sms)) if split == 1 else 1
    return [{**base, **shape, "b": b, "n": n, "mask": True, "split": split},
            {**base, **shape, "b": 2, "n": n, "mask": False, "split": other}]  # fmt: skip


def _describe(case: Dict[str, Any]) -> str:
    return (f"{case['b']}×{case['n']} tokens, {case['heads']} heads, d/H={case['c']}, d'/H={case['p']}, "
            f"SPLIT={case['split']}{', padded' if case['mask'] else ''}")  # fmt: skip


def check_triton(run: RunConfig, device: torch.device) -> Result:
    """Rank-local; the caller gathers every rank's row."""
    interpret = device.type != "cuda" and os.environ.get(INTERPRET_ENV) == "1"
    if device.type != "cuda" and not interpret:
        return Result("kernels", SKIPPED, "", f"no CUDA device: the Triton HyperMixing kernel is compiled and checked "
                      f"on GPUs only ({INTERPRET_ENV}=1 checks it in Triton's CPU interpreter)")  # fmt: skip
    try:
        import triton  # noqa: F401
    except ImportError:
        return Result("kernels", SKIPPED, "", "triton is not installed (pip install triton); model.mixer_kernel=torch")
    previous = os.environ.get("TRITON_INTERPRET")
    if interpret:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
        from scale_hyper.kernels.splits import sm_count

        geometry = model_geometry_reason(run, device, dtype)
        cases = kernel_cases(run, sm_count(device) if device.type == "cuda" else None, geometry is None)
        outcomes = [_compare(case, dtype, device) for case in cases]
    except Exception as err:  # noqa: BLE001 - a kernel that does not compile is what this reports
        return Result("kernels", FAIL, "error", f"the Triton HyperMixing kernel failed to run: {type(err).__name__}: "
                      f"{str(err).splitlines()[0][:300]}")  # fmt: skip
    finally:
        if interpret:
            if previous is None:
                os.environ.pop("TRITON_INTERPRET", None)
            else:
                os.environ["TRITON_INTERPRET"] = previous
    mc = run.model
    heads_model = mc.effective_mixer_heads
    bad = [(o["case"], r) for o in outcomes for r in o["rows"] if not r["ok"]]
    worst = max((r["kernel_err"] / r["tol"] for o in outcomes for r in o["rows"]), default=0.0)
    where = "Triton CPU interpreter" if interpret else torch.cuda.get_device_name(device)
    uses = f"model ({mc.mixer}, d/H={mc.hidden_size // heads_model}, d'/H={mc.mixer_width // heads_model}): " + (
        "the fused kernel can run" if geometry is None else f"falls back to torch ({geometry})"
    )
    ran = "; ".join(_describe(o["case"]) for o in outcomes)
    detail = f"{where}, {str(dtype).replace('torch.', '')}, forward + dX/dW1/dW2 at {ran}; {uses}"
    data = {"outcomes": outcomes, "dtype": str(dtype), "model_geometry_unsupported": geometry}
    if bad:
        what = "; ".join(
            f"{r['tensor']} error {r['kernel_err']:.2e} > tolerance {r['tol']:.2e} ({_describe(case)})"
            for case, r in bad[:4]
        )
        return Result("kernels", FAIL, f"{worst:.2f}× tol", f"the Triton kernel disagrees with the torch reference: "
                      f"{what}. {detail}", data)  # fmt: skip
    return Result("kernels", PASS, f"{worst:.2f}× tol", detail, data)


def _backend(q: torch.Tensor, mask: Optional[torch.Tensor]) -> str:
    from torch.nn.attention import SDPBackend

    try:
        choice = torch._fused_sdp_choice(q, q, q, mask, 0.0, False)
        return SDPBackend(choice).name.lower()
    except Exception:  # noqa: BLE001 - a private function: fall back to trying each kernel in order
        import torch.nn.functional as F
        from torch.nn.attention import sdpa_kernel

        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH):
            try:
                with sdpa_kernel([backend]):
                    F.scaled_dot_product_attention(q, q, q, attn_mask=mask)
                return backend.name.lower()
            except RuntimeError:
                continue
    return "none"


def check_sdpa(run: RunConfig, device: torch.device, precision: str) -> Result:
    """Which kernel scaled_dot_product_attention picks for BERT's and the hypernetwork's attention,
    at this config's geometry and precision, unpadded (the loader drops the mask) and padded."""
    mc = run.model
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    n, b = run.data.seq_len, min(2, run.train.micro_batch_size)
    shapes: List[Tuple[str, int, int]] = [("bert", mc.num_heads, mc.hidden_size // mc.num_heads)]
    if mc.mixer == "hyperbert":
        shapes.append(("hypernetwork", mc.hyper_heads, mc.hyper_width // mc.hyper_heads))
    found: Dict[str, Dict[str, str]] = {}
    for name, heads, hd in shapes:
        q = torch.randn(b, heads, n, hd, device=device, dtype=dtype)
        mask = torch.ones(b, 1, 1, n, dtype=torch.bool, device=device)
        mask[..., n - 1 :] = False
        found[name] = {"unpadded": _backend(q, None), "padded": _backend(q, mask)}
    flash = all(v["unpadded"] == "flash_attention" for v in found.values())
    detail = "; ".join(
        f"{name} (heads {h}, head dim {hd}): unpadded {found[name]['unpadded']}, padded {found[name]['padded']}"
        for name, h, hd in shapes
    )
    detail = f"{device.type}, {precision}, seq_len {n}: {detail}"
    if device.type == "cuda" and not flash:
        detail += " — no flash kernel for unpadded batches at this geometry/precision (slower, more memory)"
    figure = "flash" if flash else ("/".join(sorted({v["unpadded"] for v in found.values()})))
    return Result("sdpa", PASS, figure.replace("_attention", ""), detail, {"backends": found})
