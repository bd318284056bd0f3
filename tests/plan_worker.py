"""One rank of the planner check (launched by tests/test_plan.py on 1 and 2 ranks): for ZeRO-0/1/2/3 it
trains a tiny hyperbert in fp32 with gradient accumulation 2 and sums the bytes this rank really holds,
from the live tensors: parameters (ZeRO-3: its partitions plus the persistent, gathered ones), gradients
(the largest over both micro-batches: ``.grad`` tensors plus DeepSpeed's gradient partitions), the fp32
master partition and the Adam moments. Results (per rank) go to the JSON file named on the command line."""

from __future__ import annotations

import json
import sys

import torch

from scale_hyper.config import load_config
from scale_hyper.engine import ds_config
from scale_hyper.engine.distributed import init_distributed
from scale_hyper.engine.residency import keep_resident
from scale_hyper.engine.setup import param_groups
from scale_hyper.launch.leave import leave_now
from scale_hyper.models import build_model

MICRO, SEQ, VOCAB = 2, 16, 509  # an odd vocabulary: ZeRO partitions need padding
OVERRIDES = [
    "model.vocab_size=509", "model.dropout=0.0", "model.num_layers=3", "deepspeed.precision=fp32",
    f"train.micro_batch_size={MICRO}", "train.max_steps=2", "deepspeed.param_persistence_threshold=2000",
]  # fmt: skip


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def batch(step: int, rank: int):
    g = torch.Generator().manual_seed(100 * step + rank)
    ids = torch.randint(5, VOCAB, (MICRO, SEQ), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, 1:4] = ids[:, 1:4]
    return {"input_ids": ids, "labels": labels}


def grad_bytes(model, opt, stage: int) -> int:
    held = nbytes(p.grad for p in model.parameters() if p.grad is not None)
    if stage == 3:
        return held + nbytes([opt.grad_partitions_flat_buffer])
    if stage in (1, 2):
        parts = [t for v in opt.averaged_gradients.values() for t in (v or [])]
        return held + nbytes(parts)
    return held


def measure(stage: int, rank: int, world: int) -> dict:
    run = load_config([*OVERRIDES, f"deepspeed.zero_stage={stage}", f"train.global_batch_size={2 * MICRO * world}"])
    torch.manual_seed(0)
    model = build_model(run.model, task="mlm")
    import deepspeed

    groups = param_groups(model, run.train.weight_decay, run.train.decay_embeddings)
    ds = ds_config.build(run, world, torch.device("cpu"))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=ds)
    keep_resident(engine, model.shared_modules())
    opt = engine.optimizer
    grads = 0
    for micro_step in range(2):  # accumulation 2: the second backward is the boundary
        loss = engine(**batch(micro_step, rank), sparse_logits=True).loss
        engine.backward(loss)
        grads = max(grads, grad_bytes(model, opt, stage))
        engine.step()
    params = list(model.parameters())
    if stage == 3:
        weights = nbytes(p.ds_tensor for p in params) + nbytes(p.data for p in params if p.ds_persist)
        master = nbytes(opt.fp32_partitioned_groups_flat)
    elif stage in (1, 2):
        weights = nbytes(opt.bit16_groups_flat)
        master = nbytes(opt.single_partition_of_fp32_groups)
    else:
        weights, master = nbytes(p.data for p in params), 0
    inner = getattr(opt, "optimizer", opt)
    adam = nbytes(v for s in inner.state.values() for k, v in s.items() if k in ("exp_avg", "exp_avg_sq"))
    return {"weights": weights, "gradients": grads, "master": master, "adam": adam,
            "accumulation": engine.gradient_accumulation_steps()}  # fmt: skip


def main(out_path: str) -> None:
    info = init_distributed("cpu", timeout_minutes=3)
    mine = {str(stage): measure(stage, info.rank, info.world_size) for stage in range(4)}
    every: list = [None] * info.world_size
    torch.distributed.all_gather_object(every, mine)
    if info.rank == 0:
        with open(out_path, "w") as f:
            json.dump({"world": info.world_size, "ranks": every, "overrides": OVERRIDES}, f)
    torch.distributed.barrier()
    leave_now(0)  # several engines' gloo threads can abort the interpreter's teardown (seen in CI)


if __name__ == "__main__":
    main(sys.argv[1])
