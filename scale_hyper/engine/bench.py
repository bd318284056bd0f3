"""`scale-hyper bench train`: training-step throughput of every mixer against Hugging Face BERT.

One row = one (mixer, size, seq_len): a fresh model built from the `{mixer}-{size}` preset, a fixed
synthetic batch of unpadded sequences with exactly round(mask_prob × seq_len) masked positions per
sequence, and full training steps (forward + backward + AdamW step; bf16 autocast on CUDA, fp32 on
CPU) on ONE device with plain torch (no DeepSpeed: this measures the model, not the sharding).
Each row warms up, then times `steps` steps one by one (`torch.cuda.synchronize()` around each on
CUDA) and reports the median. The reference row is `transformers.BertForMaskedLM`
(attn_implementation="sdpa", built from a `BertConfig` of the bert preset's geometry, no hub),
measured in the same run; "x HF" is tokens/s divided by that row's tokens/s at the same size and
seq_len. HF computes the vocabulary projection at every position; ours only at masked positions
(`sparse_logits=True`), which is part of what is being compared.

What is swept (the CLI hands over only the RunConfig, and no schema field is added for this):
  * defaults by device, independent of the environment:
      CUDA: sizes mini, base; seq_len 128, 512, 2048, 8192; ~65,536 tokens per step; 5 warm-up + 20 timed.
      CPU:  sizes tiny, mini; seq_len 128 (and 512 for tiny); 2,048 tokens per step; 2 warm-up + 5 timed.
  * narrowed by environment variables (comma lists):
      SCALE_HYPER_BENCH_MIXERS (default bert,hyperbert,hypermixer,hyla; "hf" is always added),
      SCALE_HYPER_BENCH_SIZES (tiny, mini, base, large), SCALE_HYPER_BENCH_SEQ (e.g. 128,512),
      SCALE_HYPER_BENCH_TOKENS (tokens per step), SCALE_HYPER_BENCH_STEPS (timed steps; warm-up is
      steps // 4, at least 1), SCALE_HYPER_BENCH_JSON (also write the rows as JSON to this path).
  * taken from the config: train.device (auto | cpu | cuda), deepspeed.precision (auto = bf16 on a
    bf16 GPU, else fp32), train.compile (CUDA only: adds a `torch.compile`d row per mixer),
    and on CUDA with Triton installed a "+triton" row (model.mixer_kernel=triton) for hyperbert and hypermixer,
    data.mask_prob, train.lr / adam_betas / adam_eps / weight_decay, train.seed.

Analytic MFU = `flops.train_flops_per_token(model, seq_len, mask_prob) × tokens/s / peak_flops`,
reported only where `flops.peak_flops` knows the device (never on CPU). HF's MFU counts its
vocabulary projection at every position (mask_prob = 1), because it computes it.
Peak memory: CUDA `max_memory_allocated` during the row (weights + grads + Adam state +
activations); on CPU the growth of the process' peak RSS (VmHWM, reset through
/proc/self/clear_refs), approximate because the allocator keeps freed memory; "-" where unreadable.
A row that runs out of memory shows "OOM"; the larger seq_lens of that mixer and size show "skipped".
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from scale_hyper.config import RunConfig, load_config
from scale_hyper.engine.flops import peak_flops, train_flops_per_token
from scale_hyper.models import MIXERS, build_model
from scale_hyper.models.model_config import ModelConfig

HF = "hf-bert"
ENV = "SCALE_HYPER_BENCH_"


@dataclass
class Plan:
    mixers: List[str]
    sizes: List[str]
    seq_lens: Dict[str, List[int]]  # per size
    tokens_per_step: int
    steps: int
    warmup: int


@dataclass
class Row:
    mixer: str
    size: str
    seq_len: int
    batch: int
    status: str = "ok"  # ok | OOM | skipped | error: ...
    step_ms: Optional[float] = None
    tokens_per_s: Optional[float] = None
    mfu: Optional[float] = None
    peak_mem_bytes: Optional[int] = None
    vs_hf: Optional[float] = None
    step_times_ms: List[float] = field(default_factory=list)


def _env_list(name: str) -> Optional[List[str]]:
    value = os.environ.get(ENV + name, "").strip()
    return [v.strip() for v in value.split(",") if v.strip()] or None


def make_plan(device: torch.device) -> Plan:
    if device.type == "cuda":
        sizes, seq, tokens, steps, warmup = (
            ["mini", "base"],
            {"mini": [128, 512, 2048, 8192], "base": [128, 512, 2048, 8192]},
            65_536,
            20,
            5,
        )
    else:
        sizes, seq, tokens, steps, warmup = ["tiny", "mini"], {"tiny": [128, 512], "mini": [128]}, 2_048, 5, 2
    mixers = _env_list("MIXERS") or list(MIXERS)
    unknown = [m for m in mixers if m not in MIXERS]
    if unknown:
        raise ValueError(f"{ENV}MIXERS: unknown mixer(s) {unknown}; choose from {', '.join(MIXERS)}")
    sizes = _env_list("SIZES") or sizes
    seq_env = _env_list("SEQ")
    if seq_env:
        seq = {s: [int(v) for v in seq_env] for s in sizes}
    else:
        seq = {s: seq.get(s, [128]) for s in sizes}
    if os.environ.get(ENV + "TOKENS"):
        tokens = int(os.environ[ENV + "TOKENS"])
    if os.environ.get(ENV + "STEPS"):
        steps = int(os.environ[ENV + "STEPS"])
        warmup = max(1, steps // 4)
    return Plan([m for m in MIXERS if m in mixers], sizes, seq, tokens, steps, warmup)


def mfu(mc: ModelConfig, seq_len: int, tokens_per_s: float, peak: Optional[float], mask_prob: float) -> Optional[float]:
    """Model FLOPs utilisation from the model's own analytic FLOP count; None where the peak is unknown."""
    if not peak:
        return None
    return train_flops_per_token(mc, seq_len, mask_prob) * tokens_per_s / peak


