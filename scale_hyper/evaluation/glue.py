"""`scale-hyper glue MODEL [tasks ...] [key=value ...]`: fine-tune and score GLUE on one device.

Protocol (models.md, "Evaluation protocol"): dev sets, every lr in ``eval.lrs`` × every seed in
``eval.seeds``; a task's score at one lr is the MEDIAN over seeds; the reported score is the best
lr by that median. Multi-metric tasks score the mean of their metrics (MRPC/QQP: F1 and accuracy;
STS-B: Pearson and Spearman); MNLI's score is the mean of matched and mismatched accuracy. The
GLUE average is the unweighted mean of the task scores (WNLI is not run). ``eval.epochs`` epochs,
except RTE/MRPC/STS-B, which get ``--small-task-epochs`` (10 by default; 0 = ``eval.epochs`` too).

Data (``glue_data``: the task table and its readers): ``eval.glue_dir`` in GLUE's own TSV layout
(``SST-2/train.tsv``, ``SST-2/dev.tsv``, ``MNLI/dev_matched.tsv`` ...), or Hugging Face ``datasets``
("nyu-mll/glue") when it is unset.
Models: our checkpoints / exports (every mixer) and stock Hugging Face encoders (BERT etc.) through
AutoModelForSequenceClassification. Plain torch loop, AdamW, 6 % warm-up then linear decay.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from scale_hyper import runs as sources
from scale_hyper.evaluation import metrics as M
from scale_hyper.evaluation.glue_data import TASKS, Example, Task, load_task
from scale_hyper.runs.manifest import mode_from_args

SMALL_TASKS = ("rte", "mrpc", "stsb")


# ----------------------------------------------------------------------------------------- model


@dataclass
class ModelFactory:
    """Builds a fresh sequence classifier (new head) for each fine-tuning run."""

    src: sources.ModelSource
    tokenizer: object
    max_length: int
    _state: Optional[Dict[str, torch.Tensor]] = field(default=None, repr=False)

    @classmethod
    def from_path(cls, path: str, args: Sequence[str] = ()) -> ModelFactory:
        src = sources.resolve(path, mode_from_args(args))
        run = sources.run_config(src, args) if src.kind == "checkpoint" else None
        tok = sources.load_tokenizer_for(src, run)
        if src.kind == "checkpoint":
            max_pos = src.run.model.max_position
        else:
            cfg = src.config_dict
            max_pos = cfg.get("max_position", cfg.get("max_position_embeddings", 512))
        return cls(src, tok, min(128, int(max_pos)))

    def build(self, task: Task) -> torch.nn.Module:
        kwargs = {"num_labels": task.num_labels,
                  "problem_type": "regression" if task.regression else "single_label_classification"}  # fmt: skip
        if self.src.kind == "checkpoint":
            from scale_hyper.models import build_model

            model = build_model(self.src.run.model, task="cls", **kwargs)
            if self._state is None:
                self._state = sources.consolidated_state_dict(self.src.path)
            backbone = {k: v for k, v in self._state.items() if k.startswith("model.")}
            sources.load_strict(model, backbone, self.src.path, fresh=["classification_head."])
            return model
        from transformers import AutoModelForSequenceClassification
        from transformers.utils import logging as hf_logging

        import scale_hyper.models  # noqa: F401  (registers model_type scale_hyper)

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # "newly initialized classifier" is the point here
        try:
            return AutoModelForSequenceClassification.from_pretrained(self.src.path, **kwargs)
        finally:
            hf_logging.set_verbosity(verbosity)

    def encode(self, examples: Sequence[Example]) -> Dict[str, torch.Tensor]:
        texts = list(zip(*[e[0] for e in examples], strict=True))
        enc = self.tokenizer(*[list(t) for t in texts], truncation=True, max_length=self.max_length,
                             padding=True, return_tensors="pt")  # fmt: skip
        keep = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
        return keep


# ----------------------------------------------------------------------------------------- train / score


def _batches(n: int, size: int, generator: Optional[torch.Generator]) -> List[torch.Tensor]:
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    return list(order.split(size))


def _labels(task: Task, examples: Sequence[Example], idx: torch.Tensor) -> torch.Tensor:
    values = [examples[i][1] for i in idx.tolist()]
    return torch.tensor(values, dtype=torch.float32) if task.regression else torch.tensor(values, dtype=torch.long)


def fine_tune(factory: ModelFactory, task: Task, train: List[Example], devs: Dict[str, List[Example]], *,
              lr: float, seed: int, batch_size: int, epochs: int, device: str = "cpu",
              warmup_ratio: float = 0.06, weight_decay: float = 0.01) -> Dict[str, object]:  # fmt: skip
    """One fine-tuning run: returns its dev metrics, per-epoch mean training loss and the task score."""
    torch.manual_seed(seed)
    model = factory.build(task).to(device)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "norm" not in n.lower()]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "norm" not in n.lower())]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98), eps=1e-6)  # fmt: skip
    steps = epochs * math.ceil(len(train) / batch_size)
    warm = max(1, int(warmup_ratio * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm)))
    )
    gen = torch.Generator().manual_seed(seed)
    epoch_losses = []
    model.train()
    for _ in range(epochs):
        total, count = 0.0, 0
        for idx in _batches(len(train), batch_size, gen):
            batch = {k: v.to(device) for k, v in factory.encode([train[i] for i in idx.tolist()]).items()}
            out = model(**batch, labels=_labels(task, train, idx).to(device))
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            total, count = total + out.loss.item() * len(idx), count + len(idx)
        epoch_losses.append(total / count)
    results = {name: score(model, factory, task, dev, batch_size, device) for name, dev in devs.items()}
    return {"lr": lr, "seed": seed, "epochs": epochs, "train_loss": epoch_losses, "dev": results,
            "score": task_score(task, results)}  # fmt: skip


@torch.no_grad()
def predict(
    model, factory: ModelFactory, task: Task, examples: List[Example], batch_size: int, device: str
) -> List[float]:
    model.eval()
    preds: List[float] = []
    for idx in _batches(len(examples), max(batch_size, 64), None):
        batch = {k: v.to(device) for k, v in factory.encode([examples[i] for i in idx.tolist()]).items()}
        logits = model(**batch).logits.float()
        preds.extend(logits[:, 0].tolist() if task.regression else logits.argmax(-1).tolist())
    return preds


def score(
    model, factory: ModelFactory, task: Task, examples: List[Example], batch_size: int, device: str
) -> Dict[str, float]:
    preds = predict(model, factory, task, examples, batch_size, device)
    labels = [e[1] if task.regression else int(e[1]) for e in examples]
    return M.compute(task.metrics, preds, labels)


def task_score(task: Task, dev_results: Dict[str, Dict[str, float]]) -> float:
    """Mean over the task's metrics, then over its dev splits (MNLI m/mm); in [0, 1] (MCC/corr can be < 0)."""
    per_split = [statistics.fmean(r.values()) for r in dev_results.values()]
    return statistics.fmean(per_split)


