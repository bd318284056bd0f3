"""Fair baselines (issue 15): HYLA's latent-code dropout and N-independent scale, the official
HyperMixer hypernetwork MLPs, non-finite pad rows that must not leak, and the three parameter deltas."""

import dataclasses
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from tiny_models import tiny_config

from scale_hyper.config import load_config
from scale_hyper.models import ModelConfig, build_model, count_by_component, parameter_report
from scale_hyper.models.hypermixing import hyper_mixing
from scale_hyper.models.layers import HeadwiseLinear


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors on a shared 2-core box
    yield
    torch.set_num_threads(previous)


def mixer_and_hypernet(mc: ModelConfig):
    """Layer 0's mixer and the shared hypernetwork (or None), initialised as in a model, in eval mode."""
    model = build_model(mc, task="base").eval()
    return model.encoder.mixer(0), model.encoder.hypernet


# --- HYLA ---------------------------------------------------------------------------------------


def test_hyla_applies_dropout_to_the_latent_code():
    torch.manual_seed(0)
    mixer, _ = mixer_and_hypernet(tiny_config("hyla", dropout=0.5, hyla_chunk=4))
    x = torch.randn(2, 9, 16)
    mixer.eval()
    clean = mixer(x, None)
    mixer.train()
    dropped = mixer(x, None)
    assert not torch.allclose(dropped, clean)  # train mode drops entries of a
    # The same dropout mask applied by hand to a in both of its uses gives the mixer's output.
    torch.manual_seed(3)
    got = mixer(x, None)
    q, k, v = mixer.qkv(x).view(2, 9, 3, 2, 8).permute(2, 0, 3, 1, 4)
    s = q @ k.transpose(-1, -2) / math.sqrt(8)
    a = s / (s.pow(2).mean(dim=1, keepdim=True) + 1e-6).sqrt()
    torch.manual_seed(3)
    chunks = []
    for start in range(0, 9, 4):  # the mixer draws one mask per query chunk, in order
        a_chunk = torch.nn.functional.dropout(a[:, :, start : start + 4], 0.5, training=True)
        r = torch.relu(torch.einsum("bhcn,bhnd->bcnd", a_chunk, v))
        chunks.append(torch.einsum("bhcn,bcnd->bchd", a_chunk, r).flatten(2))
    want = mixer.out(torch.cat(chunks, dim=1))
    assert torch.allclose(got, want, atol=1e-5)
    mixer.dropout = 0.0  # no dropout: train mode equals eval mode
    assert torch.allclose(mixer(x, None), clean, atol=1e-6)


def hyla_output_rms(scale: str) -> list[float]:
    mc = tiny_config("hyla", hidden_size=64, num_heads=4, max_position=512, hyla_scale=scale, hyla_chunk=128)
    torch.manual_seed(0)
    mixer, _ = mixer_and_hypernet(mc)
    out = []
    with torch.no_grad():
        for n in (32, 128, 512):
            x = torch.randn(1, n, 64)  # LayerNorm'd input: RMS 1
            out.append(mixer(x, None).pow(2).mean().sqrt().item())
    return out


def test_hyla_scale_sqrt_keeps_the_output_scale_independent_of_n():
    grows = hyla_output_rms("none")
    assert grows[2] / grows[0] > 2.5, grows  # ≈ √16 = 4: the paper's form grows as √N at init
    flat = hyla_output_rms("sqrt")
    assert max(flat) / min(flat) < 1.25, flat


def test_hyla_scale_counts_real_keys_only():
    torch.manual_seed(0)
    mixer, _ = mixer_and_hypernet(tiny_config("hyla", hyla_scale="sqrt", hyla_chunk=4))
    x = torch.randn(1, 7, 16)
    padded = torch.cat([x, torch.randn(1, 5, 16)], dim=1)
    mask = torch.tensor([[True] * 7 + [False] * 5])
    assert torch.allclose(mixer(padded, mask)[:, :7], mixer(x, None), atol=1e-6)


# --- HyperMixer: the official hypernetwork MLPs -------------------------------------------------