def _fused_kernel_runs(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    from scale_hyper.kernels import triton_available

    return triton_available()


def model_config(mixer: str, size: str, seq_len: int) -> ModelConfig:
    """The `{mixer}-{size}` preset's geometry, with positions for seq_len and dropout as in the preset."""
    mc = load_config([f"{mixer}-{size}"]).model
    mc.max_position = max(mc.max_position, seq_len)
    return mc.validate()


def hf_bert(mc: ModelConfig) -> torch.nn.Module:
    from transformers import BertConfig, BertForMaskedLM

    cfg = BertConfig(
        vocab_size=mc.vocab_size, hidden_size=mc.hidden_size, num_hidden_layers=mc.num_layers,
        num_attention_heads=mc.num_heads, intermediate_size=mc.ffn_size, max_position_embeddings=mc.max_position,
        type_vocab_size=mc.type_vocab_size, hidden_dropout_prob=mc.dropout, attention_probs_dropout_prob=mc.dropout,
        layer_norm_eps=mc.layer_norm_eps, initializer_range=mc.initializer_range, pad_token_id=mc.pad_token_id,
        attn_implementation="sdpa",
    )  # fmt: skip
    return BertForMaskedLM(cfg)


def synthetic_batch(mc: ModelConfig, batch: int, seq_len: int, mask_prob: float, device, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, mc.vocab_size, (batch, seq_len), generator=g)
    labels = torch.full_like(ids, -100)
    n_masked = max(1, round(mask_prob * seq_len))
    pos = torch.rand(batch, seq_len, generator=g).argsort(dim=1)[:, :n_masked]
    labels.scatter_(1, pos, ids.gather(1, pos))
    ids = ids.scatter(1, pos, 4)
    # Unpadded batches: attention_mask=None lets both models take their fastest attention path.
    return {"input_ids": ids.to(device), "labels": labels.to(device)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Memory:
    """Peak memory growth during a row: CUDA allocator peak, or the process' peak RSS on Linux."""

    def __init__(self, device: torch.device):
        self.device, self.base = device, None
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            self.base = torch.cuda.memory_allocated(device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self.base = self._status("VmRSS")
        except OSError:
            self.base = None

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise OSError(key)

    def peak(self) -> Optional[int]:
        if self.base is None:
            return None
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - self.base
        try:
            return max(0, self._status("VmHWM") - self.base)
        except OSError:
            return None


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def measure(
    build: Callable[[], torch.nn.Module],
    batch: dict,
    run: RunConfig,
    device: torch.device,
    precision: str,
    steps: int,
    warmup: int,
    compile_model: bool = False,
    sparse: bool = True,
) -> tuple[List[float], Optional[int]]:
    """Per-step wall times (seconds) of `steps` timed training steps, and the row's peak memory."""
    memory = _Memory(device)
    torch.manual_seed(run.train.seed)
    model = build().to(device).train()
    t = run.train
    opt_kwargs = {"fused": True} if device.type == "cuda" else {}
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=t.lr,
        betas=tuple(t.adam_betas),
        eps=t.adam_eps,
        weight_decay=t.weight_decay,
        **opt_kwargs,
    )
    step_model = torch.compile(model) if compile_model else model
    extra = {"sparse_logits": True} if sparse else {}
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = step_model(**batch, **extra).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    try:
        for _ in range(warmup):
            step()
        _sync(device)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            step()
            _sync(device)
            times.append(time.perf_counter() - start)
        return times, memory.peak()
    finally:
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()


def run_bench(run: RunConfig, plan: Optional[Plan] = None, log=print) -> tuple[List[Row], dict]:
    from scale_hyper.engine.distributed import pick_device
    from scale_hyper.engine.ds_config import resolve_precision

    device = pick_device(run.train.device, 0)
    plan = plan or make_plan(device)
    precision = resolve_precision(run.deepspeed.precision, device)
    if device.type == "cpu" and precision != "fp32":
        precision = "fp32"  # the brief of this bench: fp32 on CPU
    peak = peak_flops(device, precision)
    compile_too = run.train.compile and device.type == "cuda"
    mask_prob = run.data.mask_prob
    rows: List[Row] = []
    # The fused Triton mixer (model.mixer_kernel=triton) gets its own rows where it can run.
    fused = [m for m in plan.mixers if m in ("hyperbert", "hypermixer")] if _fused_kernel_runs(device) else []
    eager = [(m, False, "torch") for m in plan.mixers] + [(m, False, "triton") for m in fused]
    variants = eager + ([(m, True, k) for m, _, k in eager] if compile_too else []) + [(HF, False, "torch")]
    for size in plan.sizes:
        for name, compiled, kernel in variants:
            label = name + ("+triton" if kernel == "triton" else "") + ("+compile" if compiled else "")
            dead = False
            for seq_len in plan.seq_lens[size]:
                batch_size = max(1, plan.tokens_per_step // seq_len)
                row = Row(label, size, seq_len, batch_size)
                rows.append(row)
                if dead:
                    row.status = "skipped"
                    continue
                mc = model_config("bert" if name == HF else name, size, seq_len)
                mc.mixer_kernel = kernel
                build = (lambda mc=mc: hf_bert(mc)) if name == HF else (lambda mc=mc: build_model(mc, task="mlm"))
                batch = synthetic_batch(mc, batch_size, seq_len, mask_prob, device, run.train.seed)
                try:
                    times, mem = measure(
                        build, batch, run, device, precision, plan.steps, plan.warmup, compiled, sparse=name != HF
                    )
                except Exception as err:  # noqa: BLE001 - one failing row must not hide the others
                    if not _is_oom(err):
                        row.status = f"error: {type(err).__name__}: {str(err).splitlines()[0][:80]}"
                        log(f"  {label} {size} S={seq_len}: {row.status}")
                        continue
                    row.status, dead = "OOM", True
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    continue
                median = statistics.median(times)
                row.step_times_ms = [round(x * 1e3, 3) for x in times]
                row.step_ms = median * 1e3
                row.tokens_per_s = batch_size * seq_len / median
                row.mfu = mfu(mc, seq_len, row.tokens_per_s, peak, 1.0 if name == HF else mask_prob)
                row.peak_mem_bytes = mem
                log(f"  {label:<18}{size:<6}S={seq_len:<6}{row.tokens_per_s:>12,.0f} tok/s")
    hf = {(r.size, r.seq_len): r.tokens_per_s for r in rows if r.mixer == HF and r.tokens_per_s}
    for r in rows:
        if r.tokens_per_s and hf.get((r.size, r.seq_len)):
            r.vs_hf = r.tokens_per_s / hf[(r.size, r.seq_len)]
    meta = {
        "device": _device_name(device), "precision": precision, "peak_flops": peak, "mask_prob": mask_prob,
        "tokens_per_step": plan.tokens_per_step, "timed_steps": plan.steps, "warmup_steps": plan.warmup,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d", time.gmtime()),
    }  # fmt: skip
    return rows, meta


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU {model}, {os.cpu_count()} cores"


def _fmt_mem(b: Optional[int]) -> str:
    if b is None:
        return "-"
    return f"{b / 2**20:,.0f} MiB" if b < 2**30 else f"{b / 2**30:,.2f} GiB"


COLUMNS = ("mixer", "size", "seq_len", "batch", "tokens/s", "x HF", "MFU", "peak mem", "step ms")


def format_table(rows: List[Row]) -> str:
    lines = []
    for r in rows:
        if r.status != "ok":
            cells = [r.mixer, r.size, str(r.seq_len), str(r.batch), r.status, "-", "-", "-", "-"]
        else:
            cells = [
                r.mixer, r.size, str(r.seq_len), str(r.batch), f"{r.tokens_per_s:,.0f}",
                f"{r.vs_hf:.2f}" if r.vs_hf else "-", f"{100 * r.mfu:.1f} %" if r.mfu is not None else "-",
                _fmt_mem(r.peak_mem_bytes), f"{r.step_ms:.1f}",
            ]  # fmt: skip
        lines.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in lines)) if lines else len(h) for i, h in enumerate(COLUMNS)]
    out = ["| " + " | ".join(h.ljust(w) for h, w in zip(COLUMNS, widths, strict=True)) + " |"]
    out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    out += ["| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |" for cells in lines]
    return "\n".join(out)