# ----------------------------------------------------------------------------------------- protocol


def summarise(task: Task, runs: List[Dict[str, object]]) -> Dict[str, object]:
    """Median over seeds per lr; best lr by that median."""
    by_lr: Dict[float, List[Dict[str, object]]] = {}
    for r in runs:
        by_lr.setdefault(r["lr"], []).append(r)
    medians = {lr: statistics.median(float(r["score"]) for r in rs) for lr, rs in by_lr.items()}
    best_lr = max(medians, key=lambda lr: medians[lr])
    best_runs = by_lr[best_lr]
    detail = {}
    for split in best_runs[0]["dev"]:
        for metric in best_runs[0]["dev"][split]:
            key = metric if len(best_runs[0]["dev"]) == 1 else f"{split}_{metric}"
            detail[key] = statistics.median(r["dev"][split][metric] for r in best_runs)
    return {"task": task.name, "score": medians[best_lr], "best_lr": best_lr, "median_by_lr": medians,
            "metrics": detail, "seeds": len(best_runs)}  # fmt: skip


def markdown(model_name: str, summaries: List[Dict[str, object]]) -> str:
    names = [s["task"] for s in summaries]
    lines = [f"GLUE dev, {model_name}: median over seeds, best lr by dev median (scores × 100)", "",
             "| model | " + " | ".join(names) + " | avg |", "|---|" + "---:|" * (len(names) + 1)]  # fmt: skip
    cells = [f"{100 * s['score']:.1f}" for s in summaries]
    avg = statistics.fmean(float(s["score"]) for s in summaries)
    lines.append(f"| {model_name} | " + " | ".join(cells) + f" | {100 * avg:.1f} |")
    lines += ["", "| task | metrics (median) | best lr | median score by lr |", "|---|---|---|---|"]
    for s in summaries:
        mets = ", ".join(f"{k} {100 * v:.1f}" for k, v in s["metrics"].items())
        by_lr = ", ".join(f"{lr:g}: {100 * v:.1f}" for lr, v in s["median_by_lr"].items())
        lines.append(f"| {s['task']} | {mets} | {s['best_lr']:g} | {by_lr} |")
    return "\n".join(lines) + "\n"


