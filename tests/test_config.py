"""The config system: presets, overrides, precise errors, the stable key names, and the schema's
descriptions, choices and ranges (one validation pass at load, `--explain`, docs/config.md)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from scale_hyper.cli import main as cli_main
from scale_hyper.config import (
    ConfigError,
    RunConfig,
    available_presets,
    flatten,
    load_config,
    schema_fields,
    to_yaml,
)
from scale_hyper.config.docs import COMMAND, render
from scale_hyper.config.loading import preset_text, split_args
from scale_hyper.config.schema import GLUE_TASKS

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


# --- one validation pass at load: descriptions, choices and ranges declared in the schema ---

REPO = Path(__file__).resolve().parent.parent
LEAVES = [(key, f) for key, f in schema_fields(RunConfig) if "." in key]


def _override(key: str, f, value) -> str:
    return f"{key}=[{value}]" if str(f.type).startswith("List") else f"{key}={value}"


def _invalid_values():
    """Every choice-valued and range-limited key with a value just outside what it allows, from the metadata."""
    for key, f in LEAVES:
        meta = f.metadata
        if "choices" in meta:
            good = str(meta["choices"][0])
            bad = good[:-1]  # a near miss: "cosine" -> "cosin"
            assert bad not in map(str, meta["choices"])
            yield pytest.param(key, _override(key, f, bad), good, id=f"{key}={bad}")
        if "range" in meta:
            r, step = meta["range"], (1 if "int" in str(f.type) else 0.5)
            if r.lo is not None:
                bad = r.lo if r.lo_open else r.lo - step
                yield pytest.param(key, _override(key, f, bad), None, id=f"{key}={bad}")
            if r.hi is not None:
                bad = r.hi if r.hi_open else r.hi + step
                yield pytest.param(key, _override(key, f, bad), None, id=f"{key}={bad}")


INVALID = list(_invalid_values())


def _config_cli(capsys, *args) -> tuple[int, str, str]:
    rc = cli_main(["config", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_the_invalid_value_cases_cover_every_group():
    keys = {p.values[0] for p in INVALID}
    assert {k.split(".")[0] for k in keys} >= {"model", "data", "train", "deepspeed", "eval"}
    assert {"train.decay", "train.lr", "deepspeed.zero_stage", "data.mask_prob", "model.mixer", "train.resume"} <= keys


@pytest.mark.parametrize("key, override, suggestion", INVALID)
def test_config_rejects_every_invalid_choice_and_range(capsys, tmp_path, monkeypatch, key, override, suggestion):
    monkeypatch.chdir(tmp_path)  # train.resume also accepts an existing path
    rc, out, err = _config_cli(capsys, override)
    assert rc == 2 and not out
    assert len(err.splitlines()) == 1 and err.startswith("scale-hyper: error: ") and " — " in err, err
    assert key in err
    if suggestion is None:
        assert "must be" in err
    else:
        assert f"Did you mean '{suggestion}'?" in err and "is not one of" in err


def test_cosin_example_is_one_line_with_suggestion_and_no_traceback():
    bad = _cli("config", "hyperbert-mini", "train.decay=cosin")
    assert bad.returncode == 2 and bad.stdout == ""
    assert (
        bad.stderr == "scale-hyper: error: train.decay='cosin' is not one of linear, cosine — Did you mean 'cosine'?\n"
    )


def test_every_field_has_a_one_line_description():
    for key, f in schema_fields(RunConfig):
        text = f.metadata.get("help", "")
        assert text.strip() and "\n" not in text, key


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["train.activation_checkpointing=reentrant"],
            r"reentrant is not supported.*already been reduced.*non_reentrant",
        ),
        (["train.max_steps=0"], r"train.max_steps=0 is out of range: it must be ≥ 1"),
        (["data.seq_len=1024"], r"data.seq_len=1024 is longer than model.max_position=512 — "),
        (["deepspeed.offload_param=true"], r"offload_param=true needs deepspeed.zero_stage=3"),
        (["train.adam_betas=[0.9]"], r"adam_betas=\[0.9\] is not two numbers"),
        (
            ["data.vocab_size=4294967297"],
            r"data.vocab_size=4294967297 is out of range: it must be in \[16, 4294967296\]",
        ),
        (["model.hidden_size=60", "model.num_heads=8"], r"hidden_size=60 is not divisible by model.num_heads=8"),
    ],
)
def test_rules_across_keys_and_groups(args, message):
    with pytest.raises(ConfigError, match=message):
        load_config(args)


def test_explain_prints_type_default_allowed_and_description(capsys):
    rc, out, _ = _config_cli(capsys, "--explain", "train.decay")
    assert rc == 0
    assert out.splitlines()[0] == "train.decay"
    assert "str" in out and "linear" in out and "one of linear, cosine" in out and "LR decay" in out
    rc, out, _ = _config_cli(capsys, "--explain", "train.lr")
    assert rc == 0 and "> 0" in out and "0.002" in out
    rc, out, _ = _config_cli(capsys, "--explain", "model.hidden_size")
    assert rc == 0 and "default:     64" in out  # what runs without a preset, not ModelConfig()'s 256
    rc, out, _ = _config_cli(capsys, "--explain", "model.vocab_size")
    assert "${data.vocab_size} (presets/defaults.yaml)" in out


def test_explain_unknown_key_suggests(capsys):
    rc, out, err = _config_cli(capsys, "--explain", "train.dcay")
    assert rc == 2 and not out
    assert "unknown config key 'train.dcay'" in err and "Did you mean 'train.decay'?" in err


def test_docs_config_md_is_generated_from_the_schema():
    doc = REPO / "docs" / "config.md"
    assert doc.is_file() and doc.read_text(encoding="utf-8") == render(), f"docs/config.md is stale: run `{COMMAND}`"
    for group in ("model", "data", "train", "deepspeed", "tracking", "eval"):
        assert f"## `{group}`" in doc.read_text(encoding="utf-8")


def test_schema_defaults_are_the_main_job():
    assert load_config().model == RunConfig().model  # the embedded job runs the schema's model defaults
    leaves = OmegaConf.to_container(OmegaConf.create(preset_text("defaults")), resolve=False)
    values = [v for group in leaves.values() for v in group.values()]
    assert all("${" in str(v) for v in values), "defaults.yaml should hold only interpolations"


def test_glue_task_choices_match_the_glue_module():
    from scale_hyper.evaluation.glue import TASKS

    assert tuple(TASKS) == GLUE_TASKS


def test_config_layer_is_light_and_model_file_is_stdlib_only():
    code = (
        "import sys, scale_hyper.config, scale_hyper.config.docs; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'deepspeed') "
        "or m.startswith('scale_hyper.models')]; print(bad); sys.exit(bool(bad))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    tree = ast.parse((REPO / "scale_hyper" / "config" / "model.py").read_text(encoding="utf-8"))
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}, imported