def main(run: RunConfig) -> int:
    from scale_hyper.engine.distributed import pick_device

    device = pick_device(run.train.device, 0)
    try:
        plan = make_plan(device)
    except ValueError as err:
        print(f"scale-hyper bench train: {err}")
        return 2
    print(
        f"# scale-hyper bench train: fwd+bwd+AdamW step on {_device_name(device)}; mixers {', '.join(plan.mixers)} "
        f"+ HF BertForMaskedLM (sdpa); sizes {', '.join(plan.sizes)}; seq_len "
        + "; ".join(f"{s}: {','.join(map(str, plan.seq_lens[s]))}" for s in plan.sizes)
        + f"; ~{plan.tokens_per_step:,} tokens/step; median of {plan.steps} steps after {plan.warmup} warm-up"
        f" (narrow with {ENV}MIXERS/SIZES/SEQ/TOKENS/STEPS; see `pydoc scale_hyper.engine.bench`)",
        flush=True,
    )
    rows, meta = run_bench(run, plan, log=lambda s: print(s, flush=True))
    print(f"# device {meta['device']}, precision {meta['precision']}, torch {meta['torch']}, {meta['threads']} threads, "
          f"peak {'%.0f TFLOP/s' % (meta['peak_flops'] / 1e12) if meta['peak_flops'] else 'unknown (no MFU)'}")  # fmt: skip
    print(format_table(rows), flush=True)
    path = os.environ.get(ENV + "JSON")
    if path:
        with open(path, "w") as f:
            json.dump({"meta": meta, "rows": [asdict(r) for r in rows]}, f, indent=1)
    return 0 if any(r.status == "ok" for r in rows) else 1


