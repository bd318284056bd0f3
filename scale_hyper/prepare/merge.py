"""Prepare's last step: check every slice's partial manifest and merge them into ``manifest.json``.

Nothing is written unless every slice of the plan is complete and was made with the plan's
tokenizer and settings; the manifest (written last) is then the concatenation of the partials in
slice order, so its bytes do not depend on how many tasks made the slices.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from scale_hyper.data import shards as shardlib
from scale_hyper.data import storage
from scale_hyper.prepare import shard_writer
from scale_hyper.prepare.slices import PLAN, PrepareError, partial_name, plan_sha, read_partial, slice_files


def missing_slices(data_cfg, plan: Dict[str, Any]) -> List[int]:
    return [sl["id"] for sl in plan["slices"] if read_partial(data_cfg, sl["id"]) is None]


def check_partial(data_cfg, plan: Dict[str, Any], slice_id: int, partial: Optional[Dict[str, Any]]) -> None:
    """Raise PrepareError naming the file when a partial does not belong to ``plan``."""
    where = storage.join(data_cfg.output, partial_name(slice_id))
    fix = f"delete {where} and run the prepare task for slice {slice_id} again (it is redone)"
    if not isinstance(partial, dict) or partial.get("slice") != slice_id or "splits" not in partial:
        raise PrepareError(f"{where} is not a partial manifest of slice {slice_id} — {fix}")
    if partial.get("tokenizer") != plan["tokenizer"]["sha256"]:
        raise PrepareError(
            f"{where} was made with another tokenizer (sha256 {str(partial.get('tokenizer'))[:12]}…, the plan "
            f"{storage.join(data_cfg.output, PLAN)} has {plan['tokenizer']['sha256'][:12]}…) — {fix}"
        )
    have, want = partial.get("config", {}), plan["config"]
    diffs = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
    if diffs or partial.get("plan") != plan_sha(plan):
        what = ", ".join(f"data.{k}={have.get(k)!r} there but {want.get(k)!r} in the plan" for k in diffs)
        raise PrepareError(f"{where} was made with other settings ({what or 'another plan'}) — {fix}")


def merge(data_cfg, plan: Dict[str, Any]) -> Dict[str, Any]:
    """Write ``manifest.json`` from the partials; PrepareError (nothing written) when one is missing or foreign."""
    partials = []
    missing = []
    for sl in plan["slices"]:
        p = read_partial(data_cfg, sl["id"])
        if p is None:
            missing.append(sl["id"])
        partials.append(p)
    if missing:
        first = storage.join(data_cfg.output, partial_name(missing[0]))
        raise PrepareError(
            f"{len(missing)} of {len(plan['slices'])} slices are not finished (e.g. no {first}) — run "
            "`scale-hyper prepare` again with the same config (it resumes) or the missing tasks, then merge"
        )
    for sl, p in zip(plan["slices"], partials, strict=True):
        check_partial(data_cfg, plan, sl["id"], p)
    splits: Dict[str, Dict[str, Any]] = {}
    documents = {}
    for split in ("train", "val"):
        shards = [s for p in partials for s in p["splits"][split]["shards"]]  # type: ignore[index]
        splits[split] = {
            "sequences": sum(p["splits"][split]["sequences"] for p in partials),  # type: ignore[index]
            "tokens": sum(p["splits"][split]["tokens"] for p in partials),  # type: ignore[index]
            "shards": shards,
        }
        documents[split] = sum(p["documents"][split] for p in partials)  # type: ignore[index]
    if splits["train"]["sequences"] == 0:
        raise PrepareError(f"data.source={data_cfg.source!r} produced no training sequences — check data.source")
    manifest = shard_writer.make_manifest(
        config=plan["config"],
        source=plan["source"],
        seed=plan["seed"],
        seq_len=data_cfg.seq_len,
        vocab_size=plan["tokenizer"]["vocab_size"],
        dtype=plan["dtype"],
        special=plan["special_tokens"],
        tokenizer=plan["tokenizer"],
        sequences_per_block=data_cfg.sequences_per_block,
        splits=splits,
        documents=documents,
    )
    manifest["slices"] = len(plan["slices"])  # added field: how many slices the shards came from
    # added field: how many input files each slice held (None: a block of a document stream)
    manifest["slice_files"] = slice_files(plan)
    manifest["loader_deal"] = shardlib.DEAL_BY_SEQUENCES  # added field: shards of unequal size (shards.py)
    out = data_cfg.output
    storage.write_bytes(
        storage.join(out, shardlib.MANIFEST), shard_writer.manifest_bytes(manifest), data_cfg.allow_pipe
    )
    return shardlib.load_manifest(out, data_cfg.allow_pipe)  # type: ignore[return-value]
