"""`scale-hyper eval MODEL [CONFIG ...] [key=value ...]`: masked-LM loss, perplexity and accuracy
on the validation shards of ``data.output`` (by default the data the checkpoint was trained on).

The masks are the validation loader's fixed masks, so numbers are comparable across models and
with the ``val_loss`` / ``val_accuracy`` that training logs. ``eval.batches`` caps the batches
(0 = the whole validation split); ``train.micro_batch_size`` is the batch size.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Dict, Iterable, Sequence

import torch
import torch.nn.functional as F

from scale_hyper.evaluation import source as sources


@torch.no_grad()
def mlm_metrics(
    model: torch.nn.Module, batches: Iterable[Dict[str, torch.Tensor]], device: str = "cpu"
) -> Dict[str, float]:
    """Mean cross-entropy over the masked tokens, perplexity exp(loss), and top-1 accuracy."""
    from scale_hyper.models import ScaleHyperForMaskedLM

    ours = isinstance(model, ScaleHyperForMaskedLM)
    loss_sum, correct, n, seqs = 0.0, 0, 0, 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch["labels"]
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        if ours:  # the vocabulary projection only at the masked positions
            logits = model(**inputs, labels=labels, sparse_logits=True).logits
        else:
            logits = model(**inputs).logits[labels != -100]
        targets = labels[labels != -100]
        loss_sum += F.cross_entropy(logits.float(), targets, reduction="sum").item()
        correct += (logits.argmax(-1) == targets).sum().item()
        n += targets.numel()
        seqs += labels.shape[0]
    if n == 0:
        raise ValueError("no masked tokens to evaluate (empty validation split?)")
    loss = loss_sum / n
    return {"mlm_loss": loss, "perplexity": math.exp(min(loss, 700.0)), "mlm_accuracy": correct / n,
            "masked_tokens": float(n), "sequences": float(seqs)}  # fmt: skip


def evaluate(model_path: str, args: Sequence[str] = ()) -> Dict[str, float]:
    from scale_hyper.data import check_vocab, load_manifest, val_loader

    src = sources.resolve(model_path)
    run = sources.run_config(src, args)
    manifest = load_manifest(run.data.output, run.data.allow_pipe)
    if manifest is None:
        raise FileNotFoundError(
            f"no prepared data at data.output={run.data.output}; run `scale-hyper prepare` or set data.output"
        )
    model = sources.load_mlm(src)
    check_vocab(manifest, model.config.vocab_size)
    device = "cuda" if run.train.device != "cpu" and torch.cuda.is_available() else "cpu"
    model.to(device)
    loader = val_loader(run.data, manifest, rank=0, world_size=1, micro_batch_size=run.train.micro_batch_size,
                        max_batches=run.eval.batches or None)  # fmt: skip
    start = time.perf_counter()
    metrics = mlm_metrics(model, loader, device)
    metrics["seconds"] = time.perf_counter() - start
    return {"source": src, "run": run, "metrics": metrics, "data": run.data.output}


def format_table(rows: Sequence[Dict]) -> str:
    head = f"| {'model':<28} | {'MLM loss':>8} | {'perplexity':>10} | {'accuracy':>8} | {'masked tokens':>13} |"
    lines = [head, "|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|"]
    for r in rows:
        m = r["metrics"]
        lines.append(f"| {r['name']:<28} | {m['mlm_loss']:>8.4f} | {m['perplexity']:>10.2f} | {m['mlm_accuracy']:>8.4f} "
                     f"| {int(m['masked_tokens']):>13,} |")  # fmt: skip
    return "\n".join(lines)


def main(model_path: str, args: Sequence[str] = ()) -> int:
    from scale_hyper.evaluation.track import log_results

    try:
        out = evaluate(model_path, args)
    except (FileNotFoundError, ValueError) as err:
        print(f"scale-hyper: eval: {err}", file=sys.stderr)
        return 2
    src, m = out["source"], out["metrics"]
    print(f"validation data: {out['data']}")
    print(format_table([{"name": src.name, "metrics": m}]))
    run_id = log_results(
        out["run"], {f"eval_{k}": v for k, v in m.items() if k != "seconds"},
        source_run_id=src.mlflow_run_id, run_name=f"eval {src.name}",
        params={"model_path": str(src.path), "data.output": out["data"]},
    )  # fmt: skip
    if run_id:
        print(f"logged to MLflow run {run_id}")
    return 0
