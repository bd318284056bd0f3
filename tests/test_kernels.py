"""Fused Triton HyperMixing (scale_hyper.kernels) against the reference ``hyper_mixing``.

Without a GPU the kernels run in Triton's CPU interpreter. TRITON_INTERPRET=1 is read when
``triton.jit`` wraps a function (compiled kernel or interpreted one) and at launch, and for
Triton's own jitted library functions (tl.zeros, tl.cdiv, ...) already at ``import triton``.
By the time a test runs, triton has been imported without it (this module imports the kernel
module, and transformers imports triton too), so the kernel module wraps its kernels lazily per
mode and uses only Triton builtins; the ``kernels`` fixture then sets the variable for one test at
a time (monkeypatch), so no other test module or subprocess ever sees it. On a CUDA machine the
same tests run the compiled kernels instead.
"""

import importlib.util
import logging
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from conftest import need_module
from tiny_models import tiny_config

from scale_hyper.config.errors import is_user_error
from scale_hyper.config.model import ConfigError
from scale_hyper.kernels import hypermixing_triton as fused_module
from scale_hyper.kernels import splits as split_plan
from scale_hyper.models import ModelConfig, build_model
from scale_hyper.models import hypermixing as hypermixing_module
from scale_hyper.models.hypermixing import hyper_mixing

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


@pytest.fixture
def kernels(monkeypatch):
    """The kernel module, with the interpreter on when there is no GPU; skips (fails under CI=true) without triton."""
    need_module("triton")
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert fused_module.interpreting()
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors on a shared 2-core box
    yield fused_module
    torch.set_num_threads(previous)


def inputs(b, n, heads, c, p, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x, w1, w2 = (torch.randn(b, n, heads * k, generator=gen, dtype=dtype) for k in (c, p, p))
    return [t.to(DEVICE).requires_grad_() for t in (x, w1, w2)]


def padding_mask(b, n):
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[1, n - 9 :] = False  # the second sequence ends in 9 pads
    if b > 2:
        mask[2, 5:] = False
    return mask.to(DEVICE)


def rel_err(got, want):
    """max |got - want| relative to max |want| (element-wise rtol fails on entries near 0)."""
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30)).item()


def run(fn, tensors, dy):
    y = fn(*tensors)
    return (y, *torch.autograd.grad(y, tensors, dy))


# (heads, c = d/H, p = d'/H): p > c, p < c, and a head count that is not a power of two.
SHAPES = [(2, 16, 32), (3, 32, 16)]


@pytest.mark.parametrize("heads,c,p", SHAPES)
@pytest.mark.parametrize("activation", [True, False])
@pytest.mark.parametrize("scale", ["none", "sqrt", "mean"])
@pytest.mark.parametrize("masked", [False, True])
def test_forward_and_backward_match_reference(kernels, heads, c, p, activation, scale, masked):
    # N=37: three BLOCK_N=16 tiles, the last one partial
    check_against_reference(kernels, 3, 37, heads, c, p, activation, scale, masked)


