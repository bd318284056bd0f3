"""One rank of tests/test_ds_files.py (launched twice, RANK/WORLD_SIZE set): for every precision ×
ZeRO stage × optimizer wrapper DeepSpeed 0.19.8 can pick, train a tiny scale-hyper model three steps
with the trainer's own DeepSpeed config and parameter groups, save a real checkpoint, and write the
live engine's fp32 master weights beside it (masters.pt, by name) as the truth to compare with.

Usage: ds_files_worker.py OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from scale_hyper.config import load_config
from scale_hyper.engine import ds_config
from scale_hyper.engine.distributed import init_distributed
from scale_hyper.engine.setup import param_groups
from scale_hyper.launch.leave import leave_now
from scale_hyper.models import build_model

GEOMETRY = [
    "model.vocab_size=256",
    "model.num_layers=2",
    "model.dropout=0.0",
    "deepspeed.param_persistence_threshold=0",
]
BF16_OPTIMIZER = ["deepspeed.extra.data_types.grad_accum_dtype=fp32"]  # ZeRO-1 bf16 → BF16_Optimizer
# name → (ZeRO stage, precision, extra overrides, fused ZeRO-0 optimizer)
VARIANTS = {
    "z0_fp32": (0, "fp32", [], False), "z0_bf16": (0, "bf16", [], False), "z0_fp16": (0, "fp16", [], False),
    "z0_bf16_fused": (0, "bf16", [], True), "z0_fp16_fused": (0, "fp16", [], True),
    "z1_fp32": (1, "fp32", [], False), "z1_bf16": (1, "bf16", [], False), "z1_fp16": (1, "fp16", [], False),
    "z1_bf16_optimizer": (1, "bf16", BF16_OPTIMIZER, False),
    "z2_fp32": (2, "fp32", [], False), "z2_bf16": (2, "bf16", [], False), "z2_fp16": (2, "fp16", [], False),
    "z3_fp32": (3, "fp32", [], False), "z3_bf16": (3, "bf16", [], False), "z3_fp16": (3, "fp16", [], False),
}  # fmt: skip


def fused_adam_without_its_kernel():
    """ZeRO-0 bf16/fp16 with deepspeed.optimizer=fused_adam takes DeepSpeed's fused FP16_Optimizer, which
    stores one flat fp32 tensor per group. DeepSpeed picks that wrapper by ``isinstance(opt, FusedAdam)``;
    the FusedAdam kernel itself is a C++ JIT build (~4 min on these cores), so this subclass keeps the class
    and does the Adam update with torch. The checkpoint is still written by DeepSpeed's real FP16_Optimizer."""
    from deepspeed.ops.adam import FusedAdam

    class TorchStepFusedAdam(FusedAdam):
        def __init__(self, params, lr: float = 1e-2) -> None:
            torch.optim.Optimizer.__init__(self, params, {"lr": lr, "betas": (0.9, 0.999), "eps": 1e-8,
                                                          "weight_decay": 0.0})  # fmt: skip

        @torch.no_grad()
        def step(self, closure=None, **kwargs):
            for group in self.param_groups:
                params = [p for p in group["params"] if p.grad is not None]
                states = [self.state[p] for p in params]
                for p, s in zip(params, states, strict=True):
                    s.setdefault("exp_avg", torch.zeros_like(p)), s.setdefault("exp_avg_sq", torch.zeros_like(p))
                    s["step"] = s.get("step", 0) + 1
                    s["exp_avg"].lerp_(p.grad, 0.1)
                    s["exp_avg_sq"].mul_(0.999).addcmul_(p.grad, p.grad, value=0.001)
                    p.addcdiv_(s["exp_avg"], s["exp_avg_sq"].sqrt().add_(1e-8), value=-group["lr"])

    return TorchStepFusedAdam


def masters(engine, model) -> dict:
    """The live fp32 masters, by name, as DeepSpeed itself hands them out (collective under ZeRO-3)."""
    from deepspeed.utils import safe_get_full_fp32_param

    names = {id(p): n for n, p in model.named_parameters()}
    opt = engine.optimizer
    if hasattr(opt, "fp32_groups") or hasattr(opt, "fp32_groups_flat"):  # ZeRO-0 bf16/fp16
        from torch._utils import _unflatten_dense_tensors

        out = {}
        for i, group in enumerate(opt.fp16_groups):
            fp32 = opt.fp32_groups[i] if hasattr(opt, "fp32_groups") else None
            if fp32 is None:  # fused: how FP16_Optimizer itself copies the masters back to the module
                fp32 = _unflatten_dense_tensors(opt.fp32_groups_flat[i], group)
            out.update({names[id(p)]: m.detach().float().clone() for p, m in zip(group, fp32, strict=True)})
        return out
    out = {}
    for name, p in model.named_parameters():
        full = safe_get_full_fp32_param(p)
        out[name] = (p.detach() if full is None else full).float().clone()  # None: ZeRO-0 fp32, p is the master
    return out


def batch(step: int, rank: int) -> dict:
    g = torch.Generator().manual_seed(100 * step + rank)
    ids = torch.randint(5, 256, (4, 32), generator=g)
    labels = torch.where(torch.rand(ids.shape, generator=g) < 0.2, ids, -100)
    labels[:, 1] = ids[:, 1]
    return {"input_ids": ids.masked_fill(labels != -100, 4), "labels": labels}


def run_variant(name: str, out: Path, world: int, rank: int) -> None:
    import deepspeed

    stage, precision, extra, fused = VARIANTS[name]
    run = load_config([*GEOMETRY, f"deepspeed.zero_stage={stage}", f"deepspeed.precision={precision}",
                       "train.micro_batch_size=4", "train.global_batch_size=0", "train.lr=1e-2", "train.warmup_ratio=0", *extra])  # fmt: skip
    torch.manual_seed(0)
    model = build_model(run.model, task="mlm")
    ds = ds_config.build(run, world, torch.device("cpu"))
    groups = param_groups(model, run.train.weight_decay, run.train.decay_embeddings)
    optimizer = None
    if fused:
        ds.pop("optimizer")
        optimizer = fused_adam_without_its_kernel()(groups)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, optimizer=optimizer, config=ds)
    for step in range(3):  # the schedule warms up from lr 0: the third step is the first with a full update
        engine.backward(engine(**batch(step, rank), sparse_logits=True).loss)
        engine.step()
    engine.save_checkpoint(str(out / name), tag="t")
    truth = masters(engine, model)
    if rank == 0:
        torch.save(
            {"masters": truth, "optimizer": type(engine.optimizer).__name__, "skipped": engine.skipped_steps},
            out / name / "masters.pt",
        )


def main(out_dir: str) -> None:
    info = init_distributed("cpu", timeout_minutes=5)
    only = sys.argv[2].split(",") if len(sys.argv) > 2 else list(VARIANTS)
    for name in only:
        run_variant(name, Path(out_dir), info.world_size, info.rank)
    torch.distributed.barrier()
    leave_now(0)  # several engines' gloo threads can abort the interpreter's teardown (seen in CI)


if __name__ == "__main__":
    main(sys.argv[1])
