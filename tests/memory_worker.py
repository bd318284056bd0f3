"""One rank of the host-memory measurement in docs/benchmarks.md ("Models past one device"), run by hand
on 1, 2 or 4 CPU ranks (RANK/WORLD_SIZE/MASTER_* set per rank, as for tests/comm_worker.py):

    python tests/memory_worker.py OUT.json partitioned|whole [overrides ...]

Builds the model through the trainer's phases (``setup.build_model`` → ``start_deepspeed``) under ZeRO-3
in fp32, built partitioned (``deepspeed.zero_init=true``) or whole (``false``), and trains 3 steps on
synthetic batches. Peak RSS is read from /proc/self/status (VmHWM), reset before each phase
(``echo 5 > /proc/self/clear_refs``): building (model construction and init; also the RSS after it
once glibc returned its free memory, ``malloc_trim``), then
``deepspeed.initialize`` plus training. The model-state bytes this rank holds (partitions, persistent
weights, gradient partitions, fp32 master, Adam moments) are summed from the live tensors, as
tests/plan_worker.py does. Beside each figure: `scale-hyper plan`'s prediction (``models/memory.py``)
for the same config. Rank 0 writes every rank's record to OUT.json.
"""

from __future__ import annotations

import ctypes
import json
import sys

import torch

from scale_hyper.config import load_config
from scale_hyper.config.batch import global_batch, split_batch
from scale_hyper.engine import setup
from scale_hyper.engine.distributed import init_distributed
from scale_hyper.launch.leave import leave_now
from scale_hyper.models import memory

STEPS, MICRO, SEQ = 3, 2, 128
MODEL = ["hyperbert-large", "model.num_layers=12", "model.dropout=0.0"]  # 141.8 M parameters


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def reset_peak() -> int:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    return _status("VmRSS")


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def batch(step: int, rank: int, vocab: int):
    g = torch.Generator().manual_seed(100 * step + rank)
    ids = torch.randint(5, vocab, (MICRO, SEQ), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, 1:20] = ids[:, 1:20]
    return {"input_ids": ids, "labels": labels}


def main(out: str, how: str, overrides: list) -> None:
    info = init_distributed("cpu", timeout_minutes=20)
    world = info.world_size
    run = load_config([*MODEL, *overrides, "deepspeed.zero_stage=3", "deepspeed.precision=fp32",
                       f"deepspeed.zero_init={'true' if how == 'partitioned' else 'false'}",
                       f"train.micro_batch_size={MICRO}", f"train.global_batch_size={MICRO * world}",
                       f"data.seq_len={SEQ}", "train.max_steps=10"])  # fmt: skip
    layout = memory.parameter_layout(run)
    rss0 = reset_peak()
    model = setup.build_model(run, info, None)
    build_peak = _status("VmHWM")
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # what the built model holds, without glibc's retained free memory
    rss_built = _status("VmRSS")
    rss1 = reset_peak()
    engine, _ = setup.start_deepspeed(run, info, model, None)
    setup.keep_shared_resident(run, engine, model)
    for step in range(STEPS):
        loss = engine(**batch(step, info.rank, run.model.vocab_size), sparse_logits=True).loss
        engine.backward(loss)
        engine.step()
    train_peak = _status("VmHWM")
    opt = engine.optimizer
    params = list(model.parameters())
    held = {
        "weights": nbytes(p.ds_tensor for p in params) + nbytes(p.data for p in params if p.ds_persist),
        "gradients": nbytes([opt.grad_partitions_flat_buffer]),
        "master": nbytes(opt.fp32_partitioned_groups_flat),
        "adam": nbytes(v for s in opt.optimizer.state.values() for k, v in s.items() if k in ("exp_avg", "exp_avg_sq")),
    }
    micro, accum = split_batch(global_batch(run.train.global_batch_size, MICRO, world), MICRO, world)
    plan = memory.rank_bytes(run, layout, 3, world, "fp32", micro, accum, host=True)
    record = {
        "rank": info.rank, "world": world, "how": how, "params": layout["params"],
        "rss_before_build": rss0, "build_peak": build_peak, "rss_built_trimmed": rss_built, "rss_before_train": rss1, "train_peak": train_peak,
        "held": held, "held_total": sum(held.values()),
        "plan_build": memory.build_peak_bytes(layout, world, "fp32", partitioned=how == "partitioned"),
        "plan_state": sum(plan["state"].values()), "plan_gathered": plan["gathered"], "plan_bucket": plan["bucket"],
        "plan_activations": plan["total"] - plan["fixed"], "plan_total": plan["total"],
    }  # fmt: skip
    every: list = [None] * world
    torch.distributed.all_gather_object(every, record)
    if info.rank == 0:
        with open(out, "w") as f:
            json.dump(every, f, indent=1)
    torch.distributed.barrier()
    leave_now(0)  # several engines' gloo threads can abort the interpreter's teardown (seen in CI)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
