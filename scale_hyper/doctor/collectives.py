"""The rendezvous (a rank that never joins is named within a short timeout) and the bus bandwidth of
all-reduce and all-gather at a few sizes, as nccl-tests defines it:

    algbw = S / t          (S: bytes of the full tensor — the reduced one, or the gathered one)
    busbw = algbw × 2(n-1)/n   for all-reduce;   algbw × (n-1)/n   for all-gather

within a node (ranks sharing one, all nodes at once) and across all ranks.
"""

from __future__ import annotations

import datetime
import os
import time
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from scale_hyper.doctor.results import FAIL, PASS, SKIPPED, Result
from scale_hyper.runs.disk import human_bytes

JOINED, VERDICT = "doctor/joined/", "doctor/verdict"


class Rendezvous:
    """A TCPStore hosted by rank 0 at MASTER_ADDR:MASTER_PORT, with a short timeout: every rank checks
    in; rank 0 waits ``timeout_s`` for all of them and publishes the verdict. The process group is then
    formed on this store, so its long timeout (train.dist_timeout_minutes) only guards real work."""

    def __init__(self, addr: str, port: int, rank: int, world: int, timeout_s: float) -> None:
        self.rank, self.world, self.timeout_s = rank, world, timeout_s
        self.address = f"{addr}:{port}"
        # Under torchrun the agent already hosts a store at MASTER_ADDR:MASTER_PORT (as torch's env:// does).
        host = rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
        self.store = dist.TCPStore(
            addr, port, None, host, timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False
        )

    def join(self, node: str) -> List[int]:
        """Check in and wait; returns the ranks that never joined ([] when all did)."""
        self.store.set(f"{JOINED}{self.rank}", node)
        keys = [f"{JOINED}{r}" for r in range(self.world)]
        if self.rank == 0:
            deadline = time.monotonic() + self.timeout_s
            while time.monotonic() < deadline and not self.store.check(keys):
                time.sleep(0.2)
            missing = [r for r, k in enumerate(keys) if not self.store.check([k])]
            self.store.set(VERDICT, ",".join(map(str, missing)) if missing else "ok")
            return missing
        self.store.wait([VERDICT], datetime.timedelta(seconds=self.timeout_s + 60))
        verdict = self.store.get(VERDICT).decode()
        return [] if verdict == "ok" else [int(r) for r in verdict.split(",")]

    def nodes(self) -> Dict[int, str]:
        out = {}
        for r in range(self.world):
            key = f"{JOINED}{r}"
            if self.store.check([key]):
                out[r] = self.store.get(key).decode()
        return out


def not_joined(missing: List[int], world: int, timeout_s: float, address: str, nodes: Dict[int, str]) -> Result:
    names = ", ".join(str(r) for r in missing)
    seen = sorted(set(nodes.values()))
    return Result(
        "collectives/rendezvous", FAIL, f"{world - len(missing)}/{world} joined",
        f"rank {names} never joined the rendezvous at {address} within {timeout_s:.0f} s "
        f"(joined from: {', '.join(seen)}); check that every node started its tasks, and MASTER_ADDR/"
        "NCCL_SOCKET_IFNAME/GLOO_SOCKET_IFNAME/firewalls for the missing node(s)",
        {"missing": missing, "nodes": nodes},
    )  # fmt: skip


def _sizes(device: torch.device) -> List[int]:
    if device.type == "cuda":
        return [1 << 20, 32 << 20, 256 << 20]
    return [64 << 10, 1 << 20, 8 << 20]


def _time(fn, device: torch.device, iters: int, group) -> float:
    fn()  # warm-up (connections, NCCL channels)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier(group=group)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / iters


