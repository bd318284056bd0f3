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
      steps // 4, at least 1), SCALE_HYPER_BENCH_JSON (also write the rows as JSON to this path),
      SCALE_HYPER_BENCH_DEEPSPEED=1 (adds a "+deepspeed" row per mixer: the trainer's own step, below).
  * taken from the config: train.device (auto | cpu | cuda), deepspeed.precision (auto = bf16 on a
    bf16 GPU, else fp32), train.compile (CUDA only: adds a `torch.compile`d row per mixer),
    and on CUDA with Triton installed a "+triton" row (model.mixer_kernel=triton) for hyperbert and hypermixer,
    data.mask_prob, train.lr / adam_betas / adam_eps / weight_decay, train.seed.

The "+deepspeed" rows run what `scale-hyper train` runs instead of plain torch: the same model under
the DeepSpeed engine `train` builds (``engine.bench_step``: the generated DeepSpeed config with this
config's ZeRO stage and precision — bf16 weights with fp32 masters on a bf16 GPU, not autocast —,
its AdamW, model.mixer_kernel from the config, train.compile), micro-batch = the row's batch, one
process; the plain-torch rows beside them measure the model alone.

Analytic MFU = `models.flops.train_flops_per_token(model, seq_len, mask_prob) × tokens/s / peak_flops`,
reported only where `models.flops.peak_flops` knows the device (never on CPU). HF's MFU counts its
vocabulary projection at every position (mask_prob = 1), because it computes it.
Peak memory: CUDA `max_memory_allocated` during the row (weights + grads + Adam state +
activations); on CPU the growth of the process' peak RSS (VmHWM, reset through
/proc/self/clear_refs), approximate because the allocator keeps freed memory; "-" where unreadable.
A row that runs out of memory shows "OOM"; the larger seq_lens of that mixer and size show "skipped".
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import asdict, dataclass
from functools import partial
from typing import Callable, Dict, List, Optional, Tuple

import torch

from scale_hyper.bench.device import PeakMemory, device_name, is_oom, pick_device, pick_precision, sync
from scale_hyper.bench.table import Row, format_table
from scale_hyper.config import RunConfig, load_config
from scale_hyper.models import MIXERS, ModelConfig, build_model
from scale_hyper.models.flops import peak_flops, train_flops_per_token

HF = "hf-bert"
DEEPSPEED = "deepspeed"  # the kernel slot of a row that runs the trainer's DeepSpeed step
ENV = "SCALE_HYPER_BENCH_"


@dataclass
class Plan:
    mixers: List[str]
    sizes: List[str]
    seq_lens: Dict[str, List[int]]  # per size
    tokens_per_step: int
    steps: int
    warmup: int
    deepspeed: bool = False  # "+deepspeed" rows: the trainer's own DeepSpeed step (SCALE_HYPER_BENCH_DEEPSPEED=1)


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
    deepspeed = os.environ.get(ENV + "DEEPSPEED", "0") not in ("", "0")
    return Plan([m for m in MIXERS if m in mixers], sizes, seq, tokens, steps, warmup, deepspeed)


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

    # attn_implementation is a PretrainedConfig keyword that BertConfig's signature does not declare.
    cfg = BertConfig(
        vocab_size=mc.vocab_size, hidden_size=mc.hidden_size, num_hidden_layers=mc.num_layers,
        num_attention_heads=mc.num_heads, intermediate_size=mc.ffn_size, max_position_embeddings=mc.max_position,
        type_vocab_size=mc.type_vocab_size, hidden_dropout_prob=mc.dropout, attention_probs_dropout_prob=mc.dropout,
        layer_norm_eps=mc.layer_norm_eps, initializer_range=mc.initializer_range, pad_token_id=mc.pad_token_id,
        attn_implementation="sdpa",
    )  # type: ignore[call-arg]  # fmt: skip
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


Step = Callable[[dict], None]
Made = Tuple[Step, Callable[[], None], str]  # step(batch), close(), what the step runs (Row.step)
StepFactory = Callable[[RunConfig, torch.nn.Module, int], Made]


def torch_step(run: RunConfig, model: torch.nn.Module, precision: str, compile_model: bool, sparse: bool) -> Made:
    """The plain-torch rows' step: autocast forward, backward, AdamW (fused on CUDA)."""
    device = next(model.parameters()).device
    t = run.train
    opt_kwargs = {"fused": True} if device.type == "cuda" else {}
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(t.adam_betas[0], t.adam_betas[1]),
                                  eps=t.adam_eps, weight_decay=t.weight_decay, **opt_kwargs)  # fmt: skip
    step_model = torch.compile(model) if compile_model else model
    extra = {"sparse_logits": True} if sparse else {}
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def step(batch: dict) -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = step_model(**batch, **extra).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    what = f"torch, {'autocast ' + precision if dtype is not None else 'fp32'}, AdamW{' (fused)' if opt_kwargs else ''}"
    return step, lambda: optimizer.zero_grad(set_to_none=True), what + (", torch.compile" if compile_model else "")


