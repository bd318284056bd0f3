"""`scale-hyper bench prepare`: prepare's tokens/s per core, and the speed-up of 2 local processes over 1.

Wall-clock tokens/s and tokens per CPU-second are printed: on a machine shared with other work
(load average printed) only the latter says what a dedicated core does.

The plan step (tokenizer training on the sample) runs once and is timed apart; the slice step
(read → tokenize → pack → shuffle → write shards) then runs on the same plan with
``data.prepare_workers`` = 1 and = 2 into fresh temporary outputs (after a one-slice warm-up), and the merge is checked to give
the same manifest both times. With ``data.source=stdlib`` and no ``data.max_documents``, the
embedded corpus is written ``REPEAT`` times into a temporary ``.jsonl`` cut into 1 MiB slices, so
there are enough slices for the processes to share (tokenization speed does not depend on repeats).
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import shutil
import tempfile
import time
from typing import Dict

from scale_hyper.prepare import main as preplib
from scale_hyper.prepare import merge as mergelib
from scale_hyper.prepare import sources

REPEAT = 8


def _corpus(data_cfg, tmp: str):
    if data_cfg.source != "stdlib" or data_cfg.max_documents:
        return data_cfg
    path = os.path.join(tmp, "stdlib-x8.jsonl")
    docs = list(sources.iter_documents(data_cfg))
    with open(path, "w") as f:
        for _ in range(REPEAT):
            for d in docs:
                f.write(json.dumps({"text": d}) + "\n")
    return dataclasses.replace(data_cfg, source=path, text_field="text", slice_bytes=1 << 20)


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the pool's workers once shut down):
    tokens per CPU-second holds on a machine shared with other work, where wall time does not."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def measure(data_cfg, seed: int = 1234, workers=(1, 2)) -> Dict[str, float]:
    out: Dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="scale-hyper-bench-prepare-") as tmp:
        cfg = dataclasses.replace(_corpus(data_cfg, tmp), output=os.path.join(tmp, "plan"))
        t0 = time.perf_counter()
        plan = preplib.get_plan(cfg, seed, create=True)
        out["plan_s"] = time.perf_counter() - t0
        out["slices"] = len(plan["slices"])
        # warm-up outside the timing (first imports, page cache): one slice into a scratch copy
        warm = dataclasses.replace(cfg, output=os.path.join(tmp, "warm"), prepare_workers=1)
        shutil.copytree(cfg.output, warm.output)
        preplib.run_task(warm, {**plan, "slices": plan["slices"][:1]}, 0, 1)
        manifests = []
        for w in workers:
            run = dataclasses.replace(cfg, output=os.path.join(tmp, f"w{w}"), prepare_workers=w)
            shutil.copytree(cfg.output, run.output)  # plan + tokenizer, no slices yet
            t0, c0 = time.perf_counter(), cpu_seconds()
            preplib.run_task(run, plan, 0, 1)
            dt, cpu = time.perf_counter() - t0, cpu_seconds() - c0
            m = mergelib.merge(run, plan)
            tokens = m["splits"]["train"]["tokens"] + m["splits"]["val"]["tokens"]
            out["tokens"] = tokens
            out[f"tokens_per_s_{w}"] = tokens / dt
            out[f"seconds_{w}"] = dt
            out[f"tokens_per_cpu_s_{w}"] = tokens / cpu
            manifests.append({k: v for k, v in m.items() if k != "location"})
        out["identical"] = float(all(m == manifests[0] for m in manifests))
    return out


def main(cfg) -> int:
    r = measure(cfg.data, seed=cfg.train.seed)
    cores, load = os.cpu_count() or 1, os.getloadavg()[0]
    print(f"prepare: {int(r['slices'])} slices, {int(r['tokens']):,} tokens (seq_len {cfg.data.seq_len}); "
          f"plan (tokenizer) {r['plan_s']:.1f} s; {cores} CPU cores here, load average {load:.1f}")  # fmt: skip
    print(f"{'processes':>10} {'seconds':>9} {'tokens/s':>12} {'per process':>12} {'per CPU-second':>15}")
    for w in (1, 2):
        tps, cpu = r[f"tokens_per_s_{w}"], r[f"tokens_per_cpu_s_{w}"]
        print(f"{w:>10} {r[f'seconds_{w}']:>9.2f} {tps:>12,.0f} {tps / w:>12,.0f} {cpu:>15,.0f}")
    print(f"speed-up of 2 processes over 1: {r['tokens_per_s_2'] / r['tokens_per_s_1']:.2f}x; "
          f"same manifest: {'yes' if r['identical'] else 'NO'}")  # fmt: skip
    return 0 if r["identical"] else 1