# --- ZeRO-3 communication volume (used by tests/comm_worker.py) -------------------------------------

_KINDS = {
    "all_gather_into_tensor": "all_gather", "all_gather": "all_gather", "all_gather_coalesced": "all_gather",
    "reduce_scatter_tensor": "reduce_scatter", "reduce_scatter": "reduce_scatter",
    "all_reduce": "all_reduce", "all_reduce_coalesced": "all_reduce", "inference_all_reduce": "all_reduce",
    "broadcast": "other", "all_to_all_single": "other",
}  # fmt: skip


def _nbytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(t) for t in x)
    return 0


def _collective_bytes(name: str, args: tuple, kwargs: dict) -> int:
    """Logical size of one collective: the full (gathered / pre-reduction) tensor, as nccl-tests counts it.
    A ring moves (W-1)/W of this through each rank's link."""

    def arg(i, *names):
        for n in names:
            if n in kwargs:
                return kwargs[n]
        return args[i] if len(args) > i else None

    if name == "all_gather_into_tensor":
        return _nbytes(arg(0, "output_tensor"))
    if name == "all_gather":
        return _nbytes(arg(0, "tensor_list"))
    if name == "reduce_scatter_tensor":
        return _nbytes(arg(1, "input_tensor", "tensor"))
    if name == "reduce_scatter":
        return _nbytes(arg(1, "input_list"))
    return _nbytes(arg(0, "tensor", "tensors", "output"))


