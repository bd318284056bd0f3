"""bf16 end to end on 2 CPU ranks (DeepSpeed's bf16 runs on CPU): what every GPU user's first run does,
since precision=auto picks bf16 on every GPU.

Four trainings feed every assertion:

* ZeRO-3, the full chain — A trains 6 steps (checkpoints at 3 and 6); B resumes A's step 3 into
  its own directory and must reproduce A's losses of steps 4 and 5 bit for bit; A's end-of-run export, ``scale-hyper
  export`` of the run directory, ``eval`` of checkpoint and export, ``checkpoint universal``, the
  export of the universal copy and DeepSpeed's own ``zero_to_fp32.py`` all give A's live fp32
  masters exactly (torch.equal), not their bf16 copies.
* ZeRO-2 — C starts from A with ``train.init_from`` (a ZeRO-3 bf16 checkpoint), trains and exports.
* ZeRO-1 — D trains and exports.
  ZeRO-1 and -2 write the same files (DeepSpeedZeroOptimizer: ``bf16_zero_pp_rank_R…optim_states.pt``
  beside a bf16 ``mp_rank_00_model_states.pt``), which the old reader took for the weights; both must
  export the masters. Every layout's reader is tested on its own in tests/test_ds_files.py.
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch
from launch import TINY_RUN, prepare_shards, scale_hyper, start_ranks
from safetensors.torch import load_file

from scale_hyper.runs import ds_files

pytestmark = pytest.mark.slow

COMMON = [
    *TINY_RUN,
    "train.warmup_ratio=0", "deepspeed.precision=bf16", "tracking.enabled=false",
]  # fmt: skip


def start(wd: Path, name: str, *extra: str) -> list:
    args = scale_hyper("train", *COMMON, f"data.output={wd}/shards", f"train.output_dir={wd}/{name}", *extra)
    return start_ranks(args, 2, wd, extra_env={"SCALE_HYPER_TEST_DUMP_MASTERS": str(wd / f"{name}-masters.pt")})


def finish(procs: list) -> str:
    outs = [p.communicate(timeout=900)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-6000:]
    return outs[0]


@pytest.fixture(scope="module")
def wd(tmp_path_factory):
    """Two trainings at a time (4 processes): what they wait for overlaps; A's step 3 is all B and C need."""
    wd = prepare_shards(tmp_path_factory.mktemp("bf16"), COMMON)
    a = start(wd, "A", "deepspeed.zero_stage=3", "train.max_steps=6", "train.save_every=3")
    d = start(wd, "D", "deepspeed.zero_stage=1", "train.max_steps=3")
    out = {"A": finish(a), "D": finish(d)}
    b = start(
        wd,
        "B",
        "deepspeed.zero_stage=3",
        "train.max_steps=6",
        "train.stop_after_steps=2",
        f"train.resume={wd}/A/checkpoints/step_3",
    )  # steps 4 and 5, then a checkpoint
    c = start(wd, "C", "deepspeed.zero_stage=2", "train.max_steps=3", f"train.init_from={wd}/A")
    out.update(B=finish(b), C=finish(c))
    (wd / "stdout.json").write_text(json.dumps(out))
    return wd


def stdout(wd: Path, name: str) -> str:
    return json.loads((wd / "stdout.json").read_text())[name]


def masters(wd: Path, name: str) -> dict:
    return torch.load(wd / f"{name}-masters.pt", weights_only=True)


