"""The fused HyperMixing kernels as a GPU would get them, checked on a machine without one.

* The compiler's report: Triton compiles for sm_80/sm_90 on the CPU and its bundled ptxas reports
  registers, spills and shared memory (``scale_hyper.kernels.compile_report``). Here: the widest
  tiles (d/H = d'/H = 128, the most registers of every kernel) on both targets in bf16 and on sm_90
  in fp32 with tf32 dots; `.ci/gpu` and `python -m scale_hyper.kernels.compile_report` run every
  supported geometry and dtype (the figures are in docs/engine.md).
* The routes: fp32 on a GPU without TF32 takes the reference; the expand kernels' grid has one axis.
* Graph breaks under torch.compile for each model.mixer_kernel. TorchDynamo treats a Triton kernel
  as a graph node only where torch sees a GPU (``has_triton()``); that check is MOCKED to True, and
  the kernels, traced as on a GPU, execute in Triton's CPU interpreter.
"""

import sys

import pytest
import torch
from conftest import need_module
from tiny_models import tiny_config

from scale_hyper.models import build_model
from scale_hyper.models import hypermixing as hypermixing_module
from scale_hyper.models.hypermixing import hyper_mixing


@pytest.fixture(scope="module")
def report_module():
    need_module("triton")
    from scale_hyper.kernels import compile_report

    return compile_report


def test_widest_tiles_compile_without_spills(report_module):
    rows = report_module.report(archs=(90, 80), dtypes=("bf16",), dims=(128,))
    rows += report_module.report(archs=(90,), dtypes=("fp32",), dims=(128,))
    kernels = {"reduce_fwd", "expand_fwd", "reduce_bwd", "expand_bwd", "reduce_fwd+split", "reduce_bwd+split"}
    assert {(r.kernel, r.arch, r.dtype) for r in rows} == {(k, a, "bf16") for k in kernels for a in (80, 90)} | {
        (k, 90, "fp32/tf32") for k in kernels
    }
    assert all(0 < r.registers <= report_module.MAX_REGISTERS and r.num_warps == 8 for r in rows)
    assert report_module.problems(rows) == []


def test_the_report_sees_a_spill(report_module):
    """The check can fail: the old launch (4 warps) of _reduce_bwd at 128×128 bf16 spills on sm_90."""
    (launch,) = [call for call in report_module.launches(128, 128, torch.bfloat16) if call[0] == "reduce_bwd"]
    name, args, kwargs = launch
    compiled, ptxas = report_module.compile_launch(name, args, {**kwargs, "num_warps": 4}, 90)
    assert compiled.metadata.num_warps == 4 and ptxas["spill_stores"] > 0 and ptxas["registers"] == 255


