"""Everything the training loop needs, built once: data, model, DeepSpeed engine, residency,
resume, tracking. Also what happens around the loop: checkpoint saves, evaluation, the finish."""

from __future__ import annotations

import importlib.metadata
import json
import math
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

import torch
import torch.distributed as dist

from scale_hyper.config import RunConfig, to_yaml
from scale_hyper.engine import checkpoint, ds_config, init_from
from scale_hyper.engine.distributed import DistInfo
from scale_hyper.engine.flops import peak_flops, train_flops_per_token
from scale_hyper.engine.progress import log, memory_mb
from scale_hyper.engine.residency import keep_resident


def to_device(batch: Dict[str, torch.Tensor], device: torch.device) -> Dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def param_groups(model: torch.nn.Module, weight_decay: float, decay_embeddings: bool) -> List[Dict[str, Any]]:
    """AdamW groups: no decay on norms and biases (nor on embeddings unless configured)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_embedding = "embed" in name or "position" in name
        skip = p.ndim < 2 or "norm" in name.lower() or (is_embedding and not decay_embeddings)
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def _versions() -> Dict[str, str]:
    out = {}
    for pkg in ("torch", "deepspeed", "transformers", "webdataset", "omegaconf", "scale-hyper"):
        try:
            out[f"version.{pkg}"] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[f"version.{pkg}"] = "not installed"
    return out


def _flat(d: Dict[str, Any], prefix: str) -> Dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@dataclass
class Context:
    run: RunConfig
    info: DistInfo
    engine: Any
    loader: Any
    val_loader: Iterable
    tracker: Any
    start_step: int = 0
    skipped: int = 0
    loss_sum: float = 0.0
    loss_n: int = 0
    val_before: Optional[Dict[str, float]] = None
    last_saved: int = -1
    flops_per_token: float = 0.0
    peak: Optional[float] = None
    started: float = field(default_factory=time.perf_counter)

    # ---------------------------------------------------------------- setup
    @classmethod
    def build(cls, run: RunConfig, info: DistInfo) -> Context:
        import deepspeed

        from scale_hyper.data import check_vocab, ensure_prepared, train_loader, val_loader
        from scale_hyper.engine.tracking import start_tracker
        from scale_hyper.models import build_model

        t = run.train
        for change in init_from.adopt_geometry(run):  # train.init_from: the weights decide the architecture
            log(info, f"init_from {t.init_from}: {change}")
        if info.is_main:  # one rank tokenizes; the others wait, then read the manifest
            manifest = ensure_prepared(run.data, seed=t.seed)
        dist.barrier()
        if not info.is_main:
            manifest = ensure_prepared(run.data, seed=t.seed)
        check_vocab(manifest, run.model.vocab_size)
        if t.init_from:
            init_from.check_tokenizer(run, manifest)

        torch.manual_seed(t.seed)  # identical initial weights on every rank
        model = build_model(run.model, task="mlm")
        if t.activation_checkpointing == "non_reentrant":
            model.set_activation_checkpointing(True)
        ckpt = checkpoint.resolve_resume(t.resume, t.output_dir, info.world_size)
        if ckpt is not None:
            checkpoint.check_world_size(ckpt, info.world_size)
        elif t.init_from:  # before deepspeed.initialize: ZeRO-3 partitions what is loaded here
            log(info, f"initialised from {init_from.load_weights(model, t.init_from)}")
        ds = ds_config.build(run, info.world_size, info.device)
        if ckpt is not None and checkpoint.read_state(ckpt).get("universal"):
            ds["checkpoint"] = {"load_universal": True}
        engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, t.weight_decay, t.decay_embeddings), config=ds
        )
        resident = keep_resident(engine, model.shared_modules()) if run.deepspeed.hypernet_resident else []
        if t.compile:  # DeepSpeed's entry point: compiles the module in place, parameter names unchanged
            engine.compile()
        torch.manual_seed(t.seed + 1000 * info.rank)  # dropout differs across ranks

        state: Dict[str, Any] = {}
        if ckpt is not None:
            state = checkpoint.load(engine, ckpt, info.rank)
            log(info, f"resumed from {ckpt} at step {state['step']}")
        cursor = cls._cursor_for(state, info)

        precision = ds_config.precision_of(ds)
        extra = {
            "world_size": info.world_size,
            "git_commit": _git_commit(),
            "resident_hypernet_params": sum(p.ds_numel for p in resident),
            **_versions(),
            **_flat(ds, "ds_config."),
        }
        tracker = start_tracker(run, rank=info.rank, resume_run_id=state.get("mlflow_run_id"), extra_params=extra)
        tracker.log_text(to_yaml(run), "config.yaml")
        tracker.log_text(json.dumps(ds, indent=1), "ds_config.json")
        ctx = cls(
            run=run,
            info=info,
            engine=engine,
            loader=train_loader(
                run.data, manifest, seed=t.seed, rank=info.rank, world_size=info.world_size,
                micro_batch_size=t.micro_batch_size, state=cursor,
            ),  # fmt: skip
            val_loader=val_loader(
                run.data, manifest, rank=info.rank, world_size=info.world_size,
                micro_batch_size=t.micro_batch_size, max_batches=t.eval_batches,
            ),  # fmt: skip
            tracker=tracker,
            start_step=int(state.get("step", 0)),
            skipped=int(state.get("skipped", 0)),
            val_before=state.get("val_before"),
            last_saved=int(state.get("step", -1)),
            flops_per_token=train_flops_per_token(run.model, run.data.seq_len, run.data.mask_prob),
            peak=peak_flops(info.device, precision),
        )
        log(info, f"world {info.world_size} (rank {info.rank}, local {info.local_rank}, master {info.master}), "
                  f"device {info.device.type}, ZeRO-{ds_config.zero_stage(ds)}, {precision}, "
                  f"{sum(p.numel() for p in model.parameters()):,} parameters, {len(resident)} resident hypernetwork tensors")  # fmt: skip
        if info.world_size > 1:
            ctx.start_heartbeat()
        if ctx.val_before is None:
            ctx.val_before = ctx.evaluate()
            ctx.record(ctx.val_before, 0)
        return ctx

    @staticmethod
    def _cursor_for(state: Dict[str, Any], info: DistInfo) -> Optional[Dict[str, Any]]:
        cursors = state.get("data_cursors")
        if not cursors:
            return None
        if len(cursors) == info.world_size:
            return cursors[info.rank]
        # Universal resume at another world size: the data layer re-splits from the global position.
        from scale_hyper.data import resplit_cursor

        return resplit_cursor(cursors, rank=info.rank, world_size=info.world_size)

    # ---------------------------------------------------------------- per step
    def all_finite(self, loss: torch.Tensor) -> bool:
        bad = torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0], device=self.info.device)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return bad.item() == 0.0

    def record(self, metrics: Dict[str, float], step: int) -> None:
        """Metrics to MLflow and, for reading without MLflow, to {output_dir}/metrics.jsonl (rank 0)."""
        self.tracker.log_metrics(metrics, step=step)
        if self.info.is_main:
            path = Path(self.run.train.output_dir) / "metrics.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")

    def step_metrics(self, tokens_per_s: float) -> Dict[str, float]:
        """Called on every rank at log steps: the loss is averaged over ranks and micro-batches."""
        total = torch.tensor([self.loss_sum, float(self.loss_n)], dtype=torch.float64, device=self.info.device)
        dist.all_reduce(total)
        loss = (total[0] / total[1].clamp(min=1)).item()
        self.loss_sum, self.loss_n = 0.0, 0
        grad_norm = self.engine.get_global_grad_norm()
        metrics = {
            "loss": loss,
            "lr": float(self.engine.get_lr()[0]),
            "tokens_per_s": tokens_per_s,
            "samples_per_s": tokens_per_s / self.run.data.seq_len,
            "skipped_steps": float(self.skipped),
        }
        if grad_norm is not None and math.isfinite(float(grad_norm)):
            metrics["grad_norm"] = float(grad_norm)
        if self.peak:
            metrics["mfu"] = tokens_per_s * self.flops_per_token / (self.peak * self.info.world_size)
        mem = memory_mb(self.info.device)
        if mem is not None:
            metrics["memory_mb"] = mem
        return metrics

    def evaluate(self) -> Dict[str, float]:
        """MLM loss (mean over masked tokens) and accuracy on the validation shards, over all ranks."""
        engine, device = self.engine, self.info.device
        engine.eval()
        totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss·n, correct, n
        with torch.no_grad():
            for batch in self.val_loader:
                batch = to_device(batch, device)
                out = engine(**batch, sparse_logits=True)
                targets = batch["labels"][batch["labels"] != -100]
                n = targets.numel()
                correct = (out.logits.argmax(-1) == targets).sum()
                totals += torch.stack(
                    [out.loss.double() * n, correct.double(), torch.tensor(n, dtype=torch.float64, device=device)]
                )
        dist.all_reduce(totals)
        engine.train()
        n = max(totals[2].item(), 1.0)
        return {"val_loss": totals[0].item() / n, "val_accuracy": totals[1].item() / n}

    def save(self, step: int) -> Path:
        cursors: List[Any] = [None] * self.info.world_size
        dist.all_gather_object(cursors, self.loader.state_dict())
        state = {
            "step": step,
            "world_size": self.info.world_size,
            "data_cursors": cursors,
            "mlflow_run_id": self.tracker.run_id,
            "skipped": self.skipped,
            "val_before": self.val_before,
            "config_yaml": to_yaml(self.run),
            "data_output": self.run.data.output,
        }
        ckpt = checkpoint.save(
            self.engine, self.run.train.output_dir, step, self.info.rank, state, self.run.train.keep_checkpoints
        )
        self.last_saved = step
        log(self.info, f"checkpoint saved: {ckpt}")
        return ckpt

    # ---------------------------------------------------------------- fault diagnosis
    _HEARTBEAT, _BEAT_S = "scale_hyper/heartbeat/", 5.0

    def start_heartbeat(self) -> None:
        """A daemon thread records 'alive at T' in the rendezvous store every few seconds. Ranks blocked
        in a collective keep beating (the GIL is released there); a dead rank stops, so the survivors
        can name it when their collective times out."""
        import threading

        def beat() -> None:
            key = self._HEARTBEAT + str(self.info.rank)
            while True:
                try:
                    dist.distributed_c10d._get_default_store().set(key, repr(time.time()))
                except Exception:  # diagnostics only: never disturb training
                    return
                time.sleep(self._BEAT_S)

        threading.Thread(target=beat, name="scale-hyper-heartbeat", daemon=True).start()

    def silent_ranks(self) -> List[int]:
        """Other ranks whose heartbeat stopped advancing (best effort: the store lives with rank 0)."""
        try:
            store = dist.distributed_c10d._get_default_store()
            keys = {r: self._HEARTBEAT + str(r) for r in range(self.info.world_size) if r != self.info.rank}

            def read() -> Dict[int, bytes]:
                return {r: store.get(k) if store.check([k]) else b"" for r, k in keys.items()}

            first = read()
            time.sleep(2.5 * self._BEAT_S)  # a live rank beats at least twice in this window
            second = read()
        except Exception:
            return []
        return [r for r in keys if first[r] == second[r]]

    # ---------------------------------------------------------------- the end
    def finish(self, step: int) -> str:
        ckpt = (
            self.save(step)
            if self.last_saved != step
            else checkpoint.checkpoint_root(self.run.train.output_dir) / f"step_{step}"
        )
        after = self.evaluate()
        self.record(after, step)
        export_dir = None
        if self.run.train.export:
            dist.barrier()
            export_dir = Path(self.run.train.output_dir) / "hf"
            if self.info.is_main:
                from scale_hyper.engine.export import export_checkpoint

                export_checkpoint(ckpt, export_dir)
            dist.barrier()
        self.tracker.finish("FINISHED")
        before = self.val_before or {}
        lines = [
            "",
            "=== scale-hyper: training finished ===",
            f"steps           {step} (skipped non-finite: {self.skipped}), {time.perf_counter() - self.started:.0f} s",
            f"val MLM loss    {before.get('val_loss', float('nan')):.4f} -> {after['val_loss']:.4f} "
            f"(accuracy {before.get('val_accuracy', float('nan')):.3f} -> {after['val_accuracy']:.3f})",
            f"checkpoint      {ckpt}",
            f"export (HF)     {export_dir or 'disabled (train.export=false)'}",
            f"MLflow run      {self.tracker.run_id or 'tracking disabled'}  ({getattr(self.tracker, 'display_uri', '')})",
            f"MLflow UI       {self.tracker.ui_hint}" if self.tracker.run_id else "",
        ]
        return "\n".join(line for line in lines if line is not None)