def test_official_hypermixer_mlps_have_no_bias_and_xavier_init():
    mc = tiny_config("hypermixer", hidden_size=32, mixer_width=64, num_heads=2, hypermixer_mlp="official")
    ours = tiny_config("hypermixer", hidden_size=32, mixer_width=64, num_heads=2)
    torch.manual_seed(0)
    mixer, _ = mixer_and_hypernet(mc)
    layers = [m for m in mixer.modules() if isinstance(m, HeadwiseLinear)]
    assert len(layers) == 4 and all(m.bias is None for m in layers)
    for m in layers:
        heads, fan, out = m.weight.shape
        # Independently: torch's xavier_uniform_ on the official [H, out, in] layout, gain √2.
        official = torch.empty(heads, out, fan)
        torch.nn.init.xavier_uniform_(official, gain=math.sqrt(2.0))
        bound = math.sqrt(2.0) * math.sqrt(6.0 / sum(torch.nn.init._calculate_fan_in_and_fan_out(official)))
        w = m.weight.detach()
        assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound  # uniform, not BERT's normal(0.02)
        assert abs(w.std().item() - official.std().item()) < 0.15 * official.std().item()
    # Exactly the biases are gone.
    biases = sum(m.bias.numel() for m in mixer_and_hypernet(ours)[0].modules() if isinstance(m, HeadwiseLinear))
    assert count_by_component(build_model(ours))["total"] - count_by_component(build_model(mc))["total"] == 2 * biases
    with pytest.raises(ValueError, match="hypermixer_mlp"):
        ModelConfig(hypermixer_mlp="xavier").validate()


# --- padding: a non-finite pad row reaches no real token ----------------------------------------

MASKING = {
    "bert": tiny_config("bert"),
    "hypermixer": tiny_config("hypermixer"),
    "hyla": tiny_config("hyla", hyla_chunk=4),
    "hyla-sqrt": tiny_config("hyla", hyla_chunk=4, hyla_scale="sqrt"),
    "hyperbert": tiny_config("hyperbert"),
}


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("name", list(MASKING))
def test_non_finite_pad_rows_do_not_leak(name, bad):
    torch.manual_seed(0)
    mixer, hypernet = mixer_and_hypernet(MASKING[name])
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 6:] = False
    x = torch.randn(2, 10, 16)
    poisoned = x.clone()
    poisoned[1, 6:] = bad
    outputs = []
    for inp in (x, poisoned):
        inp = inp.clone().requires_grad_()
        y = mixer(inp, mask, hypernet=hypernet, layer=0)
        (y[mask] ** 2).sum().backward()  # a loss on real tokens only
        outputs.append((y, inp.grad))
    (y_clean, g_clean), (y, g) = outputs
    assert torch.isfinite(y[mask]).all() and torch.allclose(y[mask], y_clean[mask], atol=1e-6)
    assert torch.isfinite(g[mask]).all() and torch.allclose(g[mask], g_clean[mask], atol=1e-6)


def test_reference_hyper_mixing_zeroes_pads_by_select():
    x, w1, w2 = (torch.randn(2, 7, 8, requires_grad=True) for _ in range(3))
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, 5:] = False
    want = hyper_mixing(x, w1, w2, 2, mask, scale="sqrt")
    bad = [t.detach().clone() for t in (x, w1, w2)]
    for t in bad:
        t[0, 5:] = float("nan")
    got = hyper_mixing(*bad, 2, mask, scale="sqrt")
    assert torch.equal(got[mask], want[mask]) and (got[~mask] == 0).all()


# --- params: three deltas, against an independent count ----------------------------------------


def numel(model, keep) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if keep(name))


@pytest.mark.parametrize("mixer", ["hyperbert", "hypermixer"])
def test_parameter_report_deltas_match_an_independent_count(mixer):
    mc = tiny_config(mixer, vocab_size=200, max_position=96)
    report = parameter_report(mc)
    ours, bert = build_model(mc), build_model(dataclasses.replace(mc, mixer="bert"))
    groups = {
        "total": lambda n: True,
        "non-embedding": lambda n: not n.startswith("model.embeddings."),
        "mixing": lambda n: ".mixer." in n or ".mixer_norm." in n or ".hypernet." in n,
    }
    assert list(report["deltas"]) == list(groups)
    for group, keep in groups.items():
        want_ours, want_bert = numel(ours, keep), numel(bert, keep)
        d = report["deltas"][group]
        assert (d["params"], d["baseline"], d["delta"]) == (want_ours, want_bert, want_ours - want_bert), group
        assert d["pct"] == pytest.approx(100.0 * (want_ours - want_bert) / want_bert)
    # The headline total moves with the vocabulary; the mixing delta does not.
    bigger = parameter_report(dataclasses.replace(mc, vocab_size=2000))["deltas"]
    assert bigger["mixing"] == report["deltas"]["mixing"]
    assert abs(bigger["total"]["pct"]) < abs(report["deltas"]["total"]["pct"])


def test_params_verb_prints_the_three_deltas(capsys):
    from scale_hyper.cli import main

    assert main(["params", "hyperbert-tiny", "model.max_position=160"]) == 0
    text = capsys.readouterr().out
    report = parameter_report(load_config(["hyperbert-tiny", "model.max_position=160"]).model)
    deltas = text.split("delta vs bert", 1)[1].splitlines()
    for group, d in report["deltas"].items():
        row = next(line for line in deltas if line.startswith(group + " "))
        assert f"{d['delta']:+,}" in row and f"{d['pct']:+.2f}" in row, row
    assert "max_position=160" in text
