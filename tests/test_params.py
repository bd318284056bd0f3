"""Parameter counts against closed-form formulas from the spec, and HyperBERT's budget vs BERT."""

import dataclasses
import os
import re
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from scale_hyper.config import load_config
from scale_hyper.models import ModelConfig, build_model, count_by_component, parameter_report

README = Path(__file__).resolve().parents[1] / "README.md"


def preset(name: str) -> ModelConfig:
    """ModelConfig of a preset, as the CLI loads it (schema defaults, defaults.yaml, the preset; vocab from data)."""
    return load_config([name]).model.validate()


def ln(width: int) -> int:
    return 2 * width


def linear(i: int, o: int) -> int:
    return i * o + o


def attention(width: int) -> int:  # fused QKV + output projection: 4d² + 4d
    return 4 * width * width + 4 * width


def hypernetwork(mc: ModelConfig) -> int:
    dh, d = mc.hyper_width, mc.hidden_size
    uses_hidden = mc.hyper_condition in ("hidden+layer", "hidden")
    uses_layer = mc.hyper_condition in ("hidden+layer", "layer")
    total = 0
    if uses_hidden:
        total += linear(d, dh) + (ln(d) if mc.hyper_input_norm else 0)  # Linear(d -> d_h) [+ LN(x_l)]
    if mc.hyper_position == "learned":
        total += mc.max_position * dh  # P
    if uses_layer or mc.hyper_decoder == "cross":
        total += mc.num_layers * dh  # E_layer
    block = ln(dh) + attention(dh) + ln(dh) + linear(dh, dh * mc.hyper_ffn_ratio) + linear(dh * mc.hyper_ffn_ratio, dh)
    if mc.hyper_decoder == "cross":
        block += ln(dh) + attention(dh)  # cross-attention: q, kv, out
    total += mc.hyper_layers * block + ln(dh)
    total += linear(dh, mc.mixer_width * (1 if mc.tied_weights else 2))
    return total


def expected(mc: ModelConfig, task: str = "mlm", num_labels: int = 2) -> dict:
    d, f, L, V = mc.hidden_size, mc.ffn_size, mc.num_layers, mc.vocab_size
    embeddings = V * d + mc.max_position * d + mc.type_vocab_size * d + ln(d)
    ffn = L * (linear(d, f) + linear(f, d) + ln(d)) + (ln(d) if mc.norm_position == "pre" else 0)
    if mc.mixer in ("bert", "hyla"):
        per_layer = attention(d)
    elif mc.mixer == "hypermixer":  # per head: d/H -> d/H -> d'/H, once or twice, + output LN
        heads = mc.effective_mixer_heads
        c, p = d // heads, mc.mixer_width // heads
        per_layer = (1 if mc.tied_weights else 2) * heads * (linear(c, c) + linear(c, p)) + ln(d)
    else:  # hyperbert: only the generated mixer's output LN per layer
        per_layer = ln(d)
    mixers = L * (per_layer + ln(d))  # + the residual LayerNorm around the mixer
    hyper = hypernetwork(mc) if mc.mixer == "hyperbert" else 0
    heads = linear(d, d) + ln(d) + V if task == "mlm" else linear(d, d) + linear(d, num_labels)
    counts = dict(embeddings=embeddings, mixers=mixers, hypernetwork=hyper, ffn=ffn, heads=heads)
    counts["total"] = sum(counts.values())
    return counts


def tiny(mixer: str, **overrides) -> ModelConfig:
    values = dict(mixer=mixer, vocab_size=97, hidden_size=24, num_layers=3, num_heads=2, ffn_size=40, max_position=33)
    values.update(hyper_width=12, hyper_heads=3, hyper_ffn_ratio=3, mixer_width=18, hyper_layers=2)
    values.update(overrides)
    return ModelConfig(**values).validate()


