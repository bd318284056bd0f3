"""scale_hyper/runs/ds_files.py against every checkpoint layout DeepSpeed 0.19.8 writes: one 2-rank
launch (tests/ds_files_worker.py) trains and saves a tiny scale-hyper model in fp32, bf16 and fp16 at
ZeRO 0-3 (and with the optimizer wrappers DeepSpeed picks besides: BF16_Optimizer, the fused
FP16_Optimizer), with the trainer's own DeepSpeed config; universal checkpoints are converted from
three of them here. Each must be recognised, and yield exactly the live engine's fp32 masters."""

from __future__ import annotations

import sys

import pytest
import torch
from launch import REPO, run_ranks

from scale_hyper.models.params import weight_decay_groups
from scale_hyper.runs import ds_files

pytestmark = pytest.mark.slow

# name → (kind, ZeRO stage, precision, ranks); names as in tests/ds_files_worker.py
EXPECTED = {
    "z0_fp32": ("module", 0, "fp32", 1), "z0_bf16": ("fp32_groups", 0, "bf16", 1),
    "z0_fp16": ("fp32_groups", 0, "fp16", 1), "z0_bf16_fused": ("fp32_groups", 0, "bf16", 1),
    "z0_fp16_fused": ("fp32_groups", 0, "fp16", 1),
    "z1_fp32": ("zero", 1, "fp32", 2), "z1_bf16": ("zero", 1, "bf16", 2), "z1_fp16": ("zero", 1, "fp16", 2),
    "z1_bf16_optimizer": ("bf16_optimizer", 1, "bf16", 2),
    "z2_fp32": ("zero", 2, "fp32", 2), "z2_bf16": ("zero", 2, "bf16", 2), "z2_fp16": ("zero", 2, "fp16", 2),
    "z3_fp32": ("zero", 3, "fp32", 2), "z3_bf16": ("zero", 3, "bf16", 2), "z3_fp16": ("zero", 3, "fp16", 2),
}  # fmt: skip
FILES = {  # what DeepSpeed names the files, per kind of engine (R = 0, 1)
    "z0_bf16": ["mp_rank_00_model_states.pt"],
    "z1_bf16": ["bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
                "mp_rank_00_model_states.pt"],
    "z1_fp16": ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                "zero_pp_rank_1_mp_rank_00_optim_states.pt"],
    "z3_bf16": ["bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
                "zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt"],
}  # fmt: skip
LOW = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def groups_of(shapes):
    return weight_decay_groups(shapes, decay_embeddings=False)  # the config default the worker trains with


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = tmp_path_factory.mktemp("ds_files")
    procs = run_ranks([sys.executable, str(REPO / "tests" / "ds_files_worker.py"), str(out)], world=2, cwd=REPO)
    for p in procs:
        assert p.returncode == 0, p.stdout[-4000:]
    return out


def truth(saved, name):
    return torch.load(saved / name / "masters.pt", weights_only=False)


def assert_masters(state, masters):
    assert set(state) == set(masters)
    for key, master in masters.items():
        assert state[key].dtype == torch.float32 and torch.equal(state[key], master), key


@pytest.mark.parametrize("name", list(EXPECTED))
def test_every_layout_is_recognised_and_yields_the_fp32_masters(saved, name):
    ckpt = saved / name / "t"
    layout = ds_files.detect(ckpt)
    assert (layout.kind, layout.stage, layout.precision, layout.ranks) == EXPECTED[name], layout
    if name in FILES:
        assert sorted(p.name for p in ckpt.iterdir()) == FILES[name]
    masters = truth(saved, name)["masters"]
    # The masters carry more than the module's working precision (3 real updates), so a reader that
    # took the bf16/fp16 module weights, or a wrong master, would fail the comparison below.
    low = LOW[EXPECTED[name][2]]
    if low != torch.float32:
        assert all(not torch.equal(m, m.to(low).float()) for m in masters.values())
    assert_masters(ds_files.fp32_state_dict(ckpt, groups_of), masters)


def test_the_optimizer_wrappers_are_the_ones_named(saved):
    assert truth(saved, "z0_bf16")["optimizer"] == "FP16_UnfusedOptimizer"
    assert truth(saved, "z0_fp16_fused")["optimizer"] == "FP16_Optimizer"
    assert truth(saved, "z1_bf16_optimizer")["optimizer"] == "BF16_Optimizer"
    assert truth(saved, "z3_bf16")["optimizer"] == "DeepSpeedZeroOptimizer_Stage3"


@pytest.mark.parametrize("name", ["z1_bf16_optimizer", "z2_bf16", "z3_fp16"])
def test_universal_checkpoints_yield_the_same_masters(saved, name, monkeypatch):
    from deepspeed.checkpoint import ds_to_universal

    out = saved / name / "universal"
    argv = ["ds_to_universal", "--input_folder", str(saved / name / "t"), "--output_folder", str(out),
            "--inject_missing_state", "--num_extract_workers", "1", "--num_merge_workers", "1"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    ds_to_universal.main(ds_to_universal.parse_arguments())  # in this process: 1 worker means no pool
    layout = ds_files.detect(out)
    kind, stage, precision, _ = EXPECTED[name]
    assert (layout.kind, layout.stage, layout.precision) == ("universal", stage, precision)
    assert_masters(ds_files.fp32_state_dict(out, groups_of), truth(saved, name)["masters"])


def test_zero0_masters_under_other_groups_are_refused(saved):
    reversed_groups = lambda shapes: [g[::-1] for g in groups_of(shapes)]  # noqa: E731
    with pytest.raises(ds_files.LayoutError, match="does not round to its torch.bfloat16 weights"):
        ds_files.fp32_state_dict(saved / "z0_bf16" / "t", reversed_groups)
    one_group = lambda shapes: [[n for n, _ in shapes]]  # noqa: E731
    with pytest.raises(ds_files.LayoutError, match="train.decay_embeddings"):
        ds_files.fp32_state_dict(saved / "z0_fp16_fused" / "t", one_group)


def test_a_directory_without_model_states_names_what_it_holds(tmp_path):
    (tmp_path / "rank_0.pt").write_bytes(b"")
    with pytest.raises(ds_files.LayoutError, match="found: rank_0.pt — .* pass another checkpoint"):
        ds_files.detect(tmp_path)


class Payload:
    """Stands for any object a tampered checkpoint could carry: unpickling it would call its code."""

    def __reduce__(self):
        return (print, ("this ran while the checkpoint was read",))


def test_a_file_with_a_foreign_object_is_not_unpickled(saved, tmp_path, capsys):
    """export/eval/init_from read DeepSpeed's files weights_only (DeepSpeed's four classes allowed)."""
    ckpt = tmp_path / "tampered"
    ckpt.mkdir()
    for f in (saved / "z2_fp32" / "t").iterdir():
        (ckpt / f.name).write_bytes(f.read_bytes())
    states = ds_files._load(ckpt / ds_files.MODEL_STATES, mmap=False)  # not mapped: the file is rewritten
    torch.save({**states, "extra": Payload()}, ckpt / ds_files.MODEL_STATES)
    with pytest.raises(ds_files.LayoutError, match="outside the tensors and DeepSpeed classes .* not loaded"):
        ds_files.fp32_state_dict(ckpt, groups_of)
    assert "this ran" not in capsys.readouterr().out
