"""Fast engine units (no process group): batch arithmetic, DeepSpeed JSON merging, launcher env
mapping, crash-safe checkpoint selection, analytic FLOPs."""

import json
from pathlib import Path

import pytest
import torch
from tiny_models import counted_flops

from scale_hyper import runs
from scale_hyper.config import ConfigError, load_config
from scale_hyper.engine import ds_config, resume
from scale_hyper.engine.distributed import map_launcher_env
from scale_hyper.models.flops import train_flops_per_token

CPU = torch.device("cpu")


def test_batch_arithmetic_and_clear_error():
    run = load_config(["train.micro_batch_size=4", "train.global_batch_size=32"])
    assert ds_config.batch_arithmetic(run, 2) == (4, 4, 32)
    with pytest.raises(
        ConfigError, match=r"train.global_batch_size=30 cannot be split evenly over 4 ranks — .*28 or 32"
    ):
        ds_config.batch_arithmetic(load_config(["train.micro_batch_size=4", "train.global_batch_size=30"]), 4)


@pytest.mark.parametrize(
    "global_, bound, world, micro, accum",
    [
        (32, 32, 1, 32, 1),  # the main job
        (32, 32, 2, 16, 1),  # the README's torchrun line: micro shrinks, the global batch stays
        (32, 32, 8, 4, 1),
        (4096, 32, 8, 32, 16),  # MosaicBERT-base on one 8-GPU node
        (4096, 48, 8, 32, 16),  # the bound need not divide: the largest divisor ≤ it
        (4096, 32, 256, 16, 1),  # world so large that micro < bound
        (30, 4, 3, 2, 5),  # 10 per rank: 2 × 5 (5 > 4)
        (28, 8, 2, 7, 2),  # not a multiple of the bound: micro 7
    ],
)
def test_largest_micro_under_the_bound_keeps_the_global_batch(global_, bound, world, micro, accum):
    run = load_config([f"train.micro_batch_size={bound}", f"train.global_batch_size={global_}"])
    assert ds_config.batch_arithmetic(run, world) == (micro, accum, global_)
    assert micro <= bound and micro * accum * world == global_
    ds = ds_config.build(run, world, CPU)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (
        micro, accum, global_,
    )  # fmt: skip


def test_global_zero_means_bound_times_world():
    run = load_config(["train.micro_batch_size=8", "train.global_batch_size=0"])
    assert ds_config.batch_arithmetic(run, 3) == (8, 1, 24)
    assert "micro 8 × accumulation 1 × world 3" in ds_config.describe_batch(run, 3)
    assert "(bound train.micro_batch_size=32)" in ds_config.describe_batch(load_config([]), 2)


@pytest.mark.parametrize("ratio", [0.0, 0.02, 0.5])
def test_linear_decay_ends_at_min_lr_ratio(ratio):
    from deepspeed.runtime.lr_schedules import WarmupDecayLR

    run = load_config(
        ["train.max_steps=1000", "train.warmup_ratio=0.06", f"train.min_lr_ratio={ratio}", "train.lr=1e-3"]
    )
    params = ds_config.build(run, 1, CPU)["scheduler"]["params"]
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = WarmupDecayLR(opt, **params)

    def lr_at(step):
        sched.last_batch_iteration = step
        return sched.get_lr()[0]

    assert lr_at(60) == pytest.approx(1e-3)  # end of warm-up: 6 % of 1000 steps
    assert lr_at(500) == pytest.approx(1e-3 * (1 - (1 - ratio) * 440 / 940))
    assert lr_at(1000) == pytest.approx(ratio * 1e-3, abs=1e-12)  # at max_steps


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
    assert resume.resolve_resume("auto", str(tmp_path), 2) == good


def test_universal_copy_is_chosen_only_for_another_world_size(tmp_path):
    root = tmp_path / "checkpoints"
    plain = _fake_ckpt(root, "step_4", 4, 2)
    uni = _fake_ckpt(root, "step_4_universal", 4, 2, universal=True)
    assert resume.resolve_resume("auto", str(tmp_path), 2) == plain
    assert resume.resolve_resume("auto", str(tmp_path), 1) == uni
    with pytest.raises(resume.ResumeError, match="scale-hyper checkpoint universal"):
        resume.check_world_size(plain, 1)
    assert resume.resolve_resume("none", str(tmp_path), 2) is None