class CollectiveCounter:
    """Count calls and bytes of the collectives DeepSpeed issues, by kind (all_gather, reduce_scatter, ...).

    DeepSpeed 0.19.8 routes every `deepspeed.comm` collective through one backend object
    (`deepspeed.comm.comm.cdb`, a TorchBackend on gloo/nccl) whose all-gather/reduce-scatter functions
    are bound to torch.distributed at init, so wrapping `torch.distributed.*` afterwards would miss
    them: the backend's methods are wrapped instead. Calls made directly on torch.distributed
    (bypassing DeepSpeed) are tallied separately under `torch_direct` as a cross-check.
    """

    TORCH_FNS = ("all_gather_into_tensor", "reduce_scatter_tensor", "all_gather", "all_reduce", "reduce_scatter")

    def __init__(self):
        self.bytes: Dict[str, int] = {}
        self.calls: Dict[str, int] = {}
        self.torch_direct: Dict[str, int] = {}
        self._undo: List[tuple] = []
        self._inside = 0

    def reset(self) -> None:
        self.bytes.clear(), self.calls.clear(), self.torch_direct.clear()

    def _wrap(self, owner, name: str, kind: Optional[str]) -> None:
        original = getattr(owner, name, None)
        if original is None:
            return
        counter = self

        def wrapped(*args, **kwargs):
            size = _collective_bytes(name, args, kwargs)
            if kind is None:  # torch.distributed level: only what did not come through DeepSpeed
                if not counter._inside:
                    counter.torch_direct[name] = counter.torch_direct.get(name, 0) + size
                return original(*args, **kwargs)
            counter.bytes[kind] = counter.bytes.get(kind, 0) + size
            counter.calls[kind] = counter.calls.get(kind, 0) + 1
            counter._inside += 1
            try:
                return original(*args, **kwargs)
            finally:
                counter._inside -= 1

        setattr(owner, name, wrapped)
        self._undo.append((owner, name, original, name in vars(owner)))

    def __enter__(self) -> CollectiveCounter:
        import deepspeed.comm.comm as ds_comm

        if ds_comm.cdb is None:
            raise RuntimeError("CollectiveCounter: DeepSpeed's comm backend is not initialised")
        for name, kind in _KINDS.items():
            self._wrap(ds_comm.cdb, name, kind)
        for name in self.TORCH_FNS:
            self._wrap(torch.distributed, name, None)
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, original, own in reversed(self._undo):
            if own:  # a module function or an instance attribute: put it back
                setattr(owner, name, original)
            else:  # a method found on the class: drop the instance attribute that shadows it
                delattr(owner, name)
        self._undo.clear()


# --- Analytic ZeRO-3 step time vs number of nodes (docs/benchmarks.md, "ZeRO-3 communication") ------


def zero3_step_model(
    params: int,
    hyper_params: int,
    layers: int,
    flops_per_token: float,
    tokens_per_gpu: int,
    nodes: int,
    resident: bool,
    gpus_per_node: int = 8,
    peak: float = 989e12,
    mfu: float = 0.4,
    bytes_per_param: int = 2,
    nvlink_bw: float = 360e9,
    net_bw: float = 45e9,
) -> dict:
    """Seconds per optimizer step of ZeRO-3 data parallelism, first order.

    compute = tokens_per_gpu × flops_per_token / (peak × mfu).
    Gathered per step: every weight twice (forward, backward), except the shared hypernetwork, which a
    partitioned ZeRO-3 gathers at each of its 2·L uses and a resident one once (after the step);
    gradients are reduce-scattered once. A ring moves (W-1)/W of each collective through every GPU's
    link: NVLink bandwidth within one node, the per-GPU network bandwidth across nodes.
    """  # fmt: skip
    world = nodes * gpus_per_node
    gathered = 2 * (params - hyper_params) + (1 if resident else 2 * layers) * hyper_params
    wire = (world - 1) / world * bytes_per_param * (gathered + params)  # all-gathers + reduce-scatter
    bw = nvlink_bw if nodes == 1 else net_bw
    compute = tokens_per_gpu * flops_per_token / (peak * mfu)
    comm = wire / bw
    return {"compute_s": compute, "comm_s": comm, "serial_s": compute + comm, "overlapped_s": max(compute, comm)}