def losses(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def assert_is_masters(weights: dict, live: dict) -> None:
    """Every tensor equals the live fp32 master, which holds more than bf16 (a bf16 copy would not)."""
    assert set(weights) == set(live)
    for key, master in live.items():
        assert weights[key].dtype == torch.float32 and torch.equal(weights[key], master), key
    assert all(not torch.equal(m, m.bfloat16().float()) for m in live.values())


def test_zero3_bf16_trains_resumes_bit_exact_and_exports_the_masters(wd):
    assert "training finished" in stdout(wd, "A") and "ZeRO-3, bf16" in stdout(wd, "A")
    assert "resumed from" in stdout(wd, "B") and "step_3" in stdout(wd, "B")
    step6 = wd / "A" / "checkpoints" / "step_6"
    names = {p.name for p in step6.iterdir()}
    assert "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt" in names and "mp_rank_00_model_states.pt" not in names
    layout = ds_files.detect(step6)
    assert (layout.kind, layout.stage, layout.precision, layout.ranks) == ("zero", 3, "bf16", 2)
    a, b = losses(wd / "A"), losses(wd / "B")
    assert sorted(a) == list(range(1, 7)) and sorted(b) == [4, 5]
    assert [a[s] for s in (4, 5)] == [b[s] for s in (4, 5)]  # bit-identical after a bf16 resume
    assert_is_masters(load_file(wd / "A" / "hf" / "model.safetensors"), masters(wd, "A"))


def test_export_cli_and_eval_read_the_bf16_checkpoint(wd, capsys):
    from scale_hyper.engine import export
    from scale_hyper.evaluation.mlm import evaluate

    assert export.main(str(wd / "A"), str(wd / "A-export")) == 0  # `scale-hyper export RUN OUT`, in this process
    assert "step_6 -> " in capsys.readouterr().out
    assert_is_masters(load_file(wd / "A-export" / "model.safetensors"), masters(wd, "A"))
    of_checkpoint = evaluate(str(wd / "A" / "checkpoints" / "step_6"), ["eval.batches=2"])["metrics"]
    of_export = evaluate(str(wd / "A" / "hf"), ["eval.batches=2"])["metrics"]
    assert of_checkpoint["val_loss"] == of_export["val_loss"] and of_checkpoint["val_masked_tokens"] > 0
    # The trainer's own final validation ran the bf16 model on the same first batches: close, not equal.
    trained = [json.loads(r) for r in (wd / "A" / "metrics.jsonl").read_text().splitlines()]
    assert abs([r["val_loss"] for r in trained if "val_loss" in r][-1] - of_checkpoint["val_loss"]) < 0.05


def test_universal_copy_and_zero_to_fp32_hold_the_same_masters(wd, monkeypatch):
    from scale_hyper.engine.checkpointer import to_universal
    from scale_hyper.engine.export import export_checkpoint

    step6 = wd / "A" / "checkpoints" / "step_6"
    universal = to_universal(step6)  # `scale-hyper checkpoint universal`: DeepSpeed's ds_to_universal
    assert universal.name == "step_6_universal" and ds_files.detect(universal).kind == "universal"
    export_checkpoint(universal, wd / "A-universal-export")
    assert_is_masters(load_file(wd / "A-universal-export" / "model.safetensors"), masters(wd, "A"))
    # DeepSpeed's own recovery script, copied into the save directory, run as `python zero_to_fp32.py …` would.
    script = step6.parent / "zero_to_fp32.py"
    monkeypatch.setattr(sys, "argv", [str(script), str(step6.parent), str(wd / "A-fp32"), "--tag", "step_6"])
    runpy.run_path(str(script), run_name="__main__")
    assert_is_masters(torch.load(wd / "A-fp32" / "pytorch_model.bin", weights_only=True), masters(wd, "A"))


def test_zero2_init_from_a_zero3_bf16_run_and_zero1_export_the_masters(wd):
    assert "initialised from" in stdout(wd, "C") and "ZeRO-2" in stdout(wd, "C")
    # C starts from A's weights: its first validation is A's last (both bf16 on the same batches).
    a_val = [
        json.loads(r)["val_loss"] for r in (wd / "A" / "metrics.jsonl").read_text().splitlines() if "val_loss" in r
    ]
    c_val = [
        json.loads(r)["val_loss"] for r in (wd / "C" / "metrics.jsonl").read_text().splitlines() if "val_loss" in r
    ]
    assert abs(c_val[0] - a_val[-1]) < 0.01 and abs(c_val[0] - a_val[0]) > 0.05
    for name, stage in (("C", 2), ("D", 1)):
        step3 = wd / name / "checkpoints" / "step_3"
        layout = ds_files.detect(step3)
        assert (layout.kind, layout.stage, layout.precision) == ("zero", stage, "bf16")
        live = masters(wd, name)
        assert_is_masters(load_file(wd / name / "hf" / "model.safetensors"), live)
        # What the old reader exported: the model-states file's module, the bf16 copies of the masters.
        module = torch.load(step3 / "mp_rank_00_model_states.pt", weights_only=False)["module"]
        assert all(module[k].dtype == torch.bfloat16 and torch.equal(module[k], m.bfloat16()) for k, m in live.items())