def check_against_reference(kernels, b, n, heads, c, p, activation, scale, masked, split=None):
    """y, dx, dw1, dw2 of the fused path (BLOCK_N=16) against the reference, fp32, to 1e-4."""
    tensors = inputs(b, n, heads, c, p)
    mask = padding_mask(b, n) if masked else None
    dy = torch.randn(b, n, heads * c, generator=torch.Generator().manual_seed(1)).to(DEVICE)

    def fused(x, w1, w2):
        return kernels.fused_hyper_mixing(x, w1, w2, heads, mask, activation, scale, block_n=16, split=split)

    def reference(x, w1, w2):
        return hyper_mixing(x, w1, w2, heads, mask, activation=activation, scale=scale)

    got, want = run(fused, tensors, dy), run(reference, tensors, dy)
    for name, g, w in zip(("y", "dx", "dw1", "dw2"), got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        assert rel_err(g, w) < 1e-4, (name, rel_err(g, w))
        if masked:  # pads get zero output and zero gradients (the reference's too)
            assert g.masked_select(~mask[..., None]).abs().max() == 0, name


@pytest.mark.parametrize("split", [2, 3])
@pytest.mark.parametrize("activation", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_split_reductions_match_reference(kernels, monkeypatch, split, activation, masked):
    """Forced SPLIT on N=50 = 4 tiles of 16: chunk 32 tokens, so splits [0, 32), [32, 50) (ends
    mid-tile) and, for SPLIT=3, an empty [64, 50). Each partial holds exactly its token range."""
    heads, c, p, b, n, chunk = 2, 16, 32, 3, 50, 32
    partials = {}  # the [B, H, SPLIT, p, c] buffers each epilogue receives

    def spy(name):
        finish = getattr(kernels, name)

        def record(part, *args):
            partials[name] = part.clone()
            return finish(part, *args)

        return record

    for name in ("finish_fwd", "finish_bwd"):  # the split epilogues, as the kernel module calls them
        monkeypatch.setattr(kernels, name, spy(name))
    check_against_reference(kernels, b, n, heads, c, p, activation, "mean", masked, split=split)
    assert partials.keys() == {"finish_fwd", "finish_bwd"}
    assert all(part.shape == (b, heads, split, p, c) for part in partials.values())
    x, w1, _ = (t.detach() for t in inputs(b, n, heads, c, p))  # the same tensors as the check's
    if masked:
        keep = padding_mask(b, n)[..., None].float()
        x, w1 = x * keep, w1 * keep
    for s in range(split):
        rows = slice(s * chunk, min((s + 1) * chunk, n))
        got = partials["finish_fwd"][:, :, s]
        if s * chunk >= n:  # an empty split still stores its (zero) partial
            assert not got.any()
            continue
        w1s, xs = w1[:, rows].unflatten(-1, (heads, p)), x[:, rows].unflatten(-1, (heads, c))
        want = torch.einsum("bnhp,bnhc->bhpc", w1s, xs)
        assert rel_err(got, want) < 1e-5, s


def test_split_heuristic(kernels, monkeypatch):
    splits = split_plan.reduction_splits
    assert split_plan.sm_count(torch.device("cpu")) == split_plan.INTERPRETER_SMS == 132
    assert splits(8 * 12, 512, 64, 132) == 2  # 96 programs on 132 SMs: 8 tiles, 4 per split
    assert splits(8 * 12, 8192, 64, 132) == 3  # B=8, H=12 at S=8192: 288 programs
    assert splits(64 * 12, 8192, 64, 132) == 1  # B·H already ≥ 2 per SM
    assert splits(264, 8192, 64, 132) == 1
    assert splits(1, 8192, 64, 132) == 32  # capped at 4 tiles per split
    assert splits(1, 100, 64, 132) == 1  # too few tiles to split
    for programs in (1, 5, 96, 200, 263, 264, 1000):
        for n in (1, 63, 64, 255, 256, 257, 1000, 8192, 65536):
            got = splits(programs, n, 64, 132)
            tiles = -(-n // 64)
            assert 1 <= got <= tiles
            assert got == 1 or (programs < 264 and tiles // got >= split_plan.MIN_SPLIT_TILES)
    # split=None asks the heuristic (B·H, N, BLOCK_N, SM count); its answer is used.
    asked = []
    monkeypatch.setattr(kernels, "reduction_splits", lambda *a: asked.append(a) or 3)
    heads, c, p, b, n = 2, 16, 16, 2, 40
    x, w1, w2 = (t.detach() for t in inputs(b, n, heads, c, p))
    got = kernels.fused_hyper_mixing(x, w1, w2, heads, scale="sqrt", block_n=16)
    assert asked == [(b * heads, n, 16, kernels.sm_count(x.device))]
    assert rel_err(got, hyper_mixing(x, w1, w2, heads, scale="sqrt")) < 1e-4
    with pytest.raises(ValueError, match="split"):
        kernels.fused_hyper_mixing(x, w1, w2, heads, split=0)


def test_default_tile_strided_views_and_tied_weights(kernels):
    """BLOCK_N=64 > N; w1/w2 as strided halves of one tensor (the hypernetwork's chunk); W2 = W1."""
    heads, c, p, b, n = 2, 16, 16, 2, 11
    x, _, _ = inputs(b, n, heads, c, p)
    w = torch.randn(b, n, 2 * heads * p, device=DEVICE, requires_grad=True)
    dy = torch.randn(b, n, heads * c, device=DEVICE)
    halves = w.chunk(2, dim=-1)
    assert halves[0].stride(1) == 2 * heads * p  # read in place, not copied
    assert kernels.unsupported_reason(x, *halves, heads) is None  # the fused path, not the fallback

    def mixing(fn, tied):
        def call(x, w):
            w1, w2 = w.chunk(2, dim=-1)
            return fn(x, w1, w1 if tied else w2, heads, scale="sqrt")

        return call

    for tied in (False, True):
        got = run(mixing(kernels.fused_hyper_mixing, tied), [x, w], dy)
        want = run(mixing(hyper_mixing, tied), [x, w], dy)
        for g, r in zip(got, want, strict=True):
            assert rel_err(g, r) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_as_accurate_as_the_reference(kernels, dtype):
    """16-bit inputs: the fused result and the reference's, both against a float64 reference."""
    heads, c, p, b, n = 2, 16, 32, 2, 37
    tensors = inputs(b, n, heads, c, p, dtype=dtype)
    mask = padding_mask(b, n)
    dy = torch.randn(b, n, heads * c, device=DEVICE, dtype=dtype)
    got = run(lambda *t: kernels.fused_hyper_mixing(*t, heads, mask, scale="sqrt", block_n=16), tensors, dy)
    low = run(lambda *t: hyper_mixing(*t, heads, mask, scale="sqrt"), tensors, dy)
    exact = [t.detach().double().requires_grad_() for t in tensors]
    high = run(lambda *t: hyper_mixing(*t, heads, mask, scale="sqrt"), exact, dy.double())
    for g, lo, hi in zip(got, low, high, strict=True):
        assert g.dtype == dtype
        assert rel_err(g, hi) <= max(4 * rel_err(lo, hi), 1e-3), (rel_err(g, hi), rel_err(lo, hi))


@pytest.mark.parametrize(
    "heads,c,p,why",
    [(2, 8, 6, "d/H=8"), (2, 24, 16, "d/H=24"), (1, 16, 256, "d'/H=256"), (2, 16, 12, "d'/H=12")],
)
def test_unsupported_shapes_fall_back_for_auto_and_fail_for_triton(kernels, heads, c, p, why):
    b, n = 2, 9
    x, w1, w2 = inputs(b, n, heads, c, p)
    mask = padding_mask(b, n)
    reason = kernels.unsupported_reason(x, w1, w2, heads)
    assert reason is not None and why.split("=")[0] in reason
    want = hyper_mixing(x, w1, w2, heads, mask, scale="mean")
    # auto: the lenient choice, the reference path
    assert torch.equal(hyper_mixing(x, w1, w2, heads, mask, scale="mean", kernel="auto"), want)
    # triton: strict, a user error naming the shape and the way out
    with pytest.raises(ConfigError, match="mixer_kernel=auto") as err:
        hyper_mixing(x, w1, w2, heads, mask, scale="mean", kernel="triton")
    assert str(tuple(x.shape)) in str(err.value) and why.split("=")[0] in str(err.value)
    assert is_user_error(err.value)
    with pytest.raises(ValueError, match="cannot run"):
        kernels.fused_hyper_mixing(x, w1, w2, heads, mask)


def test_pad_rows_are_zeroed_by_select_in_the_fused_path(kernels):
    """A NaN/inf in a pad row of x, W1 or W2 reaches no real token (NaN·0 = NaN would)."""
    heads, c, p, b, n = 2, 16, 16, 2, 21
    x, w1, w2 = inputs(b, n, heads, c, p)
    mask = padding_mask(b, n)
    want = kernels.fused_hyper_mixing(x, w1, w2, heads, mask, scale="sqrt", block_n=16)
    for bad in (float("nan"), float("inf")):
        poisoned = [t.detach().clone() for t in (x, w1, w2)]
        for t in poisoned:
            t[~mask] = bad
        poisoned = [t.requires_grad_() for t in poisoned]
        got = kernels.fused_hyper_mixing(*poisoned, heads, mask, scale="sqrt", block_n=16)
        assert torch.isfinite(got).all() and torch.equal(got[mask], want[mask]) and (got[~mask] == 0).all()
        got[mask].sum().backward()
        for t in poisoned:
            assert torch.isfinite(t.grad).all() and (t.grad[~mask] == 0).all()


def test_the_chosen_path_is_logged_once(kernels, monkeypatch, caplog):
    monkeypatch.setattr(hypermixing_module, "_logged", set())
    heads, b, n = 2, 2, 9
    fits, narrow = inputs(b, n, heads, 16, 16), inputs(b, n, heads, 8, 8)
    with caplog.at_level(logging.INFO, logger=hypermixing_module.__name__):
        for _ in range(3):
            hyper_mixing(*fits, heads, kernel="auto")
            hyper_mixing(*narrow, heads, kernel="auto")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert "fused Triton kernel" in lines[0] and "torch reference" in lines[1] and "d/H=8" in lines[1]


def test_dispatch_rules(kernels, monkeypatch):
    heads, c, p, b, n = 2, 16, 16, 2, 9
    x, w1, w2 = inputs(b, n, heads, c, p)
    calls = []
    original = kernels.fused_hyper_mixing
    monkeypatch.setattr(kernels, "fused_hyper_mixing", lambda *a, **k: calls.append(1) or original(*a, **k))
    want = hyper_mixing(x, w1, w2, heads)
    assert not calls
    for kernel in ("triton", "auto"):
        assert rel_err(hyper_mixing(x, w1, w2, heads, kernel=kernel), want) < 1e-4
    assert len(calls) == 2
    assert kernels.unsupported_reason(x, w1.double(), w2.double(), heads) is not None  # mixed dtypes
    with pytest.raises(ValueError, match="kernel="):
        hyper_mixing(x, w1, w2, heads, kernel="cuda")
    # A stand-alone copy of the model code without scale_hyper.kernels: auto runs the reference;
    # triton too on CPU tensors (the kernel is CUDA-only), but on CUDA tensors it is an error.
    monkeypatch.setattr(hypermixing_module, "_fused_module", False)
    assert torch.equal(hyper_mixing(x, w1, w2, heads, kernel="auto"), want)
    if CUDA:
        with pytest.raises(ConfigError, match="not importable"):
            hyper_mixing(x, w1, w2, heads, kernel="triton")
    else:
        assert torch.equal(hyper_mixing(x, w1, w2, heads, kernel="triton"), want)
    if not CUDA:  # CPU without the interpreter: "falls back to torch elsewhere"
        monkeypatch.setattr(hypermixing_module, "_fused_module", None)
        monkeypatch.delenv("TRITON_INTERPRET")
        assert "cpu" in kernels.unsupported_reason(x, w1, w2, heads)
        assert torch.equal(hyper_mixing(x, w1, w2, heads, kernel="triton"), want)
    assert len(calls) == 2


@pytest.mark.parametrize(
    "mixer,overrides",
    [("hyperbert", {"mixer_scale": "sqrt"}), ("hypermixer", {"tied_weights": True})],
)
def test_whole_model_loss_and_gradients_match_torch_kernel(kernels, monkeypatch, mixer, overrides):
    calls = []
    original = kernels.fused_hyper_mixing
    monkeypatch.setattr(kernels, "fused_hyper_mixing", lambda *a, **k: calls.append(1) or original(*a, **k))
    # The shared tiny geometry, widened so d/H = d'/H = 16 (tl.dot needs >= 16).
    geometry = dict(hidden_size=32, mixer_width=32, hyper_width=16, ffn_size=64, dropout=0.0, **overrides)
    torch.manual_seed(0)
    reference = build_model(tiny_config(mixer, **geometry, mixer_kernel="torch"), task="mlm").to(DEVICE)
    model = build_model(tiny_config(mixer, **geometry, mixer_kernel="triton"), task="mlm").to(DEVICE)
    model.load_state_dict(reference.state_dict())
    ids = torch.randint(5, 64, (2, 13), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    results = []
    for net in (reference, model):
        loss = net(ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        results.append((loss, {name: p.grad for name, p in net.named_parameters() if p.grad is not None}))
    (loss_ref, grads_ref), (loss, grads) = results
    assert len(calls) == 2  # one fused call per layer: the switch reached the kernel
    assert rel_err(loss, loss_ref) < 1e-5
    assert grads.keys() == grads_ref.keys() and grads
    for name, grad in grads.items():
        assert rel_err(grad, grads_ref[name]) < 1e-4, name


def test_config_switch_is_validated():
    assert ModelConfig().mixer_kernel == "torch"
    with pytest.raises(ValueError, match="mixer_kernel"):
        ModelConfig(mixer_kernel="cuda").validate()


def test_module_imports_and_falls_back_without_triton(monkeypatch):
    """A CPU install without triton: the kernel module imports, and the models run the reference."""
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    monkeypatch.setitem(sys.modules, "triton.language", None)
    # Named inside scale_hyper.kernels so its relative import of .splits resolves.
    spec = importlib.util.spec_from_file_location("scale_hyper.kernels.hypermixing_no_triton", fused_module.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert not module.triton_available() and not module.interpreting()
    x, w1, w2 = (torch.randn(2, 5, 32) for _ in range(3))
    assert module.unsupported_reason(x, w1, w2, 2) == "triton is not installed"
    monkeypatch.setattr(hypermixing_module, "_fused_module", module)
    want = hyper_mixing(x, w1, w2, 2, scale="sqrt")
    assert torch.equal(hyper_mixing(x, w1, w2, 2, scale="sqrt", kernel="triton"), want)