def _measure(device: torch.device, group, n: int, rank_in_group: int) -> Dict[str, Any]:
    """busbw per size for all-reduce and all-gather in ``group`` (n ranks), plus correctness."""
    iters = 10 if device.type == "cuda" else 3
    out: Dict[str, Any] = {"all_reduce": [], "all_gather": [], "wrong": []}
    for size in _sizes(device):
        numel = size // 4
        x = torch.full((numel,), float(rank_in_group + 1), device=device)
        t = _time(lambda x=x: dist.all_reduce(x, group=group), device, iters, group)
        out["all_reduce"].append({"bytes": size, "time_s": t, "busbw_gbs": size / t * 2 * (n - 1) / n / 1e9})
        y = torch.full((numel,), float(rank_in_group + 1), device=device)
        dist.all_reduce(y, group=group)
        if float(y[0]) != n * (n + 1) / 2 or float(y[-1]) != n * (n + 1) / 2:
            out["wrong"].append(f"all_reduce of {human_bytes(size)} gave {float(y[0])}, expected {n * (n + 1) / 2}")
        part = torch.full((numel // n,), float(rank_in_group), device=device)
        gathered = torch.empty(numel // n * n, device=device)
        t = _time(lambda g=gathered, q=part: dist.all_gather_into_tensor(g, q, group=group), device, iters, group)
        total = gathered.numel() * 4
        out["all_gather"].append({"bytes": total, "time_s": t, "busbw_gbs": total / t * (n - 1) / n / 1e9})
        expect = torch.arange(n, device=device, dtype=torch.float32).repeat_interleave(numel // n)
        if not torch.equal(gathered, expect):
            out["wrong"].append(f"all_gather of {human_bytes(total)} returned wrong data")
    return out


def _row(name: str, runs: List[Tuple[str, Dict[str, Any]]], kind: str, scope: str) -> Result:
    """One row per collective and scope: the slowest group's busbw at the largest size, every size in detail."""
    wrong = [w for _, r in runs for w in r["wrong"] if w.startswith(kind)]
    worst = min(runs, key=lambda kv: kv[1][kind][-1]["busbw_gbs"])
    parts = [f"{human_bytes(m['bytes'])} {m['busbw_gbs']:.2f} GB/s" for m in worst[1][kind]]
    detail = f"{scope}, busbw (nccl-tests) by size: {', '.join(parts)}"
    if len(runs) > 1:
        detail += f"; slowest: {worst[0]}"
    figure = f"{worst[1][kind][-1]['busbw_gbs']:.2f} GB/s"
    data = {g: r[kind] for g, r in runs}
    if wrong:
        return Result(name, FAIL, figure, "; ".join(wrong) + ". " + detail, data)
    return Result(name, PASS, figure, detail, data)


def check(device: torch.device, rank: int, world: int, nodes: Dict[int, str]) -> List[Result]:
    """Collective on every rank; rows are meaningful on rank 0."""
    backend = dist.get_backend()
    if world == 1:
        return [Result("collectives", SKIPPED, "", "one rank: nothing to communicate with (launch with torchrun/srun)")]
    by_node: Dict[str, List[int]] = {}
    for r in range(world):
        by_node.setdefault(nodes[r], []).append(r)
    results: List[Result] = []
    across = _measure(device, None, world, rank)
    scope = f"{backend}, all {world} ranks on {len(by_node)} node(s)"
    results += [_row(f"collectives/{k}", [("all ranks", across)], k, scope) for k in ("all_reduce", "all_gather")]
    if len(by_node) > 1 and max(len(v) for v in by_node.values()) > 1:
        groups = {node: dist.new_group(ranks) for node, ranks in sorted(by_node.items())}  # every rank, same order
        mine = nodes[rank]
        within: Optional[Dict[str, Any]] = None
        if len(by_node[mine]) > 1:
            within = _measure(device, groups[mine], len(by_node[mine]), by_node[mine].index(rank))
        gathered: List[Any] = [None] * world
        dist.all_gather_object(gathered, (mine, within))
        runs = [(node, m) for node, m in dict(gathered).items() if m is not None]
        scope = f"{backend}, within each node ({len(runs)} node(s) with > 1 rank, measured together)"
        results += [_row(f"collectives/{k} intra-node", runs, k, scope) for k in ("all_reduce", "all_gather")]
    return results
