"""The training hot path on 2 real CPU ranks: a plain optimizer step makes no device→host sync and no
collective of ours (counted by call site with scale_hyper/engine/sync_audit.py), runs no op whose
output shape depends on the data (seen at the dispatcher), and the guard refuses a whole optimizer
step with a non-finite gradient — in fp32 and bf16 — without advancing the LR schedule (the stop
after train.max_bad_steps of them: tests/test_engine.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from launch import prepare_shards, run_ranks, scale_hyper

from scale_hyper.engine.sync_audit import DataDependentShapes

pytestmark = pytest.mark.slow

COMMON = [
    "data.max_documents=400", "data.vocab_size=512", "data.seq_len=64", "data.sequences_per_shard=128",
    "model.num_layers=2", "train.micro_batch_size=4", "train.global_batch_size=16", "train.eval_batches=2",
    "train.eval_every=1000", "train.save_every=1000", "train.export=false", "tracking.enabled=false",
]  # fmt: skip
# Our sync/collective call sites on a plain step (docs/benchmarks.md has the before/after table).
OURS_PER_PLAIN_STEP = 0


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return prepare_shards(tmp_path_factory.mktemp("hot"), COMMON)


def metrics(run_dir: Path) -> list:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("zero", [1, 3])
def test_plain_steps_make_no_sync_or_collective_of_ours(shards, zero):
    out = shards / f"audit-z{zero}"
    args = scale_hyper("train", *COMMON, f"data.output={shards}/shards", f"train.output_dir={out}",
                       "train.max_steps=9", "train.log_every=4", "train.stop_check_every=4",
                       f"deepspeed.zero_stage={zero}")  # fmt: skip
    procs = run_ranks(args, 2, shards, extra_env={"SCALE_HYPER_SYNC_AUDIT": str(shards / f"audit-z{zero}")})
    for p in procs:
        assert p.returncode == 0, p.stdout[-4000:]
    for rank in (0, 1):
        steps = json.loads((shards / f"audit-z{zero}.rank{rank}.json").read_text())["steps"]
        # Interval K = after step K was counted until step K+1 was: plain when step K did no
        # logging/stop check (K % 4 != 0). Its own micro-batches (4 of them: accumulation 2 × ...) are in it.
        plain = {k: v for k, v in steps.items() if int(k) % 4 and int(k) < 9}
        assert len(plain) >= 5
        for k, sites in plain.items():
            ours = {s: n for s, n in sites.items() if s.startswith("scale_hyper/")}
            assert sum(ours.values()) == OURS_PER_PLAIN_STEP, (k, ours)
            assert any(s.startswith("deepspeed/") for s in sites), "the audit sees DeepSpeed's calls too"
        # A logging step does sync (the window's loss all-reduce): the audit can tell.
        assert any(s.startswith("scale_hyper/") for s in steps["4"])
        # At the dispatcher: no op whose output shape depends on the data (nonzero, boolean-mask
        # indexing, masked_select, unique, …: each an implicit sync), ours, DeepSpeed's or torch's.
        shapes = json.loads((shards / f"audit-z{zero}.rank{rank}.json").read_text())["shapes"]
        for k in plain:
            assert shapes[k].pop("ops seen") > 100, "the dispatch mode saw the step"
            assert shapes[k] == {}, (k, shapes[k])


@pytest.mark.parametrize("zero,precision", [(0, "fp32"), (2, "bf16"), (1, "fp32")])
def test_a_non_finite_step_is_refused_whole_and_the_schedule_waits(shards, zero, precision):
    out = shards / f"nan-{zero}-{precision}"
    args = scale_hyper("train", *COMMON, f"data.output={shards}/shards", f"train.output_dir={out}",
                       "train.max_steps=6", "train.log_every=1", "train.warmup_ratio=0.99", "train.max_bad_steps=3",
                       f"deepspeed.zero_stage={zero}", f"deepspeed.precision={precision}")  # fmt: skip
    # Rank 0's loss is NaN in step 3 only: both ranks must refuse the whole step (2 micro-batches each).
    procs = run_ranks(args, 2, shards, extra_env={"SCALE_HYPER_TEST_NONFINITE_STEPS": "3"})
    for p in procs:
        assert p.returncode == 0, p.stdout[-4000:]
    assert "max_bad_steps: 3" in (out / "config.yaml").read_text()  # the run dir's resolved config
    rows = {r["step"]: r for r in metrics(out) if "loss" in r}
    assert [rows[s]["skipped_steps"] for s in range(1, 7)] == [0, 0, 1, 1, 1, 1]
    lr = [rows[s]["lr"] for s in range(1, 7)]
    assert lr[2] == lr[1] and lr[1] > lr[0] and lr[3] > lr[2]  # warm-up: only applied steps advance it
    assert all(rows[s]["loss"] == rows[s]["loss"] for s in rows)  # the logged mean leaves the NaN out


# The stop after train.max_bad_steps refused steps in a row (checkpoint, exit 3 on every rank): from a real
# overflow in tests/test_engine.py::test_non_finite_losses_are_skipped_then_stop_with_checkpoint.


def test_the_dispatch_check_sees_every_data_dependent_shape():
    x = torch.randn(16)
    mask = x > 0
    with DataDependentShapes() as seen:
        (
            x[torch.arange(3)],
            x.index_select(0, torch.arange(3)),
            torch.nonzero_static(mask, size=16),
            x.masked_fill(mask, 0),
        )
    assert set(seen.ops) == {"ops seen"}  # static shapes: not flagged
    with DataDependentShapes() as seen:
        x[mask], x.masked_select(mask), torch.unique(x), torch.where(mask)
        x[mask] = 0.0
    ops = " ".join(seen.ops)
    for op in ("aten.index.Tensor", "aten.masked_select", "aten._unique2", "aten.nonzero", "aten.index_put_"):
        assert op in ops, (op, ops)


@pytest.mark.parametrize("mixer", ["hyperbert", "bert", "hypermixer", "hyla"])
def test_a_plain_step_has_no_data_dependent_shape_in_process(mixer):
    """Forward, backward and AdamW of each mixer on a loader batch (no DeepSpeed: fast, and the model's
    own code only). Without the loader's mlm_positions, the model finds them itself: seen — with the
    same loss, bit for bit; a Hugging Face caller's dense logits with plain labels give it too."""
    from scale_hyper.config import load_config
    from scale_hyper.data.loader import to_batch
    from scale_hyper.data.masking import Masker, stream_key
    from scale_hyper.models import build_model

    geometry = ["model.vocab_size=512", "model.num_layers=2", "model.dropout=0.0", f"model.mixer={mixer}"]
    model = build_model(load_config(geometry).model)
    optimizer = torch.optim.AdamW(model.parameters())
    ids = np.random.default_rng(0).integers(5, 512, size=(4, 64)).astype(np.uint16)
    ids[:, 0], ids[-1, 40:] = 2, 0  # [CLS], and padding: the attention mask is in play
    batch = to_batch(Masker(512, range(5), 4)(ids, np.arange(4), stream_key(0, 0)), ids, pad_id=0)

    def step(**inputs):
        loss = model(**inputs, sparse_logits=True).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.detach()

    with DataDependentShapes() as seen:
        step(**batch)
    assert seen.ops.pop("ops seen") > 100 and dict(seen.ops) == {}
    without_positions = {k: v for k, v in batch.items() if not k.startswith("mlm_")}
    with DataDependentShapes() as seen:
        step(**without_positions)
    assert [op.split()[-1] for op in seen.ops if op != "ops seen"] == ["aten.nonzero.default"]
    with torch.no_grad():
        ours, fallback = model(**batch).loss, model(**without_positions, sparse_logits=True).loss
        dense = model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"]).loss
    assert torch.equal(ours, fallback)
    torch.testing.assert_close(ours, dense)
