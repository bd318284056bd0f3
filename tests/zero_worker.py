"""One rank of the ZeRO tests (launched twice by tests/test_zero.py with RANK/WORLD_SIZE set).

For each engine variant it trains a tiny model on deterministic synthetic MLM batches and records:
per-step losses, how often the hypernetwork's and the blocks' weights were all-gathered, whether
every hypernetwork weight was available during each layer's forward and backward, and whether the
encoder blocks were really sharded; and the bytes DeepSpeed all-gathers and reduce-scatters per step
(`scale_hyper/bench/comm.py::CollectiveCounter`) with this rank's Adam state, for the resident vs
partitioned comparison. ZeRO-3 runs with strict windows (`stage3_max_reuse_distance=0`, no prefetch:
every weight is released after use and fetched again, what a model much larger than DeepSpeed's
windows sees; docs/benchmarks.md, "ZeRO-3 communication"). Counts, bytes and availability are taken
after the first step (see below). Results go to the JSON file named on the command line (rank 0).
"""

from __future__ import annotations

import json
import statistics
import sys

import torch

from scale_hyper.bench.comm import CollectiveCounter
from scale_hyper.config import load_config
from scale_hyper.engine import ds_config
from scale_hyper.engine.distributed import init_distributed
from scale_hyper.engine.residency import is_available, keep_resident
from scale_hyper.launch.leave import leave_now
from scale_hyper.models import build_model

STEPS, VOCAB, SEQ, MICRO = 6, 512, 32, 4
SHARED_BERT = ("model.mixer=bert", "model.share_mixers=2")  # 3 layers, 2 attention blocks shared across them
VARIANTS = [
    ("zero0", 0, True, ()), ("zero1", 1, True, ()), ("zero2", 2, True, ()), ("zero3", 3, True, ()),
    ("zero3_partitioned", 3, False, ()), ("shared_bert_zero0", 0, True, SHARED_BERT),
    ("shared_bert_zero3", 3, True, SHARED_BERT),
]  # fmt: skip


def batch(step: int, rank: int):
    g = torch.Generator().manual_seed(1000 * step + rank)
    ids = torch.randint(5, VOCAB, (MICRO, SEQ), generator=g)
    mask = torch.ones_like(ids)
    mask[:, SEQ - 3 - step % 4 :] = 0  # some padding, varying by step
    labels = torch.full_like(ids, -100)
    pick = (torch.rand(ids.shape, generator=g) < 0.15) & mask.bool()
    pick[:, 1] = True
    labels[pick] = ids[pick]
    ids = ids.masked_fill(pick, 4).masked_fill(~mask.bool(), 0)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def count_gathers(model, counts):
    """Wrap each ZeRO-3 parameter's all-gather entry point to count fetches per parameter name."""
    names = {id(p): n for n, p in model.named_parameters()}
    for p in model.parameters():
        original = p.all_gather_coalesced

        def wrapped(params, *args, _orig=original, **kwargs):
            for q in params:
                counts[names[id(q)]] = counts.get(names[id(q)], 0) + 1
            return _orig(params, *args, **kwargs)

        p.all_gather_coalesced = wrapped


def run_variant(stage: int, resident: bool, rank: int, world: int, extra=()):
    run = load_config(
        [
            "model.vocab_size=512", "model.dropout=0.0", "model.num_layers=3", "deepspeed.precision=fp32",
            f"deepspeed.zero_stage={stage}", f"train.micro_batch_size={MICRO}", "train.global_batch_size=0",
            f"train.max_steps={STEPS}", "train.warmup_ratio=0", "deepspeed.param_persistence_threshold=0", *extra,
        ]
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_model(run.model, task="mlm")
    ds = ds_config.build(run, world, torch.device("cpu"))
    if stage == 3:
        ds["zero_optimization"].update(stage3_max_reuse_distance=0, stage3_prefetch_bucket_size=0)
    import deepspeed

    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
    shared = model.shared_modules()  # the hypernetwork, or the cross-layer shared mixers
    marked = keep_resident(engine, shared) if resident else []
    counts: dict = {}
    if stage == 3:
        count_gathers(model, counts)
    seen = {"fwd": [], "bwd": []}
    hyper_params = [p for m in shared for p in m.parameters()]
    for block in model.model.encoder.layers:
        block.register_forward_pre_hook(lambda m, a: seen["fwd"].append(all(is_available(p) for p in hyper_params)))
        block.register_full_backward_hook(
            lambda m, gi, go: seen["bwd"].append(all(is_available(p) for p in hyper_params))
        )
    losses, moved = [], []
    with CollectiveCounter() as counter:
        for step in range(STEPS):
            if step == 1:  # DeepSpeed records its parameter trace in the first step and releases
                counts.clear()  # everything then, persistent or not: measure the steady state
                seen["fwd"].clear(), seen["bwd"].clear()
            counter.reset()
            loss = engine(**batch(step, rank), sparse_logits=True).loss
            engine.backward(loss)
            engine.step()
            moved.append(dict(counter.bytes))
            t = loss.detach().clone()
            torch.distributed.all_reduce(t)  # torch.distributed's own: not DeepSpeed's, not counted
            losses.append(t.item() / world)
    steady = moved[1:]
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    block_params = [p for n, p in model.named_parameters() if ".layers." in n and p.dim() == 2]
    sharded = stage == 3 and all(p.ds_tensor.numel() < p.ds_numel for p in block_params)
    hyper_names = {n for n, p in model.named_parameters() if any(p is q for q in hyper_params)}
    return {
        "losses": losses,
        "marked": len(marked),
        "steady_steps": STEPS - 1,
        "hyper_gathers": sum(v for k, v in counts.items() if k in hyper_names),
        "block_gathers": sum(v for k, v in counts.items() if ".layers." in k),
        "avail_fwd": all(seen["fwd"]) and len(seen["fwd"]) > 0,
        "avail_bwd": all(seen["bwd"]) and len(seen["bwd"]) > 0,
        "sharded": sharded,
        "state_keys_hyper": sum(1 for k in model.state_dict() if "hypernet" in k or "shared_mixers" in k),
        "num_hyper_params": len(hyper_params),
        "bytes_per_step": {
            k: statistics.mean(m.get(k, 0) for m in steady) for k in sorted({k for m in steady for k in m})
        },
        "param_bytes": 4 * sum(p.ds_numel if stage == 3 else p.numel() for p in model.parameters()),
        "hyper_bytes": 4 * sum(p.ds_numel if stage == 3 else p.numel() for p in hyper_params),
        "adam_numel": sum(v.numel() for st in inner.state.values() for k, v in st.items() if k == "exp_avg"),
    }


def main(out_path: str) -> None:
    info = init_distributed("cpu", timeout_minutes=2)
    results = {
        name: run_variant(stage, resident, info.rank, info.world_size, extra)
        for name, stage, resident, extra in VARIANTS
    }
    if info.rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    torch.distributed.barrier()
    leave_now(0)  # several engines' gloo threads can abort the interpreter's teardown (seen in CI)


if __name__ == "__main__":
    main(sys.argv[1])
