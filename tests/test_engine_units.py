"""Fast engine units (no process group): batch arithmetic, DeepSpeed JSON merging, launcher env
mapping, crash-safe checkpoint selection, analytic FLOPs."""

import json
from pathlib import Path

import pytest
import torch

from scale_hyper import runs
from scale_hyper.config import ConfigError, load_config
from scale_hyper.engine import checkpointer, ds_config
from scale_hyper.engine.distributed import map_launcher_env
from scale_hyper.models.flops import train_flops_per_token

CPU = torch.device("cpu")


def test_batch_arithmetic_and_clear_error():
    run = load_config(["train.micro_batch_size=4", "train.global_batch_size=32"])
    assert ds_config.batch_arithmetic(run, 2) == (4, 4, 32)
    with pytest.raises(ConfigError, match=r"train.global_batch_size=28.*micro_batch_size=4.*world size 2"):
        ds_config.batch_arithmetic(load_config(["train.micro_batch_size=4", "train.global_batch_size=28"]), 2)


def test_generated_config_follows_run_config():
    run = load_config(
        ["deepspeed.zero_stage=3", "deepspeed.precision=bf16", "train.decay=cosine", "train.grad_clip=0.5"]
    )
    ds = ds_config.build(run, 1, CPU)
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"]
    assert ds["scheduler"]["type"] == "WarmupCosineLR" and ds["gradient_clipping"] == 0.5
    assert ds["optimizer"]["params"]["torch_adam"] is True


def test_preset_json_auto_values_come_from_our_config():
    run = load_config(
        [str(Path("ds_configs/zero3-offload.json")), "train.micro_batch_size=2", "train.global_batch_size=8"]
    )
    ds = ds_config.build(run, 2, CPU)
    assert ds["zero_optimization"]["stage"] == 3 and "offload_param" in ds["zero_optimization"]
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (2, 2)
    assert "torch_adam" not in ds["optimizer"]["params"]  # offloaded optimizer state needs DeepSpeedCPUAdam


def test_json_with_inconsistent_batches_is_rejected(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train_batch_size": 7, "zero_optimization": {"stage": 1}}))
    with pytest.raises(ConfigError, match="batch sizes disagree"):
        ds_config.build(load_config([str(bad)]), 1, CPU)


def test_srun_variables_become_torch_ranks():
    env = {"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "1234", "MASTER_ADDR": "n1"}
    map_launcher_env(env)
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"]) == ("3", "1", "4")
    assert env["MASTER_ADDR"] == "n1" and env["MASTER_PORT"] == str(29500 + 234)


def test_torchrun_variables_win_over_slurm():
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    map_launcher_env(env)
    assert env["RANK"] == "1" and env["WORLD_SIZE"] == "2"


def _fake_ckpt(root: Path, name: str, step: int, world: int, complete: bool = True, universal: bool = False):
    d = root / name
    d.mkdir(parents=True)
    if complete:
        (d / runs.MARKER).write_text(json.dumps({"step": step, "world_size": world, "universal": universal}))
    return d


def test_interrupted_save_is_never_resumed(tmp_path):
    root = tmp_path / "checkpoints"
    good = _fake_ckpt(root, "step_100", 100, 2)
    _fake_ckpt(root, "step_200", 200, 2, complete=False)  # crashed mid-save: no marker
    assert checkpointer.resolve_resume("auto", str(tmp_path), 2) == good


def test_universal_copy_is_chosen_only_for_another_world_size(tmp_path):
    root = tmp_path / "checkpoints"
    plain = _fake_ckpt(root, "step_4", 4, 2)
    uni = _fake_ckpt(root, "step_4_universal", 4, 2, universal=True)
    assert checkpointer.resolve_resume("auto", str(tmp_path), 2) == plain
    assert checkpointer.resolve_resume("auto", str(tmp_path), 1) == uni
    with pytest.raises(checkpointer.ResumeError, match="scale-hyper checkpoint universal"):
        checkpointer.check_world_size(plain, 1)
    assert checkpointer.resolve_resume("none", str(tmp_path), 2) is None


def test_reentrant_checkpointing_is_refused_with_reason():
    with pytest.raises(ConfigError, match="already been reduced.*non_reentrant"):
        load_config(["train.activation_checkpointing=reentrant"])


def test_every_path_into_a_run_directory_finds_its_newest_checkpoint(tmp_path):
    """The run dir, DeepSpeed's save dir (RUN/checkpoints, where `latest` lives) and a step dir."""
    root = tmp_path / "checkpoints"
    _fake_ckpt(root, "step_10", 10, 1)
    newest = _fake_ckpt(root, "step_30", 30, 1)
    _fake_ckpt(root, "step_40", 40, 1, complete=False)
    (root / "latest").write_text("step_30")
    for path in (tmp_path, root, newest):
        assert runs.find_checkpoint(path) == newest
    assert runs.RunDir(tmp_path).newest() == newest and runs.RunDir(tmp_path).step(30) == newest
    with pytest.raises(runs.NoCheckpointError, match="holds no finished checkpoint"):
        runs.find_checkpoint(tmp_path / "checkpoints" / "step_40")


def test_flops_scale_as_the_spec_says():
    bert = load_config(["bert-base"]).model
    hyper = load_config(["hyperbert-base"]).model
    # Attention is quadratic in N; the generated mixer is linear (only the narrow hypernetwork's attention grows).
    growth_bert = train_flops_per_token(bert, 8192) / train_flops_per_token(bert, 512)
    growth_hyper = train_flops_per_token(hyper, 8192) / train_flops_per_token(hyper, 512)
    assert growth_hyper < growth_bert
    assert train_flops_per_token(bert, 512) > 6 * 85e6  # at least 6 × the non-embedding parameters
