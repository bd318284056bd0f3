"""`python -m scale_hyper.doctor.probe OUT.json train ...`: run `scale-hyper train` in this process,
instrumented, and write what the doctor needs and the trainer does not log to OUT.json (per rank).

Instrument (installed on DeepSpeed, not on the trainer): after ``deepspeed.initialize`` every ZeRO-3
parameter's all-gather entry point is counted, as tests/zero_worker.py does, split into the shared
modules (``model.shared_modules()``: the hypernetwork) and the rest, and keyed by the number of
optimizer steps completed at the time. DeepSpeed records its parameter-fetch trace in the first
forward passes and releases everything then, persistent or not (the trainer's validation before
step 1 is one of them), so the doctor reads the steady state from the third step on: the count for
the shared modules must be 0 there when they are kept resident. Also: peak memory of the process
(CUDA allocator peak, or peak RSS).

The trainer runs through ``runpy`` exactly as ``python -m scale_hyper train`` would.
"""

from __future__ import annotations

import atexit
import json
import os
import resource
import runpy
import sys
from typing import Any, Dict


def _instrument(record: Dict[str, Any]) -> None:
    import deepspeed

    original = deepspeed.initialize

    def initialize(*args: Any, **kwargs: Any):
        out = original(*args, **kwargs)
        engine = out[0]
        model = engine.module
        shared = [p for m in model.shared_modules() for p in m.parameters()] if hasattr(model, "shared_modules") else []
        ids = {id(p) for p in shared}
        layers = getattr(getattr(model, "config", None), "num_layers", None)
        record.update(zero_stage=engine.zero_optimization_stage(), shared_params=len(shared),
                      shared_numel=sum(getattr(p, "ds_numel", p.numel()) for p in shared), layers=layers)  # fmt: skip
        # all-gathers per parameter kind, by the optimizer steps completed when they happened
        counts: Dict[str, Dict[int, int]] = {"shared": {}, "other": {}}
        record["gathers"] = counts
        if record["zero_stage"] == 3:
            for p in model.parameters():
                inner = p.all_gather_coalesced

                def wrapped(params, *a, _inner=inner, **kw):
                    for q in params:
                        tally = counts["shared" if id(q) in ids else "other"]
                        tally[engine.global_steps] = tally.get(engine.global_steps, 0) + 1
                    return _inner(params, *a, **kw)

                p.all_gather_coalesced = wrapped
        step = engine.step

        def counted_step(*a: Any, **kw: Any):
            result = step(*a, **kw)
            record["optimizer_steps"] = engine.global_steps
            return result

        engine.step = counted_step
        record["resident"] = all(getattr(p, "ds_persist", False) for p in shared) if shared else None
        record["shared"] = shared  # kept for the final residency reading (removed before writing)
        return out

    deepspeed.initialize = initialize


def _peak_memory() -> Dict[str, Any]:
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            return {"peak_memory_bytes": torch.cuda.max_memory_allocated(), "memory_kind": "cuda max_memory_allocated"}
    except Exception:  # noqa: BLE001
        pass
    return {"peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "memory_kind": "peak RSS"}


def main(argv: list) -> int:
    out, args = argv[0], argv[1:]
    record: Dict[str, Any] = {"rank": int(os.environ.get("RANK", "0"))}
    _instrument(record)
    sys.argv = ["scale_hyper", *args]

    def write(code: Any) -> int:
        if "exit" not in record:  # once: from the atexit handler or after the run returned
            shared = record.pop("shared", [])
            if shared:
                record["resident_at_end"] = all(getattr(p, "ds_persist", False) for p in shared)
            record.update(_peak_memory(), exit=code if isinstance(code, int) else 1)
            with open(out, "w") as f:
                json.dump(record, f)
        return record["exit"]

    # A finished multi-rank train leaves through launch.leave.leave_now (no interpreter teardown),
    # which runs the atexit handlers first: this one records its exit code.
    from scale_hyper.launch import leave

    atexit.register(lambda: write(leave.exit_code))
    try:
        runpy.run_module("scale_hyper", run_name="__main__", alter_sys=True)
        code: Any = 0
    except SystemExit as done:
        code = done.code
    return write(code)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