def test_fp32_on_a_gpu_takes_the_reference_unless_tf32_is_allowed(monkeypatch):
    triton = need_module("triton")
    del triton
    from scale_hyper.kernels import hypermixing_triton as fused
    from scale_hyper.kernels import launch

    assert launch.exact_fp32_on_gpu(torch.float32, is_cuda=True)
    assert not launch.exact_fp32_on_gpu(torch.bfloat16, is_cuda=True)
    assert not launch.exact_fp32_on_gpu(torch.float32, is_cuda=False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    assert launch.dot_precision(torch.float32, interpreting=False) == "tf32"
    assert not launch.exact_fp32_on_gpu(torch.float32, is_cuda=True)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    assert launch.dot_precision(torch.float32, interpreting=False) == "ieee"
    assert launch.dot_precision(torch.float32, interpreting=True) == "ieee"
    assert launch.dot_precision(torch.bfloat16, interpreting=False) == "tf32"
    # The dispatch, in the CPU interpreter, with CPU tensors standing in for CUDA ones (MOCKED):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(fused, "exact_fp32_on_gpu", lambda dtype, is_cuda: dtype == torch.float32)
    monkeypatch.setattr(hypermixing_module, "_logged", set())
    calls = []
    original = fused.fused_hyper_mixing
    monkeypatch.setattr(fused, "fused_hyper_mixing", lambda *a, **k: calls.append(a[0].dtype) or original(*a, **k))
    gen = torch.Generator().manual_seed(0)
    x, w1, w2 = (torch.randn(2, 20, 32, generator=gen) for _ in range(3))
    want = hyper_mixing(x, w1, w2, 2, scale="sqrt")
    for kernel in ("triton", "auto"):  # fp32: no error for "triton" either (evaluation runs fp32)
        assert torch.equal(hyper_mixing(x, w1, w2, 2, scale="sqrt", kernel=kernel), want)
    assert not calls and "without tensor cores" in fused.reference_route_reason(x, w1, w2, 2)
    half = [t.bfloat16() for t in (x, w1, w2)]
    hyper_mixing(*half, 2, scale="sqrt", kernel="triton")
    assert calls == [torch.bfloat16] and fused.reference_route_reason(*half, 2) is None


def test_grids_stay_within_cuda_limits():
    need_module("triton")
    from scale_hyper.kernels import hypermixing_triton as fused
    from scale_hyper.kernels.launch import MAX_GRID_X, expand_grid, grid_problem

    # B·H = 70,000 programs per token tile: all on axis 0 (2^31 − 1), none on axis 1 (65,535)
    assert expand_grid(7_000, 10, 8192, 64) == (7_000 * 10 * 128,)
    assert grid_problem(7_000 * 10 * 128) is None
    assert "axis 0" in grid_problem(MAX_GRID_X + 1) and "axis 1" in grid_problem(1, 65_536)
    x = torch.zeros(1).expand(2**20, 2**14, 16 * 16)  # 2^20 sequences × 256 tiles × 16 heads, no memory
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")  # lets non-CUDA tensors reach the shape checks
        assert "grid limit" in fused.unsupported_reason(x, x, x, 16)
        assert fused.unsupported_reason(x[:1024], x[:1024], x[:1024], 16) is None
        with pytest.raises(ValueError, match="split=70000 must be in"):
            fused.fused_hyper_mixing(x[:1, :64], x[:1, :64], x[:1, :64], 16, split=70_000)


def graph_breaks(kernel: str) -> tuple:
    """TorchDynamo's graphs and breaks for one training forward of a tiny HyperBERT (as the trainer
    calls it: sparse_logits=True, a padded batch), and where each break happened."""
    geometry = dict(hidden_size=32, mixer_width=32, hyper_width=16, ffn_size=64, dropout=0.0)
    torch.manual_seed(0)
    model = build_model(tiny_config("hyperbert", **geometry, mixer_kernel=kernel), task="mlm")
    ids = torch.randint(5, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    labels = torch.full_like(ids, -100)
    labels[:, 3] = ids[:, 3]
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(input_ids=ids, attention_mask=mask, labels=labels, sparse_logits=True)
    where = [f"{b.user_stack[-1].filename}:{b.user_stack[-1].lineno}" for b in explained.break_reasons if b.user_stack]
    code = "\n".join(g.print_readable(print_output=False) for g in explained.graphs)
    return explained.graph_count, explained.graph_break_count, where, code


def test_the_fused_kernel_adds_no_graph_break(monkeypatch):
    need_module("triton")
    import torch.utils._triton as torch_triton
    from triton.runtime.interpreter import InterpretedFunction

    from scale_hyper.kernels import hypermixing_triton as fused

    monkeypatch.setattr(torch_triton, "has_triton", lambda: True)  # MOCKED: torch believes a GPU is there
    monkeypatch.setattr(fused, "unsupported_reason", lambda *a, **k: None)  # CPU tensors take the kernel
    for name, fn in zip(("reduce_fwd", "expand_fwd", "reduce_bwd", "expand_bwd"), fused._FNS, strict=True):
        monkeypatch.setattr(getattr(fused._JITTED[False], name), "run", InterpretedFunction(fn).run)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        counts = {kernel: graph_breaks(kernel) for kernel in ("torch", "auto", "triton")}
    finally:
        torch.set_num_threads(previous)
        torch._dynamo.reset()
    reference = counts["torch"]
    for kernel in ("auto", "triton"):
        graphs, breaks, where, code = counts[kernel]
        assert (graphs, breaks) == reference[:2], (kernel, where, reference[2])
        assert not [w for w in where if "hypermixing" in w or "/kernels/" in w], where
        assert "triton_kernel_wrapper" in code  # the kernels are nodes of the graph, not breaks
    assert "triton_kernel_wrapper" not in reference[3]
    print({k: v[:3] for k, v in counts.items()}, file=sys.stderr)


def test_the_launch_table_is_well_formed():
    """launch.TUNED / NO_CLEAN_LAUNCH (from `compile_report --tune`): every key a real kernel and
    geometry, every tile a tl.dot size; what the model does where no launch is spill-free."""
    from scale_hyper.kernels import launch

    kernels = {"reduce_fwd", "expand_fwd", "reduce_bwd", "expand_bwd", "reduce_fwd+split", "reduce_bwd+split"}
    for (family, dtype_class, kernel, p, c), config in launch.TUNED.items():
        assert family in launch.FAMILIES and dtype_class in ("16-bit", "fp32") and kernel in kernels
        assert p in (16, 32, 64, 128) and c in (16, 32, 64, 128)
        assert config["num_warps"] in (2, 4, 8, 16) and config["num_stages"] in (1, 2, 3, 4)
        assert config["block_n"] in (16, 32, 64) and (kernel.startswith("expand") or config["block_n"] == 64)
        dtype = torch.float32 if dtype_class == "fp32" else torch.bfloat16
        assert launch.launch_config(kernel, p, c, dtype, family) == config
    assert launch.launch_config("expand_bwd", 64, 64, torch.bfloat16, "sm90") == {
        "num_warps": 4, "num_stages": 3, "block_n": 64}  # fmt: skip
    assert launch.launch_config("reduce_bwd", 128, 16, torch.float16, "sm90")["num_warps"] == 8
    assert "expand_bwd spills" in launch.no_clean_launch(128, 16, torch.float32, "sm80")
    assert launch.no_clean_launch(128, 16, torch.bfloat16, "sm80") is None
    assert launch.no_clean_launch(128, 16, torch.float32, "sm90") is None
