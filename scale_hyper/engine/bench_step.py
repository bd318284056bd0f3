"""The trainer's own optimizer step, for the "+deepspeed" rows of `scale-hyper bench train`.

``bench`` and ``engine`` are sibling layers (neither imports the other), so the CLI hands this
function to ``bench.train``. It builds the engine exactly as ``scale-hyper train`` does
(``setup.start_deepspeed``: the generated DeepSpeed config with its ZeRO stage, precision — bf16
on a bf16 GPU — fused/torch AdamW and parameter groups; ``setup.keep_shared_resident``: ZeRO-3
residency and ``train.compile``) for one process, with the benchmark's batch as the micro-batch
and no accumulation, and runs the loop's micro-step: forward with sparse logits, DeepSpeed's
backward and step.
"""

from __future__ import annotations

import copy
from typing import Callable, Dict, Tuple

import torch

from scale_hyper.config import RunConfig

Step = Callable[[Dict[str, torch.Tensor]], None]


def trainer_step(run: RunConfig, model: torch.nn.Module, batch_size: int) -> Tuple[Step, Callable[[], None], str]:
    """(step(batch), close(), what it runs) for ``model`` under the DeepSpeed engine ``train`` builds."""
    from scale_hyper.engine import ds_config
    from scale_hyper.engine.distributed import init_distributed
    from scale_hyper.engine.setup import keep_shared_resident, start_deepspeed

    info = init_distributed(run.train.device, run.train.dist_timeout_minutes)  # one process; idempotent
    if info.world_size != 1:
        raise RuntimeError(f"bench train runs in one process (world size {info.world_size})")
    run = copy.deepcopy(run)
    run.train.micro_batch_size = run.train.global_batch_size = batch_size  # accumulation 1
    engine, ds = start_deepspeed(run, info, model, None)
    keep_shared_resident(run, engine, model)

    def step(batch: Dict[str, torch.Tensor]) -> None:
        loss = engine(**batch, sparse_logits=True).loss
        engine.backward(loss)
        engine.step()

    def close() -> None:
        engine.optimizer.zero_grad(set_to_none=True)
        engine.destroy()

    what = (f"DeepSpeed ZeRO-{ds_config.zero_stage(ds)} {ds_config.precision_of(ds)}, "
            f"{ds['optimizer']['type']}, mixer_kernel={run.model.mixer_kernel}"
            + (", train.compile" if run.train.compile else ""))  # fmt: skip
    return step, close, what