CASES = {
    "bert": tiny("bert"),
    "hyla": tiny("hyla"),
    "hypermixer": tiny("hypermixer"),
    "hypermixer-tied-1head": tiny("hypermixer", tied_weights=True, mixer_heads=1),
    "hyperbert": tiny("hyperbert"),
    "hyperbert-tied": tiny("hyperbert", tied_weights=True),
    "hyperbert-hidden": tiny("hyperbert", hyper_condition="hidden"),
    "hyperbert-layer": tiny("hyperbert", hyper_condition="layer", hyper_input_norm=True),
    "hyperbert-cross": tiny("hyperbert", hyper_decoder="cross", hyper_condition="hidden"),
    "hyperbert-rotary": tiny("hyperbert", hyper_position="rotary", hyper_layers=3),
    "hyperbert-sinusoidal-norm": tiny("hyperbert", hyper_position="sinusoidal", hyper_input_norm=True),
    "hyperbert-pre": tiny("hyperbert", norm_position="pre"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_counts_match_closed_form(name):
    mc = CASES[name]
    assert count_by_component(build_model(mc, task="mlm")) == expected(mc, "mlm")
    assert count_by_component(build_model(mc, task="cls", num_labels=3)) == expected(mc, "cls", num_labels=3)
    assert parameter_report(mc)["components"] == expected(mc, "mlm")  # meta-device build agrees


def test_hyperbert_mini_is_5_to_7_percent_smaller_than_bert_mini():
    hyper, bert = preset("hyperbert-mini"), preset("bert-mini")
    # Same encoder geometry: only the token mixer differs.
    geometry = ("vocab_size", "hidden_size", "num_layers", "num_heads", "ffn_size", "max_position")
    assert all(getattr(hyper, k) == getattr(bert, k) for k in geometry)

    report = parameter_report(hyper)
    assert report["mixer"] == "hyperbert"
    assert report["baseline_params"] == expected(dataclasses.replace(hyper, mixer="bert"))["total"]
    assert report["baseline_params"] == parameter_report(bert)["total_params"]
    assert report["total_params"] == expected(hyper)["total"]
    assert report["delta_params"] == report["total_params"] - report["baseline_params"]
    assert -7.0 < report["delta_pct"] < -5.0, report["delta_pct"]
    # Pinned: the exact counts behind README's "−5.5 % total, −19 % non-embedding, −59 % mixing".
    deltas = report["deltas"]
    assert {k: (v["params"], v["baseline"]) for k, v in deltas.items()} == {
        "total": (10_581_178, 11_201_594), "non-embedding": (2_635_450, 3_255_866), "mixing": (434_304, 1_054_720)
    }  # fmt: skip
    assert [round(deltas[k]["pct"], 2) for k in ("total", "non-embedding", "mixing")] == [-5.54, -19.06, -58.82]
    # The spec's arithmetic: BERT-mini ≈ 11.2 M with ≈ 1.05 M in Q/K/V/O.
    assert 11.0e6 < report["baseline_params"] < 11.3e6
    assert report["baseline_components"]["mixers"] - 4 * ln(256) == 4 * attention(256)


def test_readme_states_what_params_prints_for_hyperbert_mini():
    """README's example line carries the three deltas `scale-hyper params hyperbert-mini` prints."""
    line = next(x for x in README.read_text().splitlines() if x.startswith("scale-hyper params hyperbert-mini"))
    m = re.search(r"# −([\d.]+) % total, −([\d.]+) % non-embedding, −([\d.]+) % mixing vs bert-mini", line)
    assert m, line
    deltas = parameter_report(preset("hyperbert-mini"))["deltas"]
    for text, key in zip(m.groups(), ("total", "non-embedding", "mixing"), strict=True):
        decimals = len(text.split(".")[1]) if "." in text else 0
        assert round(-deltas[key]["pct"], decimals) == float(text), (key, deltas[key]["pct"], line)


@pytest.mark.parametrize("size", ["tiny", "mini", "base", "large"])
@pytest.mark.parametrize("mixer", ["bert", "hyperbert", "hypermixer", "hyla"])
def test_parameter_report_for_every_preset(mixer, size):
    mc = preset(f"{mixer}-{size}")
    report = parameter_report(mc)
    assert report["total_params"] == expected(mc)["total"]
    assert report["baseline_components"] == expected(dataclasses.replace(mc, mixer="bert"))
    if mixer in ("bert", "hyla"):  # HYLA keeps attention's 4d² + 4d per layer
        assert report["delta_params"] == 0 and report["delta_pct"] == 0.0
    elif mixer == "hypermixer" or size != "tiny":  # at tiny width the hypernetwork outweighs Q/K/V/O
        assert report["delta_params"] < 0
