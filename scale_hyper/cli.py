"""`scale-hyper <verb> [CONFIG ...] [key=value ...]`.

CONFIG is a preset name (`scale-hyper presets`), a YAML file, or a DeepSpeed JSON; `key=value`
overrides any config key. Launcher flags (`--local_rank=N`) are accepted and ignored, so the same
command works under `deepspeed`, `torchrun` and `srun`.

Every import beyond the standard library happens inside the verb that needs it, so `--help`, each
verb's `--help`, `config` and `presets` start without torch, transformers or DeepSpeed
(tests/test_cli_imports.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from typing import Callable, List, Optional


def _run_config(configs: List[str]):
    """The resolved RunConfig (imported here: the config package is not needed for `--help`)."""
    from scale_hyper.config import load_config

    return load_config(configs)


def _writing_config(configs: List[str], verb: str):
    """The RunConfig of a verb that writes; inside the container image its outputs must be on writable
    volumes (scale_hyper/config/volumes.py), checked before anything is written."""
    from scale_hyper.config import volumes

    run = _run_config(configs)
    volumes.check(run, verb)
    return run


def _config(args: argparse.Namespace) -> int:
    from scale_hyper.config import to_yaml

    if args.explain:
        from scale_hyper.config.docs import explain

        print(explain(args.explain))
        return 0
    print(to_yaml(_run_config(args.configs)), end="")
    return 0


def _presets(args: argparse.Namespace) -> int:
    from scale_hyper.config import available_presets

    print("\n".join(available_presets()))
    return 0


def _params(args: argparse.Namespace) -> int:
    from scale_hyper.models import parameter_report

    run = _run_config(args.configs)
    report = parameter_report(run.model)
    if args.json:
        print(json.dumps(report, sort_keys=True))
        return 0
    base = report["baseline_components"]
    print(f"{'component':<14}{run.model.mixer:>14}{'bert':>14}")
    for name, count in report["components"].items():
        if name == "total":
            continue
        print(f"{name:<14}{count:>14,}{base.get(name, 0):>14,}")
    print(f"{'total':<14}{report['total_params']:>14,}{report['baseline_params']:>14,}")
    # The headline total depends on the vocabulary and max_position: show all three deltas.
    print(f"\n{'delta vs bert':<14}{run.model.mixer:>14}{'bert':>14}{'delta':>14}{'%':>9}")
    for group, d in report["deltas"].items():
        print(f"{group:<14}{d['params']:>14,}{d['baseline']:>14,}{d['delta']:>+14,}{d['pct']:>+9.2f}")
    model = run.model
    print(f"(same geometry; vocab_size={model.vocab_size}, max_position={model.max_position})")
    return 0


def _prepare(args: argparse.Namespace) -> int:
    run = _writing_config(args.configs, "prepare")  # before the heavy imports: they write caches
    from scale_hyper.prepare import main as prepare

    step = "plan" if args.plan else "merge" if args.merge else "all"
    return prepare.main(run, args.task, args.tasks, step)


def _train(args: argparse.Namespace) -> int:
    run = _writing_config(args.configs, "train")  # before torch: its import writes caches
    from scale_hyper.engine import train

    return train.main(run)


def _export(args: argparse.Namespace) -> int:
    from scale_hyper.engine import export

    return export.main(args.checkpoint, args.out, args.configs)


def _checkpoint(args: argparse.Namespace) -> int:
    if args.action == "verify":  # no torch, no DeepSpeed: only the files and their manifests
        from scale_hyper.runs import verify_report

        return verify_report.main(args.checkpoint, "sizes" if args.sizes_only else "full")
    from scale_hyper.engine import checkpointer

    return checkpointer.main(args.action, args.checkpoint, args.out)


def _bench(args: argparse.Namespace) -> int:
    run = _run_config(args.configs)
    if args.what == "data":
        from scale_hyper.bench import data

        return data.main(run)
    if args.what == "prepare" and args.files:
        from scale_hyper.bench import small_files

        return small_files.main(run, args.files)
    if args.what == "prepare":
        from scale_hyper.bench import prepare

        return prepare.main(run)
    if args.what == "checkpoint":
        from scale_hyper.bench import checkpoint

        return checkpoint.main(run, args.size_mb)
    from scale_hyper.bench import train
    from scale_hyper.engine.bench_step import trainer_step  # the "+deepspeed" rows: bench does not import engine

    return train.main(run, trainer_step=trainer_step)


def _eval(args: argparse.Namespace) -> int:
    from scale_hyper.evaluation import mlm

    return mlm.main(args.model, args.configs, args.per_batch)


def _glue(args: argparse.Namespace) -> int:
    from scale_hyper.evaluation import glue

    tasks = [a for a in args.configs if a in glue.TASKS]
    configs = [a for a in args.configs if a not in glue.TASKS]
    return glue.main(args.model, tasks, configs, args.out, args.small_task_epochs, args.max_train)


def _transplant(args: argparse.Namespace) -> int:
    from scale_hyper.evaluation import transplant

    if args.configs:
        print("scale-hyper: transplant takes the source's own config; extra arguments ignored", file=sys.stderr)
    return transplant.main(args.source, args.layers, args.out, args.embeddings, args.order, args.seed)


def _report(args: argparse.Namespace) -> int:
    from scale_hyper.evaluation import report

    refs = [a for a in args.refs if "=" not in a]
    return report.main(refs, [a for a in args.refs if "=" in a], args.out)


def _track(args: argparse.Namespace) -> int:
    from scale_hyper.evaluation import track_sync

    return track_sync.main(args.run_dir, args.configs, args.run_id, args.dry_run)


def _doctor(args: argparse.Namespace) -> int:
    run = _writing_config(args.configs, "doctor")  # before torch: its import writes caches
    from scale_hyper.doctor import main as doctor

    return doctor.main(run, args.configs, args.checks, args.json, args.steps, args.join_timeout)


def _plan(args: argparse.Namespace) -> int:
    from scale_hyper.engine import planner

    return planner.main(_run_config(args.configs), args.gpus, args.gpu, args.gpu_mem, args.mfu, args.json)


def _sweep(args: argparse.Namespace) -> int:
    from scale_hyper.sweep import main as sweep

    return sweep.main(args.spec, args.configs, args.backend, args.dry_run, args.max_runs, args.report, args.status)


def _with_configs(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("configs", nargs="*", metavar="CONFIG|key=value", help="presets, YAML/JSON files, overrides")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scale-hyper", description=__doc__.split("\n\n")[0])
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    def verb(name: str, fn: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        p = verbs.add_parser(name, help=help)
        p.set_defaults(fn=fn)
        return p

    p = _with_configs(verb("config", _config, "print the resolved configuration as YAML"))
    p.add_argument("--explain", metavar="KEY", help="a key's type, default, allowed values and description")
    verb("presets", _presets, "list the built-in presets")
    p = _with_configs(
        verb("params", _params, "parameters by component; total, non-embedding and mixing deltas against BERT")
    )
    p.add_argument("--json", action="store_true", help="one JSON object (total_params, baseline_params, ...)")
    p = _with_configs(verb("prepare", _prepare, "corpus -> tokenizer -> packed WebDataset shards"))
    p.add_argument("--task", type=int, default=None, metavar="I", help="this task's index (0-based) of --tasks")
    p.add_argument("--tasks", type=int, default=None, metavar="N",
                   help="run one of N tasks: its slices only, then merge if it finished last "
                   "(default: a SLURM job array's or srun step's, else 1 = everything)")  # fmt: skip
    g = p.add_mutually_exclusive_group()
    g.add_argument("--plan", action="store_true", help="only the first step: tokenizer and slice list")
    g.add_argument("--merge", action="store_true", help="only the last step: check the slices, write manifest.json")
    _with_configs(verb("train", _train, "train with DeepSpeed (no arguments: the embedded tiny job)"))
    p = verb("export", _export, "write a Hugging Face directory from a training checkpoint")
    p.add_argument("checkpoint", help="checkpoint directory (runs/x/checkpoints/step_N) or run output_dir")
    p.add_argument("out", help="output directory")
    _with_configs(p)
    p = verb("checkpoint", _checkpoint, "checkpoint tools: verify against the manifests, convert to universal")
    p.add_argument("action", choices=["verify", "universal"],
                   help="verify: each checkpoint intact / damaged (file, size, checksum) / unverifiable, exit 1 if "
                   "one is damaged; universal: convert for resuming at another world size")  # fmt: skip
    p.add_argument("checkpoint", help="checkpoint directory (verify: also a run directory: all its checkpoints)")
    p.add_argument("--out", default=None, help="universal: output directory (default: CHECKPOINT_universal)")
    p.add_argument("--sizes-only", action="store_true", help="verify: file sizes only, no checksums (fast)")
    p = verb("bench", _bench, "benchmarks that print figures")
    p.add_argument("what", choices=["data", "prepare", "train", "checkpoint"])
    p.add_argument("--files", type=int, default=0, metavar="N",
                   help="prepare: N small files of the embedded corpus against the same text as one file")  # fmt: skip
    p.add_argument("--size-mb", type=int, default=1024, metavar="N",
                   help="checkpoint: MiB of files to write and verify under train.output_dir (default 1024)")  # fmt: skip
    _with_configs(p)
    p = verb("eval", _eval, "MLM loss, perplexity and accuracy on validation shards")
    p.add_argument("model", help="checkpoint (runs/x/checkpoints/step_N), run output_dir, or Hugging Face directory")
    p.add_argument("--per-batch", default=None, metavar="PATH", help="also write each batch's loss to this JSON file")
    _with_configs(p)
    p = verb("glue", _glue, "fine-tune and score GLUE tasks (median over seeds, best lr)")
    p.add_argument("model", help="checkpoint, run output_dir, or Hugging Face directory (ours or a stock BERT)")
    p.add_argument(
        "configs",
        nargs="*",
        metavar="TASK|CONFIG|key=value",
        help="tasks (default eval.glue_tasks), configs, overrides",
    )
    p.add_argument("--out", default=None, help="results directory (default glue_results/MODEL)")
    p.add_argument("--small-task-epochs", type=int, default=10, help="epochs for rte/mrpc/stsb (0: eval.epochs)")
    p.add_argument("--max-train", type=int, default=0, help="use only the first N training examples (smoke runs)")
    p = verb("transplant", _transplant, "build a deeper model from a trained one at a fixed mixing-parameter budget")
    p.add_argument("source", help="checkpoint, run output_dir, or our Hugging Face export")
    p.add_argument("--layers", type=int, required=True, help="depth of the new model")
    p.add_argument("--out", default=None, help="output Hugging Face directory")
    p.add_argument(
        "--embeddings",
        choices=["cycle", "interpolate", "fresh"],
        default="cycle",
        help="hyperbert: new layer embeddings",
    )
    p.add_argument(
        "--order", choices=["cycle", "stretch"], default="cycle", help="layer i <- trained layer i mod L | i*L//N"
    )
    p.add_argument("--seed", type=int, default=0)
    _with_configs(p)
    p = _with_configs(verb("plan", _plan, "per-GPU memory by ZeRO stage, largest micro batch, step time, days"))
    p.add_argument("--gpus", type=int, required=True, help="world size: GPUs in the job")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--gpu", default=None, help="h100-sxm (default; h100), h100-pcie, h200, a100-40, a100-80, l40s")
    g.add_argument("--gpu-mem", type=float, default=None, metavar="GiB", help="any GPU, by its memory")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation for step time (default 0.4)")
    p.add_argument("--json", action="store_true", help="every figure as one JSON object")
    p = verb("report", _report, "plots and a table from MLflow runs")
    p.add_argument(
        "refs", nargs="+", metavar="RUN_ID|EXPERIMENT|key=value", help="runs or experiments; tracking.uri=..."
    )
    p.add_argument("--out", default=None, help="output directory (default ./report)")
    p = verb("track", _track, "MLflow tools: sync a run directory's metrics.jsonl into its MLflow run")
    p.add_argument("action", choices=["sync"], help="sync: log the metric points MLflow lacks (idempotent)")
    p.add_argument("run_dir", help="the run's train.output_dir (its metrics.jsonl and newest checkpoint)")
    p.add_argument("--run-id", default=None, help="MLflow run id (default: from the newest checkpoint)")
    p.add_argument("--dry-run", action="store_true", help="only count what is missing")
    _with_configs(p)
    p = verb("sweep", _sweep, "a grid of runs from a spec: plan, run locally or on SLURM (resumable), report")
    p.add_argument("spec", metavar="SPEC.yaml", help="the sweep spec (sweeps/*.yaml)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--local", dest="backend", action="store_const", const="local", help="run here, one after another")
    g.add_argument("--slurm", dest="backend", action="store_const", const="slurm", help="submit dependent jobs")
    g.add_argument("--report", action="store_true", help="only write the report of what has finished")
    g.add_argument("--status", action="store_true", help="only print each run's state")
    p.add_argument("--dry-run", action="store_true", help="print the plan (runs, tokens, GPU-hours); start nothing")
    p.add_argument("--max-runs", type=int, default=None, metavar="N", help="refuse a grid of more than N runs")
    _with_configs(p)
    p = _with_configs(verb("doctor", _doctor, "is this cluster ready? environment, collectives, kernels, a short run"))
    p.add_argument("--checks", default=None, metavar="A,B", help="only these checks (default all): "
                   "environment,collectives,kernels,sdpa,storage,training,resume")  # fmt: skip
    p.add_argument("--json", default=None, metavar="PATH", help="also write the table as JSON (rank 0)")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps of the training check (saved half-way)")
    p.add_argument("--join-timeout", type=float, default=90.0, metavar="S",
                   help="seconds every rank has to reach the rendezvous (a missing rank is named)")  # fmt: skip
    return parser


APPEND_ENV = "SCALE_HYPER_APPEND"


def _append_from_env(args: argparse.Namespace) -> None:
    """``SCALE_HYPER_APPEND='key=value ...'``: CONFIG arguments appended to every verb that takes them, after
    the command's own, so they win (a site or CI overlay; the docs test shrinks every documented command
    with it, CONTRIBUTING.md). Said on stderr, so a log shows what ran."""
    extra = shlex.split(os.environ.get(APPEND_ENV, ""))
    if extra and isinstance(getattr(args, "configs", None), list) and args.verb != "transplant":
        args.configs = [*args.configs, *extra]
        print(f"scale-hyper: {APPEND_ENV} appends: {' '.join(extra)}", file=sys.stderr)


def main(argv: Optional[List[str]] = None) -> int:
    # The deepspeed launcher appends --local_rank (after the verb's arguments): drop it wherever it is.
    argv = sys.argv[1:] if argv is None else argv
    if any(a.startswith("--local") for a in argv):
        from scale_hyper.config.loading import split_args

        argv = split_args(argv)
    args = build_parser().parse_args(argv)
    _append_from_env(args)
    from scale_hyper.config import errors  # after parsing: `--help` has exited by now

    try:
        return args.fn(args)
    except Exception as err:  # user errors: one line, exit 2; internal errors keep their traceback
        if errors.is_user_error(err):
            return errors.report(err)
        raise


def run() -> None:
    """The process entry (the ``scale-hyper`` script, ``python -m scale_hyper``): ``main``, then exit.
    A rank of a multi-rank launch (train, doctor, eval under torchrun/srun/deepspeed) leaves without
    the interpreter's teardown (``scale_hyper/launch/leave.py``)."""
    code = main()
    if "torch.distributed" in sys.modules and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from scale_hyper.launch.leave import leave_now

        leave_now(code)
    raise SystemExit(code)
