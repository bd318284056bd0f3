"""`scale-hyper plan`: the table, its JSON, bad input, and its model-state figures against the bytes
real DeepSpeed ranks hold under ZeRO-0/1/2/3 on 1 and 2 CPU ranks (tests/plan_worker.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from launch import REPO, run_ranks, scale_hyper

from scale_hyper.config import load_config
from scale_hyper.engine import planner
from scale_hyper.models.flops import train_flops_per_token


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(scale_hyper("plan", *args), cwd=REPO, capture_output=True, text=True, timeout=300)


def test_readme_plan_prints_its_table_and_json_has_the_same_figures():
    table = cli("hyperbert-base", "--gpus", "8", "--gpu", "h100-sxm")
    assert table.returncode == 0, table.stderr
    out = table.stdout
    assert "8 × NVIDIA H100 SXM5 80 GB" in out and "ZeRO-0   ZeRO-1   ZeRO-2   ZeRO-3" in out
    for row in ("weights", "gradients", "fp32 master weights", "Adam moments", "activations", "largest micro",
                "tokens/step", "days"):  # fmt: skip
        assert row in out, row
    assert "analytic" in out
    alias = cli("hyperbert-base", "--gpus", "8", "--gpu", "h100")
    assert alias.returncode == 0 and alias.stdout == out
    js = cli("hyperbert-base", "--gpus", "8", "--gpu", "h100", "--json")
    assert js.returncode == 0, js.stderr
    p = json.loads(js.stdout)
    b = p["batch"]
    assert b["micro"] * b["accumulation"] * p["gpus"] == b["global"]
    assert f"global {b['global']} = micro {b['micro']}" in out
    assert p["tokens_per_step"] == b["global"] * p["seq_len"]
    assert [s["stage"] for s in p["stages"]] == [0, 1, 2, 3]
    assert p["stages"][3]["model_state_bytes"] < p["stages"][0]["model_state_bytes"]
    # Days to the budget, from first principles: MosaicBERT's recipe in the preset (70 k steps of
    # 4096 × 128 tokens), the analytic training FLOPs per token (checked against torch's FlopCounterMode
    # in tests/test_engine_units.py), 8 × the H100 SXM's 989.4 dense bf16 TFLOP/s (datasheet) at the default
    # MFU of 40 %.
    run = load_config(["hyperbert-base"])
    assert p["token_budget"] == 70_000 * 4096 * 128 and p["mfu"] == 0.4 and p["gpu"]["bf16_tflops"] == 989.4
    assert p["flops_per_token"] == train_flops_per_token(run.model, 128, run.data.mask_prob)
    want_days = p["flops_per_token"] * 70_000 * 4096 * 128 / (8 * 989.4e12 * 0.4) / 86400
    assert p["days"] == pytest.approx(want_days, rel=1e-9) and f"{want_days:.2f} days" in out


def test_plan_imports_no_deepspeed():
    code = (
        "import sys; from scale_hyper.cli import main; rc = main(['plan', 'hyperbert-mini', '--gpus', '2', '--json']);"
        "assert rc == 0; assert 'deepspeed' not in sys.modules, 'deepspeed imported'"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize(
    "args, message",
    [
        (["hyperbert-base", "--gpus", "8", "--gpu", "h1000"], "unknown GPU --gpu 'h1000' — use one of h100-sxm"),
        (["hyperbert-large", "--gpus", "1", "--gpu-mem", "1"], "does not fit on 1 × 1 GiB GPU even with ZeRO-3"),
        (["hyperbert-base", "--gpus", "3"], "train.global_batch_size=4096 cannot be split evenly over 3 ranks — set"),
    ],
)
def test_bad_input_is_one_line_naming_the_fix(args, message):
    proc = cli(*args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("scale-hyper: error: ") and message in lines[0], proc.stderr


def test_largest_micro_is_the_edge_of_what_fits():
    run = load_config(["hyperbert-base"])
    gpu = planner.gpu_of("a100-40", None)
    p = planner.plan(run, 8, gpu, 0.4)
    usable = gpu.memory_gib * planner.GiB * planner.USABLE
    for s in p["stages"]:
        fixed = s["model_state_bytes"] + s["bucket_bytes"] + s["gathered_bytes"] - s["offloaded_bytes"]
        m = s["max_micro"]["plain"]
        assert fixed + planner.activation_bytes(run, m, False, "bf16") <= usable
        assert fixed + planner.activation_bytes(run, m + 1, False, "bf16") > usable
        assert s["max_micro"]["checkpointing"] > m


def saved_activation_bytes(run, micro: int) -> int:
    """Bytes of the tensors autograd keeps for backward over one forward of the MLM model (fp32, CPU),
    counted once per storage by torch.autograd.graph.saved_tensors_hooks; parameters excluded."""
    import torch

    from scale_hyper.models import build_model

    torch.manual_seed(0)
    model = build_model(run.model, task="mlm").train()
    model.set_activation_checkpointing(run.train.activation_checkpointing != "none")
    ids = torch.randint(5, run.model.vocab_size, (micro, run.data.seq_len))
    labels = torch.full_like(ids, -100)
    masked = round(run.data.mask_prob * ids.numel())
    labels.view(-1)[torch.randperm(ids.numel())[:masked]] = 7
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = max(saved.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=labels, sparse_logits=True)
    return sum(saved.values())


@pytest.mark.parametrize("mixer", ["bert", "hyperbert", "hypermixer", "hyla"])
def test_activation_bytes_bound_what_autograd_saves(mixer):
    """plan's activation figure (analytic, 16-bit counts × 2 in fp32) against the saved tensors of a real
    forward on CPU at mini width: never below them (the largest micro batch it names must fit) and
    not far above (within 1.5×). With checkpointing the peak is the blocks' inputs and the head, saved in
    forward, plus one block recomputed in backward (a plain run's per-block share): within 2×."""
    common = [f"{mixer}-mini", "data.seq_len=64", "model.dropout=0.1"]
    plain = load_config(common)
    ckpt = load_config([*common, "train.activation_checkpointing=non_reentrant"])
    measured = saved_activation_bytes(plain, 2)
    planned = planner.activation_bytes(plain, 2, False, "fp32")
    assert measured <= planned <= 1.5 * measured, (planned, measured)
    kept = saved_activation_bytes(ckpt, 2)
    peak = kept + (measured - kept) / plain.model.num_layers
    planned = planner.activation_bytes(ckpt, 2, True, "fp32")
    assert peak <= planned <= 2 * peak, (planned, peak)


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
def test_model_state_matches_what_deepspeed_ranks_hold(tmp_path, world):
    from plan_worker import OVERRIDES

    out = tmp_path / "held.json"
    procs = run_ranks([sys.executable, str(REPO / "tests" / "plan_worker.py"), str(out)], world=world, cwd=REPO)
    for p in procs:
        assert p.returncode == 0, p.stdout[-4000:]
    held = json.loads(out.read_text())
    for stage in range(4):
        run = load_config([*OVERRIDES, f"deepspeed.zero_stage={stage}"])
        layout = planner.parameter_layout(run)
        for rank in held["ranks"]:
            measured = rank[str(stage)]
            predicted = planner.model_state_bytes(layout, stage, world, "fp32", measured["accumulation"])
            assert predicted == {k: measured[k] for k in predicted}, (stage, predicted, measured)


def test_deepspeed_json_sets_the_configured_stage_and_a_bound_too_large_gets_a_fix():
    run = load_config(["hyperbert-base", str(REPO / "ds_configs" / "zero3.json")])
    assert planner.plan(run, 8, planner.gpu_of("h100", None), 0.4)["zero_stage"] == 3
    big = cli("hyperbert-large", "train.micro_batch_size=2048", "train.global_batch_size=16384", "--gpus", "8",
              "--gpu", "l40s")  # fmt: skip
    assert big.returncode == 0, big.stderr
    assert "does NOT fit" in big.stdout and "→ train.micro_batch_size=" in big.stdout
