"""The transplant protocol: a deeper model built from a shallow one at a fixed mixing-parameter
budget (hyperbert: the same hypernetwork; bert/hypermixer: the same attention/mixer modules, shared)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scale_hyper.evaluation.transplant import save
from scale_hyper.models import ModelConfig, build_model
from scale_hyper.models import transplant as T

REPO = Path(__file__).resolve().parents[1]


def tiny(mixer: str, layers: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    mc = ModelConfig(mixer=mixer, vocab_size=64, hidden_size=32, num_layers=layers, num_heads=2, ffn_size=64,
                     max_position=32, hyper_width=16, hyper_heads=2, mixer_width=32, dropout=0.0)  # fmt: skip
    model = build_model(mc, task="mlm")
    with torch.no_grad():  # "trained": every tensor differs from a fresh init (norms and biases too)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def test_hyperbert_reuses_the_hypernetwork_unchanged():
    src = tiny("hyperbert")
    new, info = T.transplant(src, 5, embeddings="cycle")
    s_hn, n_hn = src.model.encoder.hypernet.state_dict(), new.model.encoder.hypernet.state_dict()
    assert s_hn.keys() == n_hn.keys()
    for k in s_hn:
        if k != "layer_embeddings.weight":
            assert torch.equal(s_hn[k], n_hn[k]), k
    rows_src, rows_new = s_hn["layer_embeddings.weight"], n_hn["layer_embeddings.weight"]
    assert rows_new.shape[0] == 5
    for i in range(5):
        assert torch.equal(rows_new[i], rows_src[i % 2])
    # FFNs and norms stacked cyclically; the embeddings and head unchanged
    for i in range(5):
        assert torch.equal(new.model.encoder.layers[i].ffn.up.weight, src.model.encoder.layers[i % 2].ffn.up.weight)
        assert torch.equal(
            new.model.encoder.layers[i].mixer.norm.weight, src.model.encoder.layers[i % 2].mixer.norm.weight
        )
    assert torch.equal(new.model.embeddings.word_embeddings.weight, src.model.embeddings.word_embeddings.weight)
    # The promised budget: only the 3 new layer-embedding rows (d_h each) and 3 mixer output norms (2d each).
    assert info["mixing_params"] - info["mixing_params_source"] == 3 * 16 + 3 * 2 * 32
    assert info["mixing_params"] == T.mixing_parameters(new)


def test_hyperbert_layer_embedding_options():
    src = tiny("hyperbert")
    rows = src.model.encoder.hypernet.layer_embeddings.weight.detach()
    inter, _ = T.transplant(src, 4, embeddings="interpolate")
    got = inter.model.encoder.hypernet.layer_embeddings.weight.detach()
    assert torch.allclose(got[0], rows[0]) and torch.allclose(got[3], rows[1])
    assert torch.allclose(got[1], rows[0] * 2 / 3 + rows[1] / 3, atol=1e-6)
    fresh, _ = T.transplant(src, 4, embeddings="fresh")
    got = fresh.model.encoder.hypernet.layer_embeddings.weight.detach()
    assert torch.equal(got[:2], rows) and not torch.equal(got[2], rows[0]) and not torch.equal(got[3], rows[1])


@pytest.mark.parametrize("mixer", ["bert", "hypermixer"])
def test_per_layer_mixers_are_shared_so_the_count_is_unchanged(mixer):
    src = tiny(mixer)
    new, info = T.transplant(src, 6)
    encoder = new.model.encoder
    assert new.config.share_mixers == 2 and info["mixer_of_layer"] == [0, 1, 0, 1, 0, 1]
    for i in range(6):
        assert encoder.mixer(i) is encoder.shared_mixers[i % 2]  # the same module, ALBERT-style
        assert encoder.layers[i].mixer is None
        for (k, a), b in zip(
            src.model.encoder.layers[i % 2].mixer.state_dict().items(),
            encoder.mixer(i).state_dict().values(),
            strict=True,
        ):
            assert torch.equal(a, b), k
    assert info["mixing_params"] == info["mixing_params_source"] == T.mixing_parameters(src)
    ffn = sum(p.numel() for p in src.model.encoder.layers[0].ffn.parameters())
    norms = sum(
        p.numel() for n, p in src.model.encoder.layers[0].named_parameters() if "norm" in n and "mixer." not in n
    )
    assert info["total_params"] - info["total_params_source"] == 4 * (ffn + norms)  # only FFNs/norms were added
    # the transplanted model computes what the source's layers compute, stacked: with 2 -> 2 it is the source
    same, _ = T.transplant(src, 2)
    ids = torch.randint(5, 64, (2, 8))
    assert torch.equal(same(ids).logits, src(ids).logits)
    # gradients of a shared mixer accumulate from every layer that uses it
    out = new(torch.randint(5, 64, (2, 8)), labels=torch.randint(5, 64, (2, 8)))
    out.loss.backward()
    grads = [p.grad for p in encoder.shared_mixers.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_stretch_order_and_save_reload_keep_function_and_sharing(tmp_path):
    from transformers import AutoModelForMaskedLM

    src = tiny("bert", layers=2)
    new, info = T.transplant(src, 4, order="stretch")
    assert info["layer_map"] == [0, 0, 1, 1] and info["mixer_of_layer"] == [0, 0, 1, 1]
    save(new, info, tmp_path / "hf")
    back = AutoModelForMaskedLM.from_pretrained(tmp_path / "hf").eval()
    encoder = back.model.encoder
    assert back.config.share_mixers == 2 and back.config.share_order == "stretch"
    assert encoder.mixer(1) is encoder.mixer(0) and encoder.mixer(3) is encoder.mixer(2)
    assert T.mixing_parameters(back) == info["mixing_params"]
    ids = torch.randint(5, 64, (2, 10))
    assert torch.allclose(new.eval()(ids).logits, back(ids).logits, atol=1e-5)
    assert json.loads((tmp_path / "hf" / "transplant.json").read_text())["layers"] == 4
    # a transplant of a transplant keeps the k shared mixers
    deeper, info2 = T.transplant(back, 8)
    assert deeper.config.share_mixers == 2 and info2["mixing_params"] == info["mixing_params"]


def test_transplant_cli_on_an_exported_model(tmp_path):
    src = tiny("hyperbert")
    src.save_pretrained(tmp_path / "src")
    proc = subprocess.run(
        [sys.executable, "-m", "scale_hyper", "transplant", str(tmp_path / "src"), "--layers", "4", "--out", str(tmp_path / "deep")],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mixing parameters:" in proc.stdout and "scale-hyper train" in proc.stdout
    cfg = json.loads((tmp_path / "deep" / "config.json").read_text())
    assert cfg["num_layers"] == 4 and cfg["mixer"] == "hyperbert"
