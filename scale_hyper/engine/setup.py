"""Building a training run, in named phases: data → model → DeepSpeed → residency → restore →
tracking. Each phase is one function; ``build`` runs them in order and returns the components the
loop uses (``Trainer``)."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from scale_hyper import runs
from scale_hyper.config import RunConfig, to_yaml
from scale_hyper.engine import ds_config, fit, init_from, offload, partitioned, resume
from scale_hyper.engine.checkpointer import Checkpointer
from scale_hyper.engine.distributed import DistInfo, all_groups_wait
from scale_hyper.engine.evaluator import Evaluator
from scale_hyper.engine.progress import log
from scale_hyper.engine.reporter import Reporter
from scale_hyper.engine.residency import resident_since_construction
from scale_hyper.engine.state import TrainState
from scale_hyper.engine.watchdog import guard_plain_optimizer
from scale_hyper.models.flops import peak_flops, train_flops_per_token


@dataclass
class Trainer:
    """The components the loop calls, each with one job."""

    run: RunConfig
    info: DistInfo
    engine: Any  # DeepSpeed's engine
    loader: Any  # this rank's training batches; its state_dict() is the data cursor
    state: TrainState
    checkpointer: Checkpointer
    evaluator: Evaluator
    reporter: Reporter
    tracker: Any


def prepare_data(run: RunConfig, info: DistInfo) -> Dict[str, Any]:
    """Phase 1: the shards exist (rank 0 tokenizes, the others wait) and fit the model."""
    from scale_hyper.data import check_vocab
    from scale_hyper.prepare import ensure_prepared

    for change in init_from.adopt_geometry(run):  # train.init_from: the weights decide the architecture
        log(info, f"init_from {run.train.init_from}: {change}")
    if run.data.mixture:  # prepared sources only; the first one's manifest stands for the run (tokenizer, val)
        from scale_hyper.data.mixture import load_sources

        manifest = load_sources(run.data)[0]
        shares = ", ".join(f"{m.output} × {m.weight:g}" for m in run.data.mixture)
        log(info, f"data: mixture of {shares}; validation on {run.data.mixture[0].output}")
        check_vocab(manifest, run.model.vocab_size)
        if run.train.init_from:
            init_from.check_tokenizer(run, manifest)
        return manifest
    if info.is_main:
        manifest = ensure_prepared(run.data, seed=run.train.seed)
    dist.barrier()
    if not info.is_main:
        manifest = ensure_prepared(run.data, seed=run.train.seed)
    check_vocab(manifest, run.model.vocab_size)
    if run.train.init_from:
        init_from.check_tokenizer(run, manifest)
    return manifest


def build_model(run: RunConfig, info: DistInfo, ckpt: Optional[Path]) -> torch.nn.Module:
    """Phase 2: the same initial weights on every rank (or init_from's, for a new run). Under ZeRO-3 the
    model is built partitioned, its shared modules whole on every rank (``partitioned.py``)."""
    from scale_hyper.models import build_model as build

    ds = ds_config.build(run, info.world_size, info.device)
    fit.check(run, info, ds)  # before any allocation: a model that cannot fit even fully partitioned
    offload.ensure_ops(
        ds
    )  # cpu_adam / async_io (zero.Init swaps to NVMe already) built, or one line naming what is missing
    if ckpt is not None:
        init_from.check_resume_geometry(run, ckpt)
    torch.manual_seed(run.train.seed)
    # init_from's weights are loaded before deepspeed.initialize (into the partitions, under zero_init)
    weights = run.train.init_from if ckpt is None else None
    with fit.building(run):
        model, loaded = partitioned.build(
            run, ds, lambda: build(run.model, task="mlm"), weights, run.train.verify_checkpoint
        )
    if loaded:
        log(info, f"initialised from {loaded}")
    if run.train.activation_checkpointing == "non_reentrant":
        model.set_activation_checkpointing(True)
    if partitioned.is_partitioned(model):
        held = partitioned.held_numel(model)
        how = "partitioned (deepspeed.zero.Init)" if run.deepspeed.zero_init else "whole, then split"
        log(info, f"model: built {how} over {info.world_size} rank(s): {held['total']:,} parameters; this rank "
                  f"holds {held['partition']:,} in its partition and {held['gathered']:,} whole (shared modules)")  # fmt: skip
    return model


def param_groups(model: torch.nn.Module, weight_decay: float, decay_embeddings: bool) -> List[Dict[str, Any]]:
    """AdamW groups: no decay on norms and biases (nor on embeddings unless configured)."""
    from scale_hyper.models.params import decay_groups

    return decay_groups(model, weight_decay, decay_embeddings)


def start_deepspeed(run: RunConfig, info: DistInfo, model: torch.nn.Module, ckpt: Optional[Path]) -> tuple:
    """Phase 3: the DeepSpeed engine, and the guard its optimizer lacks in ZeRO-0 fp32."""
    import deepspeed

    ds = ds_config.build(run, info.world_size, info.device)
    if ckpt is not None and runs.read_state(ckpt).get("universal"):
        ds["checkpoint"] = {"load_universal": True}
    groups = param_groups(model, run.train.weight_decay, run.train.decay_embeddings)
    with partitioned.registering_persistent():  # the shared modules, persistent since construction
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=ds)
    all_groups_wait(run.train.dist_timeout_minutes)  # its groups were made with torch's default timeout
    if not hasattr(engine.optimizer, "overflow"):  # ZeRO-0 fp32: a plain torch optimizer
        guard_plain_optimizer(engine.optimizer)
    return engine, ds


def keep_shared_resident(run: RunConfig, engine: Any, model: Any) -> List[Any]:
    """Phase 4: under ZeRO-3 the shared hypernetwork (and shared mixers) are whole on every rank since
    construction (``partitioned.build``); this checks that DeepSpeed kept them so."""
    resident = resident_since_construction(engine, model.shared_modules()) if run.deepspeed.hypernet_resident else []
    if run.train.compile:  # DeepSpeed's entry point: compiles the module in place, parameter names unchanged
        engine.compile()
    return resident


def restore(checkpointer: Checkpointer, ckpt: Optional[Path], info: DistInfo) -> Dict[str, Any]:
    """Phase 5: model, optimizer, schedule, RNG and trainer state from the checkpoint, if any."""
    if ckpt is None:
        return {}
    saved = checkpointer.restore(ckpt)
    log(info, f"resumed from {ckpt} at step {saved['step']}")
    return saved


def _cursor_for(saved: Dict[str, Any], info: DistInfo) -> Optional[Dict[str, Any]]:
    cursors = saved.get("data_cursors")
    if not cursors:
        return None
    if len(cursors) == info.world_size:
        return cursors[info.rank]
    from scale_hyper.data import resplit_cursor  # universal resume: re-split from the global position

    return resplit_cursor(cursors, rank=info.rank, world_size=info.world_size)


def start_tracking(
    run: RunConfig, info: DistInfo, ds: Dict[str, Any], resident: List[Any], saved: Dict[str, Any]
) -> Any:
    """Phase 6: the MLflow run (resumed when the checkpoint names one), with config and versions."""
    from scale_hyper.tracking import TrackingError, start_tracker

    extra = {
        "world_size": info.world_size,
        "git_commit": _git_commit(),
        "resident_hypernet_params": sum(p.ds_numel for p in resident),
        **_versions(),
        **_flat(ds, "ds_config."),
    }
    failure = None
    try:
        tracker = start_tracker(run, rank=info.rank, resume_run_id=saved.get("mlflow_run_id"), extra_params=extra)
    except TrackingError as err:  # rank 0 only: every rank stops with this line (exit 2), none with "a rank died"
        failure = str(err)
    if info.world_size > 1:
        box = [failure]
        dist.broadcast_object_list(box, src=0)
        failure = box[0]
    if failure is not None:
        raise TrackingError(failure)
    tracker.log_text(to_yaml(run), "config.yaml")
    if info.is_main:  # the run directory carries the resolved config of its newest invocation
        config_file = runs.RunDir(run.train.output_dir).config
        config_file.parent.mkdir(parents=True, exist_ok=True)
        config_file.write_text(to_yaml(run))
    tracker.log_text(json.dumps(ds, indent=1), "ds_config.json")
    return tracker


def build(run: RunConfig, info: DistInfo) -> Trainer:
    from scale_hyper.data import train_loader, val_loader

    t = run.train
    # before any work: the batch split (refused when the world size cannot divide it) and the resume's recipe
    micro, _, global_batch = ds_config.batch_arithmetic(run, info.world_size)
    choice = resume.choose(t.resume, t.output_dir, info.world_size, t.verify_checkpoint, info)  # verified
    ckpt = choice.ckpt
    if ckpt is not None:
        resume.check_world_size(ckpt, info.world_size)
        resume.check_recipe(ckpt, run, global_batch)
    resume.announce(choice, info)  # damaged ones passed over: one line each, set aside
    log(info, ds_config.describe_batch(run, info.world_size))
    manifest = prepare_data(run, info)
    model = build_model(run, info, ckpt)
    engine, ds = start_deepspeed(run, info, model, ckpt)
    resident = keep_shared_resident(run, engine, model)
    torch.manual_seed(t.seed + 1000 * info.rank)  # dropout differs across ranks
    checkpointer = Checkpointer(run, engine, None, info, None)
    checkpointer.preflight()  # warns when train.output_dir cannot hold keep + 1 checkpoints
    saved = restore(checkpointer, ckpt, info)
    tracker = start_tracking(run, info, ds, resident, saved)
    loader = train_loader(run.data, manifest, seed=t.seed, rank=info.rank, world_size=info.world_size,
                          micro_batch_size=micro, state=_cursor_for(saved, info))  # fmt: skip
    checkpointer.loader, checkpointer.tracker = loader, tracker
    validation = val_loader(run.data, manifest, rank=info.rank, world_size=info.world_size,
                            micro_batch_size=micro, max_batches=t.eval_batches)  # fmt: skip
    precision = ds_config.precision_of(ds)
    reporter = Reporter(run, info, engine, tracker, train_flops_per_token(run.model, run.data.seq_len, run.data.mask_prob),
                        peak_flops(info.device, precision))  # fmt: skip
    log(info, f"world {info.world_size} (rank {info.rank}, local {info.local_rank}, master {info.master}), "
              f"device {info.device.type}, ZeRO-{ds_config.zero_stage(ds)}, {precision}, "
              f"{sum(getattr(p, 'ds_numel', p.numel()) for p in model.parameters()):,} parameters, {len(resident)} resident shared tensors")  # fmt: skip
    return Trainer(run, info, engine, loader, TrainState.from_dict(saved), checkpointer,
                   Evaluator(engine, validation, info.device), reporter, tracker)  # fmt: skip


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
