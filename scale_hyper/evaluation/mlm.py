"""`scale-hyper eval MODEL [CONFIG ...] [key=value ...]`: masked-LM loss, perplexity and accuracy
on the validation shards of ``data.output`` (by default the data the checkpoint was trained on).

The masks are the validation loader's fixed masks, so numbers are comparable across models,
and computed by the same code, under the same names, as the ``val_loss`` / ``val_accuracy`` /
``val_perplexity`` that training logs (MLflow: ``eval/val_loss`` ...). ``eval.batches`` caps the batches
(0 = the whole validation split); ``train.micro_batch_size`` is the batch size. ``--per-batch PATH``
also writes each batch's loss to a JSON file (``scale-hyper sweep``'s paired test across runs).
"""

from __future__ import annotations

import sys
import time
from typing import Dict, Iterable, List, Optional, Sequence

import torch

from scale_hyper import runs as sources
from scale_hyper.runs.manifest import mode_from_args


@torch.no_grad()
def mlm_metrics(
    model: torch.nn.Module,
    batches: Iterable[Dict[str, torch.Tensor]],
    device: str = "cpu",
    per_batch: Optional[List[Dict[str, float]]] = None,
) -> Dict[str, float]:
    """The validation metrics training logs (``scale_hyper.models.mlm_metrics``), for any MLM;
    ``per_batch`` (a list) receives each batch's loss sum and masked-token count, in batch order."""
    from scale_hyper.models import ScaleHyperForMaskedLM
    from scale_hyper.models.mlm_metrics import masked_lm_metrics, masked_lm_totals

    ours = isinstance(model, ScaleHyperForMaskedLM)
    totals, seqs = torch.zeros(3, dtype=torch.float64, device=device), 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch["labels"]
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        if ours:  # the vocabulary projection only at the masked positions
            logits = model(**inputs, labels=labels, sparse_logits=True).logits
        else:
            logits = model(**inputs).logits
        batch_totals = masked_lm_totals(logits, labels)
        totals += batch_totals
        seqs += labels.shape[0]
        if per_batch is not None:  # one host sync per batch, only when asked (the paired test of a sweep)
            loss_sum, _, n = batch_totals.tolist()
            per_batch.append({"loss_sum": loss_sum, "masked_tokens": n})
    return {**masked_lm_metrics(totals), "val_sequences": float(seqs)}


def evaluate(
    model_path: str, args: Sequence[str] = (), per_batch: Optional[List[Dict[str, float]]] = None
) -> Dict[str, float]:
    from scale_hyper.data import check_vocab, load_manifest, val_loader

    src = sources.resolve(model_path, mode_from_args(args))
    run = sources.run_config(src, args)
    if run.data.mixture and not any(a.startswith("data.output=") for a in args):
        from scale_hyper.data.mixture import load_sources

        manifest = load_sources(run.data)[0]  # as in training: a mixture validates on its first source
        output = manifest["location"]
    else:
        output = run.data.output
        manifest = load_manifest(output, run.data.allow_pipe)
        if manifest is None:
            raise FileNotFoundError(
                f"no prepared data at data.output={output}; run `scale-hyper prepare` or set data.output"
            )
    model = sources.load_mlm(src)
    check_vocab(manifest, model.config.vocab_size)
    device = "cuda" if run.train.device != "cpu" and torch.cuda.is_available() else "cpu"
    model.to(device)
    loader = val_loader(run.data, manifest, rank=0, world_size=1, micro_batch_size=run.train.micro_batch_size,
                        max_batches=run.eval.batches or None)  # fmt: skip
    start = time.perf_counter()
    metrics = mlm_metrics(model, loader, device, per_batch)
    metrics["seconds"] = time.perf_counter() - start
    return {"source": src, "run": run, "metrics": metrics, "data": output}


def format_table(rows: Sequence[Dict]) -> str:
    head = (
        f"| {'model':<28} | {'val_loss':>8} | {'val_perplexity':>14} | {'val_accuracy':>12} | {'masked tokens':>13} |"
    )
    lines = [head, "|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|"]
    for r in rows:
        m = r["metrics"]
        lines.append(f"| {r['name']:<28} | {m['val_loss']:>8.4f} | {m['val_perplexity']:>14.2f} | {m['val_accuracy']:>12.4f} "
                     f"| {int(m['val_masked_tokens']):>13,} |")  # fmt: skip
    return "\n".join(lines)


def write_per_batch(path: str, out: Dict, batches: List[Dict[str, float]]) -> None:
    """``--per-batch PATH``: every batch's loss on the fixed validation batches, written atomically, so
    runs evaluated on the same data and micro batch size can be compared batch by batch."""
    import json
    import os
    from pathlib import Path

    run = out["run"]
    doc = {"model": str(out["source"].path), "data": out["data"], "micro_batch_size": run.train.micro_batch_size,
           "seq_len": run.data.seq_len, "metrics": out["metrics"], "batches": batches}  # fmt: skip
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp"
    Path(tmp).write_text(json.dumps(doc, indent=1))
    os.replace(tmp, path)


def main(model_path: str, args: Sequence[str] = (), per_batch_path: Optional[str] = None) -> int:
    from scale_hyper.evaluation.track import log_results

    batches: List[Dict[str, float]] = []
    try:
        out = evaluate(model_path, args, batches if per_batch_path else None)
    except (FileNotFoundError, ValueError) as err:
        print(f"scale-hyper: error: eval: {err}", file=sys.stderr)
        return 2
    src, m = out["source"], out["metrics"]
    print(f"validation data: {out['data']}")
    print(format_table([{"name": src.name, "metrics": m}]))
    if per_batch_path:
        write_per_batch(per_batch_path, out, batches)
        print(f"per-batch losses ({len(batches)} batches): {per_batch_path}")
    run_id = log_results(
        out["run"], {f"eval/{k}": v for k, v in m.items() if k != "seconds"},
        source_run_id=src.mlflow_run_id, run_name=f"eval {src.name}",
        params={"model_path": str(src.path), "data.output": out["data"]},
    )  # fmt: skip
    if run_id:
        print(f"logged to MLflow run {run_id}")
    return 0