@pytest.mark.parametrize(
    "saved, now, world_now, message",
    [
        (["train.global_batch_size=64"], ["train.global_batch_size=64", "train.micro_batch_size=8"], 4, None),
        (["train.global_batch_size=0", "train.micro_batch_size=16"], ["train.global_batch_size=32"], 1, None),
        (["train.global_batch_size=64"], ["train.global_batch_size=128"], 2, "set train.global_batch_size=64 to"),
        # global 0 = bound × world: 16 × 2 saved; 32 × 2 now (the default bound) is another recipe
        (
            ["train.global_batch_size=0", "train.micro_batch_size=16"],
            ["train.global_batch_size=0"],
            2,
            "with train.global_batch_size=32 sequences per step, this run has 64 — set train.global_batch_size=32",
        ),
        (["data.seq_len=64"], ["data.seq_len=128"], 2, "set data.seq_len=64 to continue it"),
    ],
)
def test_resume_recipe_must_match_the_checkpoint(tmp_path, saved, now, world_now, message):
    """Saved by 2 ranks; micro batch and world size may change, the global batch and seq_len may not."""
    from scale_hyper.config import to_yaml

    ckpt = _fake_ckpt(tmp_path, "step_4", 4, 2)
    state = json.loads((ckpt / runs.MARKER).read_text())
    state["config_yaml"] = to_yaml(load_config(saved))
    (ckpt / runs.MARKER).write_text(json.dumps(state))
    run = load_config(now)
    global_now = ds_config.batch_arithmetic(run, world_now)[2]
    if message is None:
        resume.check_recipe(ckpt, run, global_now)
        return
    with pytest.raises(resume.ResumeError, match=message):
        resume.check_recipe(ckpt, run, global_now)


def test_a_checkpoint_saved_by_a_newer_version_is_read_without_the_keys_this_one_does_not_know(tmp_path, capsys):
    """Unknown keys are left out with one warning (once per process); an unknown model key, which may
    change what the weights mean, and a value of the wrong type are refused in one line naming the key."""
    from scale_hyper.config import to_yaml

    def saved_with(extra: str, version: str = "9.0.0") -> Path:
        ckpt = _fake_ckpt(tmp_path / extra.split(":")[0], "step_4", 4, 1)
        state = json.loads((ckpt / runs.MARKER).read_text())
        state.update(config_yaml=to_yaml(load_config(["hyperbert-mini"])) + extra, scale_hyper_version=version)
        (ckpt / runs.MARKER).write_text(json.dumps(state))
        return ckpt

    ckpt = saved_with("future:\n  knob: 1\n")
    text = (ckpt / runs.MARKER).read_text().replace("train:\\n", "train:\\n  new_option: 3\\n", 1)
    (ckpt / runs.MARKER).write_text(text)
    run = runs.run_config_of(ckpt)
    assert run.model == load_config(["hyperbert-mini"]).model
    runs.run_config_of(ckpt)  # resolved again: no second warning
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"scale-hyper: warning: checkpoint {ckpt} was saved by scale-hyper 9.0.0: ignoring train.new_option, "
        "future.knob, which scale-hyper 0.1.0 does not know"
    ], err
    with pytest.raises(ConfigError, match=r"saved by scale-hyper 9\.0\.0 with model\.rotary, which scale-hyper "
                       r"0\.1\.0 does not know — read it with the scale-hyper version that wrote it"):  # fmt: skip
        runs.run_config_of(saved_with("model:\n  rotary: true\n"))
    with pytest.raises(ConfigError, match=r"bad value for config key 'train.max_steps' \(from checkpoint .*step_4\)"):
        runs.run_config_of(saved_with("train:\n  max_steps: many\n"))


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


@pytest.mark.parametrize("preset", ["bert-tiny", "hyperbert-tiny", "hypermixer-tiny", "hyla-tiny"])
def test_flops_per_token_match_torchs_flop_counter(preset):
    """The analytic count behind MFU, `plan`'s days and results.md's "equal FLOPs" column, against
    torch's FlopCounterMode on a tiny forward + backward (tests/tiny_models.py::counted_flops)."""
    mc = load_config([preset, "model.dropout=0.0"]).model
    batch, seq, masked = 2, 32, 8
    forward, both = counted_flops(mc, batch, seq, masked)
    want = train_flops_per_token(mc, seq, mask_prob=masked / (batch * seq)) * batch * seq
    assert forward == want / 3  # forward: exactly the formula
    assert both == want  # backward = 2 × forward for every matmul


def test_every_multi_rank_worker_script_leaves_without_the_interpreters_teardown():
    """A script the tests launch on several ranks ends with a barrier and ``leave_now``: gloo's and
    DeepSpeed's threads abort a rank at teardown now and then (exit -6, "terminate called without an
    active exception"; tests/ds_files_worker.py failed a CI run so)."""
    workers = sorted(Path(__file__).parent.glob("*_worker.py"))
    assert len(workers) >= 6
    for worker in workers:
        text = worker.read_text()
        if "init_distributed(" in text:
            assert "leave_now(0)" in text and "barrier()" in text, f"{worker.name} leaves through the teardown"
