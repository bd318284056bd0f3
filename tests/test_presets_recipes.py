"""Presets are recipes (issue 12): every preset states its scale's training recipe, each number with its
source in a comment; mixers of one size share it (a comparison changes only the mixer); -base/-large
carry MosaicBERT's published recipe; the main job (no preset) stays the CPU-sized default."""

from __future__ import annotations

import pytest

from scale_hyper.config import available_presets, load_config
from scale_hyper.config.loading import preset_text

RECIPE = [
    ("data", "seq_len"), ("data", "mask_prob"), ("train", "global_batch_size"), ("train", "micro_batch_size"),
    ("train", "max_steps"), ("train", "lr"), ("train", "warmup_ratio"), ("train", "decay"), ("train", "min_lr_ratio"),
    ("train", "weight_decay"), ("train", "adam_betas"), ("train", "adam_eps"),
]  # fmt: skip
PRESETS = [p for p in available_presets() if p != "defaults"]


def _sourced_lines(name: str) -> dict:
    """{(group, key): comment} for the preset's top-level group keys."""
    out, group = {}, None
    for line in preset_text(name).splitlines():
        if line and not line.startswith((" ", "#")):
            group = line.rstrip(":").strip()
        elif line.startswith("  ") and not line.startswith("   ") and ":" in line:
            key = line.split(":", 1)[0].strip()
            out[(group, key)] = line.split("#", 1)[1].strip() if "#" in line else ""
    return out


@pytest.mark.parametrize("name", PRESETS)
def test_every_recipe_number_is_set_with_its_source(name):
    lines = _sourced_lines(name)
    for key in RECIPE:
        assert key in lines, f"{name}: {'.'.join(key)} is not set"
        assert len(lines[key]) > 3, f"{name}: {'.'.join(key)} has no source comment"


@pytest.mark.parametrize("size", ["tiny", "mini", "base", "large"])
def test_mixers_of_one_size_share_the_recipe(size):
    runs = [load_config([f"{m}-{size}"]) for m in ("hyperbert", "bert", "hypermixer", "hyla")]
    recipes = [{k: getattr(getattr(r, g), k) for g, k in RECIPE} for r in runs]
    assert all(r == recipes[0] for r in recipes)


@pytest.mark.parametrize("size, lr", [("base", 5e-4), ("large", 2e-4)])
def test_base_and_large_follow_mosaicbert(size, lr):
    run = load_config([f"hyperbert-{size}"])
    t, d = run.train, run.data
    assert (t.global_batch_size, d.seq_len, d.mask_prob, t.lr) == (4096, 128, 0.3, lr)
    assert (t.warmup_ratio, t.decay, t.min_lr_ratio, t.max_steps) == (0.06, "linear", 0.02, 70000)
    assert t.max_steps * t.global_batch_size == 286_720_000  # MosaicBERT's max_duration in samples
    assert t.weight_decay * t.lr == pytest.approx(1e-5)  # Composer's decoupled 1e-5 as torch AdamW's coupled value
    assert (list(t.adam_betas), t.adam_eps) == ([0.9, 0.98], 1e-6)


def test_main_job_stays_cpu_sized():
    run = load_config([])
    assert (run.train.global_batch_size, run.train.max_steps, run.model.hidden_size) == (32, 300, 64)
    assert load_config(["hyperbert-tiny"]).train.global_batch_size == 32


@pytest.mark.parametrize("size, d, layers, heads", [("xl", 2048, 24, 32), ("3b", 2560, 36, 40)])
def test_xl_and_3b_share_the_recipe_and_the_hypernetwork_rule(size, d, layers, heads):
    """Issue 20: -xl (≈1.3 B as BERT) and -3b (≈2.9 B) for hyperbert, bert and hypermixer, the MosaicBERT
    family's recipe at a lower learning rate, the hypernetwork by the rule of the other sizes (d_h = d/2,
    heads of 64, r_h 4, d' = d) and head widths the fused kernel takes (powers of two)."""
    from scale_hyper.models import ModelConfig, parameter_report

    runs = {m: load_config([f"{m}-{size}"]) for m in ("hyperbert", "bert", "hypermixer")}
    recipes = [{k: getattr(getattr(r, g), k) for g, k in RECIPE} for r in runs.values()]
    assert all(r == recipes[0] for r in recipes)
    large = load_config(["hyperbert-large"]).train
    t = runs["hyperbert"].train
    assert t.lr < large.lr and t.weight_decay * t.lr == pytest.approx(1e-5)
    assert (t.global_batch_size, t.max_steps) == (large.global_batch_size, large.max_steps)
    for m in runs.values():
        assert (m.model.hidden_size, m.model.num_layers, m.model.num_heads, m.model.ffn_size) == (
            d,
            layers,
            heads,
            4 * d,
        )
        assert m.model.hidden_size // m.model.num_heads == 64
    for other in ("base", "large", "xl", "3b"):
        mc: ModelConfig = load_config([f"hyperbert-{other}"]).model
        assert (mc.hyper_width, mc.hyper_heads, mc.hyper_ffn_ratio, mc.mixer_width) == (
            mc.hidden_size // 2,
            mc.hidden_size // 128,
            4,
            mc.hidden_size,
        )
    bert = parameter_report(runs["bert"].model)["total_params"]
    assert (1.2e9 < bert < 1.35e9) if size == "xl" else (2.8e9 < bert < 3.1e9)
    assert parameter_report(runs["hyperbert"].model)["deltas"]["mixing"]["pct"] < -90