def measure(
    build: Callable[[], torch.nn.Module],
    batch: dict,
    run: RunConfig,
    device: torch.device,
    make_step: Callable[[torch.nn.Module], Made],
    steps: int,
    warmup: int,
) -> tuple[List[float], Optional[int], str]:
    """Per-step wall times (seconds) of `steps` timed training steps, the row's peak memory, and
    what the step ran."""
    memory = PeakMemory(device)
    torch.manual_seed(run.train.seed)
    step, close, what = make_step(build().to(device).train())
    try:
        for _ in range(warmup):
            step(batch)
        sync(device)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            step(batch)
            sync(device)
            times.append(time.perf_counter() - start)
        return times, memory.peak(), what
    finally:
        close()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def run_bench(
    run: RunConfig, plan: Optional[Plan] = None, log=print, trainer_step: Optional[StepFactory] = None
) -> tuple[List[Row], dict]:
    """trainer_step (engine.bench_step.trainer_step, handed in by the CLI): adds a "+deepspeed" row
    per mixer when the plan asks for it (SCALE_HYPER_BENCH_DEEPSPEED=1)."""
    device = pick_device(run.train.device)
    plan = plan or make_plan(device)
    precision = pick_precision(run.deepspeed.precision, device)
    peak = peak_flops(device, precision)
    compile_too = run.train.compile and device.type == "cuda"
    mask_prob = run.data.mask_prob
    rows: List[Row] = []
    # The fused Triton mixer (model.mixer_kernel=triton) gets its own rows where it can run.
    fused = [m for m in plan.mixers if m in ("hyperbert", "hypermixer")] if _fused_kernel_runs(device) else []
    eager = [(m, False, "torch") for m in plan.mixers] + [(m, False, "triton") for m in fused]
    variants = eager + ([(m, True, k) for m, _, k in eager] if compile_too else []) + [(HF, False, "torch")]
    if plan.deepspeed:
        if trainer_step is None:
            raise ValueError(f"{ENV}DEEPSPEED=1 needs the trainer's step: run it as `scale-hyper bench train`")
        variants += [(m, False, DEEPSPEED) for m in plan.mixers]
    for size in plan.sizes:
        for name, compiled, kernel in variants:
            label = name + (f"+{kernel}" if kernel != "torch" else "") + ("+compile" if compiled else "")
            dead = False
            for seq_len in plan.seq_lens[size]:
                batch_size = max(1, plan.tokens_per_step // seq_len)
                row = Row(label, size, seq_len, batch_size)
                rows.append(row)
                if dead:
                    row.status = "skipped"
                    continue
                mc = model_config("bert" if name == HF else name, size, seq_len)
                if kernel == DEEPSPEED:  # the trainer's step: its mixer kernel, its engine
                    assert trainer_step is not None  # checked with the plan
                    mc.mixer_kernel = run.model.mixer_kernel
                    make_step = partial(_deepspeed_step, trainer_step, run, batch_size)
                else:
                    mc.mixer_kernel = kernel
                    make_step = partial(torch_step, run, precision=precision, compile_model=compiled, sparse=name != HF)
                build = (lambda mc=mc: hf_bert(mc)) if name == HF else (lambda mc=mc: build_model(mc, task="mlm"))
                batch = synthetic_batch(mc, batch_size, seq_len, mask_prob, device, run.train.seed)
                try:
                    times, mem, row.step = measure(build, batch, run, device, make_step, plan.steps, plan.warmup)
                except Exception as err:  # noqa: BLE001 - one failing row must not hide the others
                    if not is_oom(err):
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
        "device": device_name(device), "precision": precision, "peak_flops": peak, "mask_prob": mask_prob,
        "tokens_per_step": plan.tokens_per_step, "timed_steps": plan.steps, "warmup_steps": plan.warmup,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d", time.gmtime()),
    }  # fmt: skip
    return rows, meta


def _deepspeed_step(factory: StepFactory, run: RunConfig, batch_size: int, model: torch.nn.Module) -> Made:
    return factory(run, model, batch_size)


def main(run: RunConfig, trainer_step: Optional[StepFactory] = None) -> int:
    device = pick_device(run.train.device)
    try:
        plan = make_plan(device)
    except ValueError as err:
        print(f"scale-hyper bench train: {err}")
        return 2
    print(
        f"# scale-hyper bench train: fwd+bwd+AdamW step on {device_name(device)}; mixers {', '.join(plan.mixers)} "
        f"+ HF BertForMaskedLM (sdpa); sizes {', '.join(plan.sizes)}; seq_len "
        + "; ".join(f"{s}: {','.join(map(str, plan.seq_lens[s]))}" for s in plan.sizes)
        + f"; ~{plan.tokens_per_step:,} tokens/step; median of {plan.steps} steps after {plan.warmup} warm-up"
        f" (narrow with {ENV}MIXERS/SIZES/SEQ/TOKENS/STEPS; see `pydoc scale_hyper.bench.train`)",
        flush=True,
    )
    rows, meta = run_bench(run, plan, log=lambda s: print(s, flush=True), trainer_step=trainer_step)
    print(f"# device {meta['device']}, precision {meta['precision']}, torch {meta['torch']}, {meta['threads']} threads, "
          f"peak {'%.0f TFLOP/s' % (meta['peak_flops'] / 1e12) if meta['peak_flops'] else 'unknown (no MFU)'}")  # fmt: skip
    print(format_table(rows), flush=True)
    path = os.environ.get(ENV + "JSON")
    if path:
        with open(path, "w") as f:
            json.dump({"meta": meta, "rows": [asdict(r) for r in rows]}, f, indent=1)
    return 0 if any(r.status == "ok" for r in rows) else 1
