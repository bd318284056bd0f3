"""The config system: presets, overrides, precise errors, and the stable key names."""

import subprocess
import sys

import pytest

from scale_hyper.config import ConfigError, available_presets, flatten, load_config, to_yaml
from scale_hyper.config.loading import split_args

STABLE_KEYS = [
    "data.source", "data.output", "data.seq_len", "data.vocab_size", "train.max_steps",
    "train.micro_batch_size", "train.global_batch_size", "train.lr", "train.output_dir", "train.seed",
    "deepspeed.zero_stage", "deepspeed.precision", "tracking.uri", "tracking.experiment", "model.mixer",
]  # fmt: skip


def test_stable_keys_exist():
    flat = flatten(load_config())
    missing = [k for k in STABLE_KEYS if k not in flat]
    assert not missing


def test_every_mixer_has_every_size():
    presets = set(available_presets())
    for mixer in ("hyperbert", "bert", "hypermixer", "hyla"):
        for size in ("tiny", "mini", "base", "large"):
            assert f"{mixer}-{size}" in presets


def test_preset_then_file_then_override_precedence(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("model:\n  num_layers: 6\ntrain:\n  lr: 3.0e-4\n")
    run = load_config(["hyperbert-mini", str(f), "train.lr=1e-4"])
    assert run.model.hidden_size == 256  # from the preset
    assert run.model.num_layers == 6  # file beats preset
    assert run.train.lr == pytest.approx(1e-4)  # override beats file
    assert isinstance(run.train.lr, float)


def test_model_vocab_follows_data_vocab():
    assert load_config(["data.vocab_size=1000"]).model.vocab_size == 1000
    assert load_config(["hyperbert-base"]).model.vocab_size == 30522


def test_unknown_key_names_key_and_suggests():
    with pytest.raises(ConfigError, match=r"unknown config key 'model.layerz'.*Did you mean 'model.num_layers'"):
        load_config(["model.layerz=3"])
    with pytest.raises(ConfigError, match=r"'trian.lr'.*Did you mean 'train.lr'"):
        load_config(["trian.lr=3"])


def test_unknown_key_in_yaml_names_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  max_stepz: 3\n")
    with pytest.raises(ConfigError, match=r"train.max_stepz.*bad.yaml.*max_steps"):
        load_config([str(f)])


def test_bad_type_names_key():
    with pytest.raises(ConfigError, match=r"bad value for config key 'train.lr'.*abc"):
        load_config(["train.lr=abc"])
    with pytest.raises(ConfigError, match=r"model.num_layers"):
        load_config(["model.num_layers=2.5"])


def test_bad_choice_names_options():
    with pytest.raises(ConfigError, match=r"model.hyper_decoder='foo' is not one of bidirectional, causal, cross"):
        load_config(["model.hyper_decoder=foo"])


def test_unknown_preset_suggests():
    with pytest.raises(ConfigError, match="Did you mean hyperbert-mini"):
        load_config(["hyperbrt-mini"])


def test_free_form_groups_accept_any_subkey():
    run = load_config(["deepspeed.extra.wall_clock_breakdown=true", "tracking.tags.team=nlp"])
    assert run.deepspeed.extra["wall_clock_breakdown"] is True
    assert run.tracking.tags["team"] == "nlp"


def test_yaml_roundtrip():
    run = load_config(["bert-base"])
    text = to_yaml(run)
    assert "mixer: bert" in text and "hidden_size: 768" in text


def test_local_rank_is_dropped():
    assert split_args(["a=1", "--local_rank=3", "--local-rank", "2", "b=2"]) == ["a=1", "b=2"]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "scale_hyper", *args], capture_output=True, text=True)


def test_cli_config_accepts_local_rank_and_reports_errors():
    ok = _cli("config", "hyperbert-mini", "--local_rank=1", "train.max_steps=7")
    assert ok.returncode == 0, ok.stderr
    assert "max_steps: 7" in ok.stdout and "hidden_size: 256" in ok.stdout
    bad = _cli("config", "model.layerz=3")
    assert bad.returncode == 2
    assert "model.layerz" in bad.stderr and "model.num_layers" in bad.stderr
