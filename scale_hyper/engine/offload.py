"""The DeepSpeed ops that offloading needs, built (JIT, cached in ~/.cache/torch_extensions) before
``deepspeed.initialize`` — or one line naming what this machine lacks.

* ``deepspeed.offload_optimizer``: DeepSpeedCPUAdam, the ``cpu_adam`` op (a C++ compiler and Python's
  headers to build it).
* ``deepspeed.offload_device=nvme``: the ``async_io`` op (also libaio: ``apt-get install libaio-dev``).

Without the check DeepSpeed fails deep inside ``initialize`` with a compiler log, or (async_io)
with an assertion on the first swap.
"""

from __future__ import annotations

import ctypes.util
import os
import shutil
import sysconfig
from pathlib import Path
from typing import Any, Dict, List, Tuple

from scale_hyper.config import ConfigError


def needed_ops(ds: Dict[str, Any]) -> List[Tuple[str, str]]:
    """(op, the setting that needs it) for this DeepSpeed config."""
    zero = ds.get("zero_optimization", {})
    out = []
    if zero.get("offload_optimizer", {}).get("device", "none") != "none":
        out.append(("cpu_adam", "deepspeed.offload_optimizer=true"))
    if any(zero.get(k, {}).get("device") == "nvme" for k in ("offload_optimizer", "offload_param")):
        out.append(("async_io", "deepspeed.offload_device=nvme"))
    return out


def missing_for(op: str) -> str:
    """What this machine lacks to build ``op`` ("" if nothing obvious)."""
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler}) on PATH — install one (apt-get install g++)"
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file():
        return "Python's development headers (Python.h) are missing — install them (apt-get install python3-dev)"
    if op == "async_io" and ctypes.util.find_library("aio") is None:
        return "libaio is missing — install it (apt-get install libaio-dev)"
    return ""


def ensure_ops(ds: Dict[str, Any]) -> None:
    """Build (or load from the cache) every op the config needs; one line naming what is missing if not."""
    from deepspeed.ops.op_builder import AsyncIOBuilder, CPUAdamBuilder

    builders = {"cpu_adam": CPUAdamBuilder, "async_io": AsyncIOBuilder}
    for op, setting in needed_ops(ds):
        builder = builders[op]()
        reason = ""
        if op == "async_io" and not builder.is_compatible(verbose=False):
            reason = missing_for(op) or "DeepSpeed reports async_io as incompatible with this machine (ds_report)"
        else:
            try:
                builder.load(verbose=False)
            except Exception as err:  # noqa: BLE001  a compiler log, an ImportError, ...
                reason = missing_for(op) or f"building it failed: {str(err).strip().splitlines()[-1][:200]}"
        if reason:
            raise ConfigError(
                f"{setting} needs DeepSpeed's {op} op, which cannot be built here: {reason}, or turn the offload off"
            )
