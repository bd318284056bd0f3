"""One rank of the ZeRO-3 communication-volume measurement (launched twice by tests/test_bench.py, or
by hand: see docs/benchmarks.md, "ZeRO-3 communication").

For each geometry and each `stage3_max_reuse_distance` (0 and DeepSpeed's default) it trains a
fresh model with pure ZeRO-3 (`param_persistence_threshold=0`, so nothing is kept gathered by
size) twice: with the shared hypernetwork kept resident
(`residency.keep_resident`) and partitioned like every other weight. It counts the bytes DeepSpeed
all-gathers, reduce-scatters and all-reduces per step in steady state: step 0 is excluded, because
DeepSpeed records its parameter trace during the first step and releases everything then.
Rank 0 writes the results as JSON to the path given as the first argument.

usage: python tests/comm_worker.py OUT.json [tiny|mini ...] [reuse=0 reuse=-1]   (RANK/WORLD_SIZE/MASTER_* set per rank)
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch

from scale_hyper.bench.comm import CollectiveCounter
from scale_hyper.config import load_config
from scale_hyper.engine import ds_config
from scale_hyper.engine.distributed import init_distributed
from scale_hyper.engine.residency import keep_resident
from scale_hyper.launch.leave import leave_now
from scale_hyper.models import build_model

STEPS, MICRO, SEQ = 4, 4, 128
# hyperbert-tiny as is; "mini" = hyperbert-mini's encoder and hypernetwork with a 4,096-word vocabulary,
# so that the (equally gathered) embedding matrix does not swamp the figures on 2 CPU cores.
# stage3_max_reuse_distance: 0 = release every weight right after use and gather it again at its next
# use (what a model much larger than the reuse window sees); -1 = DeepSpeed's default (1e9).
REUSE = (0, -1)
GEOMETRIES = {
    "tiny": ["hyperbert-tiny"],
    "mini": ["hyperbert-mini", "model.vocab_size=4096"],
    "xl4": ["hyperbert-xl", "model.num_layers=4", "model.vocab_size=4096"],
}  # -xl's widths, 4 layers


def batch(step: int, rank: int, vocab: int):
    g = torch.Generator().manual_seed(1000 * step + rank)
    ids = torch.randint(5, vocab, (MICRO, SEQ), generator=g)
    labels = torch.full_like(ids, -100)
    pick = torch.rand(ids.shape, generator=g) < 0.15
    pick[:, 1] = True
    labels[pick] = ids[pick]
    return {"input_ids": ids.masked_fill(pick, 4), "attention_mask": torch.ones_like(ids), "labels": labels}


def run_variant(geometry: str, resident: bool, reuse: int, rank: int, world: int) -> dict:
    run = load_config(
        GEOMETRIES[geometry] + [
            "model.dropout=0.0", "deepspeed.precision=fp32", "deepspeed.zero_stage=3",
            f"train.micro_batch_size={MICRO}", "train.global_batch_size=0", f"train.max_steps={STEPS}",
            "train.warmup_ratio=0", "deepspeed.param_persistence_threshold=0",
        ]
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_model(run.model, task="mlm")
    hyper = model.shared_modules()[0]
    numel = {"all": sum(p.numel() for p in model.parameters()), "hyper": sum(p.numel() for p in hyper.parameters())}
    import deepspeed

    ds = ds_config.build(run, world, torch.device("cpu"))
    if reuse >= 0:  # -1: DeepSpeed's default (1e9 numel: a model this small is never released within a step)
        ds["zero_optimization"].update(stage3_max_reuse_distance=reuse, stage3_prefetch_bucket_size=reuse)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
    marked = keep_resident(engine, [hyper]) if resident else []
    per_step, times, losses = [], [], []
    with CollectiveCounter() as counter:
        for step in range(STEPS):
            counter.reset()
            start = time.perf_counter()
            loss = engine(**batch(step, rank, run.model.vocab_size), sparse_logits=True).loss
            engine.backward(loss)
            engine.step()
            times.append(time.perf_counter() - start)
            per_step.append(
                {"bytes": dict(counter.bytes), "calls": dict(counter.calls), "torch_direct": dict(counter.torch_direct)}
            )
            losses.append(loss.item())
    steady = per_step[1:]  # step 0 records the trace and is not representative

    def mean(kind: str, what: str = "bytes") -> float:
        return statistics.mean(s[what].get(kind, 0) for s in steady)

    kinds = sorted({k for s in steady for k in s["bytes"]})
    return {
        "geometry": geometry, "resident": resident, "max_reuse_distance": reuse, "marked": len(marked), "layers": run.model.num_layers,
        "params": numel["all"], "hyper_params": numel["hyper"], "param_bytes": 4 * numel["all"],
        "hyper_bytes": 4 * numel["hyper"], "steady_steps": len(steady),
        "bytes_per_step": {k: mean(k) for k in kinds}, "calls_per_step": {k: mean(k, "calls") for k in kinds},
        "torch_direct_per_step": {k: statistics.mean(s["torch_direct"].get(k, 0) for s in steady)
                                  for k in sorted({k for s in steady for k in s["torch_direct"]})},
        "step_s_median": statistics.median(times[1:]), "losses": losses,
        "first_step_bytes": per_step[0]["bytes"],
    }  # fmt: skip


def main(argv) -> None:
    args = [a for a in argv if not a.startswith("--")]  # the deepspeed launcher adds --local_rank=N
    reuses = tuple(int(a.split("=", 1)[1]) for a in args if a.startswith("reuse=")) or REUSE
    args = [a for a in args if not a.startswith("reuse=")]
    out_path, geometries = args[0], args[1:] or ["tiny", "mini"]
    info = init_distributed("cpu", timeout_minutes=5)
    results = [
        run_variant(g, resident, reuse, info.rank, info.world_size)
        for g in geometries for reuse in reuses for resident in (True, False)
    ]  # fmt: skip
    if info.rank == 0:
        with open(out_path, "w") as f:
            json.dump(
                {"world_size": info.world_size, "micro_batch": MICRO, "seq_len": SEQ, "results": results}, f, indent=1
            )
    torch.distributed.barrier()
    leave_now(0)  # several engines' gloo threads can abort the interpreter's teardown (seen in CI)


if __name__ == "__main__":
    main(sys.argv[1:])