def run_glue(model_path: str, tasks: Sequence[str], args: Sequence[str] = (), out: Optional[str] = None,
             small_task_epochs: int = 10, max_train: int = 0, log=print) -> Dict[str, object]:  # fmt: skip
    src = sources.resolve(model_path, mode_from_args(args))
    run = sources.run_config(src, args)
    ev = run.eval
    names = list(tasks) or list(ev.glue_tasks)
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown GLUE task(s) {unknown}; choose from {', '.join(TASKS)} (WNLI is not run)")
    factory = ModelFactory.from_path(model_path, args)
    device = "cuda" if run.train.device != "cpu" and torch.cuda.is_available() else "cpu"
    out_dir = Path(out or f"glue_results/{src.name.replace('/', '_')}")
    out_dir.mkdir(parents=True, exist_ok=True)
    summaries, all_runs = [], {}
    for name in names:
        task = TASKS[name]
        train, devs = load_task(task, ev.glue_dir)
        if max_train:
            train = train[:max_train]
        epochs = small_task_epochs if (name in SMALL_TASKS and small_task_epochs) else ev.epochs
        runs = []
        for lr in ev.lrs:
            for seed in ev.seeds:
                t0 = time.perf_counter()
                r = fine_tune(
                    factory, task, train, devs, lr=lr, seed=seed, batch_size=ev.batch_size, epochs=epochs, device=device
                )
                runs.append(r)
                log(f"{name}: lr {lr:g} seed {seed}: score {100 * r['score']:.2f} "
                    f"(train loss {r['train_loss'][0]:.3f} -> {r['train_loss'][-1]:.3f}, {time.perf_counter() - t0:.0f} s)")  # fmt: skip
        all_runs[name] = runs
        summaries.append(summarise(task, runs))
    table = markdown(src.name, summaries)
    result = {"model": str(src.path), "tasks": summaries, "runs": all_runs,
              "glue_avg": statistics.fmean(float(s["score"]) for s in summaries),
              "protocol": {"lrs": list(ev.lrs), "seeds": list(ev.seeds), "batch_size": ev.batch_size,
                           "epochs": ev.epochs, "small_task_epochs": small_task_epochs}}  # fmt: skip
    (out_dir / "summary.md").write_text(table)
    (out_dir / "results.json").write_text(json.dumps(result, indent=1, default=str))
    result.update(table=table, out_dir=out_dir, source=src, run=run)
    return result


def main(model_path: str, tasks: Sequence[str], args: Sequence[str], out: Optional[str], small_task_epochs: int,
         max_train: int = 0) -> int:  # fmt: skip
    from scale_hyper.evaluation.track import log_results

    try:
        res = run_glue(model_path, tasks, args, out, small_task_epochs, max_train)
    except (FileNotFoundError, ValueError) as err:
        print(f"scale-hyper: error: glue: {err}", file=sys.stderr)
        return 2
    print()
    print(res["table"], end="")
    print(f"written: {res['out_dir'] / 'summary.md'}, {res['out_dir'] / 'results.json'}")
    metrics = {"glue_avg": res["glue_avg"], **{f"glue_{s['task']}": s["score"] for s in res["tasks"]}}
    run_id = log_results(
        res["run"], metrics, source_run_id=res["source"].mlflow_run_id, run_name=f"glue {res['source'].name}",
        params={"glue.lrs": str(res["protocol"]["lrs"]), "glue.seeds": str(res["protocol"]["seeds"]),
                "glue.tasks": ",".join(s["task"] for s in res["tasks"]), "model_path": str(res["source"].path)},
        artifacts={"glue/summary.md": res["table"]},
    )  # fmt: skip
    if run_id:
        print(f"logged to MLflow run {run_id}")
    return 0
