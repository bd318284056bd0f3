"""`scale-hyper prepare`: corpus → WordPiece tokenizer → packed, shuffled WebDataset shards + manifest.

Prepare is a map over slices of the corpus, in three steps (all deterministic: the same input and
config give byte-identical shards and manifest, however many tasks made them):

1. Plan (once): cut the corpus into slices (``sources.plan_slices``: byte ranges of
   ``data.slice_bytes`` of text files, parquet row groups, whole compressed/remote files, shards of
   an ``hf:`` dataset, or blocks of ``data.slice_documents`` documents of a stream), train
   WordPiece on the corpus' first ``data.tokenizer_train_chars`` characters (or load
   ``data.tokenizer``; its vocabulary must fit ``data.vocab_size``), write ``tokenizer/`` and
   ``slices/plan.json``.
2. Slices: task ``I`` of ``N`` takes slices ``I, I+N, I+2N, …``; each task runs them in
   ``data.prepare_workers`` local processes. A slice writes its shards, then its partial manifest
   (``slices.py``). A finished slice is skipped, so an interrupted prepare resumes.
3. Merge: when every slice is finished, ``manifest.json`` (written last: its presence means
   "complete"). The task that finishes last merges; ``--merge`` does it on its own.

``scale-hyper prepare CONFIG`` does all three in one process tree (``ensure_prepared``, also what
``train`` calls). ``--task I --tasks N`` (or SLURM_ARRAY_TASK_ID/…_COUNT of a job array, or
SLURM_PROCID/SLURM_STEP_NUM_TASKS of an ``srun`` step) runs one task: task 0 makes the plan if there is
none, the others wait for it. ``--plan`` and ``--merge`` run steps 1 and 3 alone.

There is no global shuffle: training sequences are shuffled within their slice; the loader mixes
shards. ``ensure_prepared`` reuses a directory whose manifest matches the config and refuses one
that contradicts it. The seed only decides the split and the shuffle; a manifest prepared with
another seed is reused (with a note in the log) rather than rebuilt.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, as_completed, wait
from typing import Any, Dict, Iterator, List, Optional, Tuple

from scale_hyper.data import shards as shardlib
from scale_hyper.data import storage
from scale_hyper.prepare import merge as mergelib
from scale_hyper.prepare import slices as slicelib
from scale_hyper.prepare import sources, space
from scale_hyper.prepare.slices import PrepareError
from scale_hyper.prepare.space import OutOfSpace

log = logging.getLogger("scale_hyper.prepare")

# DataConfig keys that change what prepare writes; a manifest must agree on all of them.
PREPARE_KEYS = (
    "source",
    "hf_config",
    "hf_split",
    "hf_data_files",
    "text_field",
    "max_documents",
    "tokenizer",
    "tokenizer_train_chars",
    "vocab_size",
    "seq_len",
    "sequences_per_block",
    "sequences_per_shard",
    "min_shards",
    "val_fraction",
    "slice_bytes",
    "slice_documents",
)
PLAN_WAIT_S = float(os.environ.get("SCALE_HYPER_PREPARE_PLAN_WAIT", 6 * 3600))


def prepare_config(data_cfg) -> Dict[str, Any]:
    return {k: getattr(data_cfg, k) for k in PREPARE_KEYS}


def _validate(data_cfg) -> None:
    if data_cfg.seq_len < 4:
        raise PrepareError(f"data.seq_len={data_cfg.seq_len} is too short (at least 4)")
    if data_cfg.vocab_size < 16:
        raise PrepareError(f"data.vocab_size={data_cfg.vocab_size} is too small")
    if data_cfg.sequences_per_block < 1 or data_cfg.sequences_per_shard < 1 or data_cfg.min_shards < 1:
        raise PrepareError("data.sequences_per_block, data.sequences_per_shard and data.min_shards must be >= 1")
    if not 0.0 <= data_cfg.val_fraction < 1.0:
        raise PrepareError(f"data.val_fraction={data_cfg.val_fraction} must be in [0, 1)")


def ensure_prepared(data_cfg, seed: int = 1234) -> Dict[str, Any]:
    """The manifest of ``data.output``, preparing (or finishing) it first if needed (call on one rank only).

    Raises ValueError naming the conflicting keys when ``data.output`` holds data prepared with a
    different configuration.
    """
    _validate(data_cfg)
    storage.check_pipe(data_cfg.output, data_cfg.allow_pipe)
    existing = shardlib.load_manifest(data_cfg.output, data_cfg.allow_pipe)
    if existing is None:
        return prepare(data_cfg, seed)
    _check_matches(existing.get("config", {}), existing.get("source", {}), data_cfg, "")
    if existing.get("seed") != seed:
        log.info(
            "reusing %s (split and shuffled with seed %s; this run's seed %s only affects the loader)",
            data_cfg.output,
            existing.get("seed"),
            seed,
        )
    if storage.is_local(data_cfg.output):
        missing = [
            s["name"]
            for split in existing["splits"].values()
            for s in split["shards"]
            if not os.path.exists(storage.join(data_cfg.output, s["name"]))
        ]
        if missing:
            raise PrepareError(
                f"data.output={data_cfg.output!r} is incomplete: {len(missing)} shard(s) listed in its manifest "
                f"are missing (e.g. {missing[0]}); delete {data_cfg.output} to re-prepare"
            )
    return existing


def _check_matches(have: Dict[str, Any], have_source: Dict[str, Any], data_cfg, what: str) -> None:
    want = prepare_config(data_cfg)
    # keys an older prepare did not record (slice_*) cannot contradict: its data is still valid
    diffs = [k for k in PREPARE_KEYS if k in have and have.get(k) != want[k]]
    if not diffs and data_cfg.source != "stdlib" and not data_cfg.source.startswith("hf:"):
        # the same file names but other content: sizes are recorded, compare them
        if have_source.get("files") != sources.describe(data_cfg).get("files"):
            diffs = ["source"]
            have = dict(have, source=f"{have.get('source')} (files of other sizes)")
    if diffs:
        parts = ", ".join(f"data.{k}={have.get(k)!r} there but {want[k]!r} here" for k in diffs)
        raise PrepareError(
            f"data.output={data_cfg.output!r} already holds {what or 'data'} prepared differently: {parts}. "
            f"Choose another data.output (e.g. data/{_suggest_name(data_cfg)}) or delete {data_cfg.output} "
            "to re-prepare it"
        )


def _suggest_name(data_cfg) -> str:
    src = "stdlib" if data_cfg.source == "stdlib" else "corpus"
    return f"{src}-v{data_cfg.vocab_size}-s{data_cfg.seq_len}"


# --- the steps ----------------------------------------------------------------------------------


def get_plan(data_cfg, seed: int, create: bool, wait: bool = True) -> Dict[str, Any]:
    """The plan of ``data.output``: read it, or make it (``create``), or wait for task 0 to make it."""
    url = storage.join(data_cfg.output, slicelib.PLAN)
    waited = 0.0
    while True:
        raw = storage.read_optional(url, data_cfg.allow_pipe)
        if raw is not None:
            import json

            plan = json.loads(raw)
            slicelib.check_plan(plan, url, data_cfg.output)
            _check_matches(plan.get("config", {}), plan.get("source", {}), data_cfg, "a prepare plan")
            if plan.get("seed") != seed:
                log.info("%s was planned with seed %s: it is kept (this run's seed: %s)", url, plan.get("seed"), seed)
            return plan
        if create:
            plan = slicelib.make_plan(data_cfg, prepare_config(data_cfg), seed)
            storage.write_bytes(url, slicelib.canonical(plan), data_cfg.allow_pipe)
            what = slicelib.describe_slices(slicelib.slice_files(plan))
            log.info("planned %s of %s in %s", what, data_cfg.source, url)
            return plan
        if not wait:
            raise PrepareError(f"no {url}: nothing was prepared there yet — run `scale-hyper prepare CONFIG` first")
        if waited == 0:
            log.info("waiting for task 0 to write %s (tokenizer and slice list)", url)
        if waited >= PLAN_WAIT_S:
            raise PrepareError(
                f"no {url} after {waited:.0f} s — run `scale-hyper prepare CONFIG --plan` (or task 0) first"
            )
        time.sleep(5.0)
        waited += 5.0


def prepare(data_cfg, seed: int = 1234, task: int = 0, tasks: int = 1) -> Dict[str, Any]:
    """Plan (if needed), run this task's unfinished slices, and merge when all are done.

    Returns the manifest, or ``{}`` when other tasks' slices are still missing (they merge).
    """
    _validate(data_cfg)
    storage.check_pipe(data_cfg.output, data_cfg.allow_pipe)
    with space.full_disk_is_one_line(data_cfg):
        plan = get_plan(data_cfg, seed, create=task == 0)
        run_task(data_cfg, plan, task, tasks)
        missing = mergelib.missing_slices(data_cfg, plan)
        if missing and tasks > 1:
            log.info(
                "task %d/%d done; %d slice(s) of other tasks still missing: the last task merges",
                task,
                tasks,
                len(missing),
            )
            return {}
        return mergelib.merge(data_cfg, plan)


def merge_only(data_cfg, seed: int = 1234) -> Dict[str, Any]:
    """The last step alone (``--merge``): the existing manifest, or one merged from finished slices."""
    existing = shardlib.load_manifest(data_cfg.output, data_cfg.allow_pipe)
    return existing or mergelib.merge(data_cfg, get_plan(data_cfg, seed, create=False, wait=False))


def _todo(data_cfg, plan: Dict[str, Any], task: int, tasks: int) -> List[int]:
    todo = []
    for sl in plan["slices"][task::tasks]:
        partial = slicelib.read_partial(data_cfg, sl["id"])
        if partial is not None:
            try:
                mergelib.check_partial(data_cfg, plan, sl["id"], partial)
                continue  # finished earlier: resume past it
            except PrepareError as err:
                log.info("redoing slice %d: %s", sl["id"], err)  # stale: overwritten below
        todo.append(sl["id"])
    return todo


def run_task(data_cfg, plan: Dict[str, Any], task: int, tasks: int) -> int:
    """Run the unfinished slices of task ``task`` of ``tasks``; returns how many were run."""
    todo = _todo(data_cfg, plan, task, tasks)
    if not todo:
        return 0
    log.info("task %d/%d: %d slice(s) to do of %d", task, tasks, len(todo), len(plan["slices"]))
    workers = min(max(1, int(data_cfg.prepare_workers)), len(todo))
    start, done, tokens = time.monotonic(), 0, 0
    try:
        for slice_id, n_tokens in _map_slices(data_cfg, plan, todo, workers):
            done += 1
            tokens += n_tokens
            rate = tokens / max(time.monotonic() - start, 1e-9)
            log.info("slice %d done (%d/%d of this task; %.0fk tokens/s)", slice_id, done, len(todo), rate / 1e3)
    except OutOfSpace as full:
        raise space.no_space(data_cfg, full.reason, space.remaining_need(data_cfg, plan, todo, full)) from None
    return done


def _map_slices(data_cfg, plan, todo: List[int], workers: int):
    """(slice id, tokens) per finished slice. Slices of files are read by the worker that runs them;
    blocks of a stream (kind "docs") are read here in one pass and handed out, so that no slice
    re-reads the stream up to its start."""
    stream = plan["slices"][0]["kind"] == "docs"
    jobs = _stream_jobs(data_cfg, plan, todo) if stream else ((s, None) for s in todo)
    if workers <= 1 or not _can_fork_workers():
        _init_worker(data_cfg, plan)
        for slice_id, docs in jobs:
            yield _slice_job(slice_id, docs)
        return
    # fork: a spawned worker would re-import the package (seconds); workers only run tokenizers and I/O.
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(data_cfg, plan))
    try:
        pending: set = set()
        for slice_id, docs in jobs:
            pending.add(pool.submit(_slice_job, slice_id, docs))
            if len(pending) >= 2 * workers:  # back-pressure: a stream is never read far ahead
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                yield from (f.result() for f in done)
        for f in as_completed(pending):
            yield f.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _stream_jobs(data_cfg, plan, todo: List[int]) -> Iterator[Tuple[int, List[str]]]:
    wanted = {plan["slices"][i]["start"]: i for i in todo}
    step = data_cfg.slice_documents
    docs: List[str] = []
    for i, doc in enumerate(sources.iter_documents(data_cfg)):
        if i - i % step in wanted:
            docs.append(doc)
        if (i + 1) % step == 0 and docs:
            yield wanted[i + 1 - step], docs
            docs = []
    if docs:
        last = max(wanted)
        yield wanted[last], docs


def _can_fork_workers() -> bool:
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    # spawn re-imports __main__ by path; a script read from stdin has none
    return "fork" in mp.get_all_start_methods() or not main_file or os.path.exists(main_file)


_WORKER: Dict[str, Any] = {}


def _init_worker(data_cfg, plan) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
    _WORKER.update(cfg=data_cfg, plan=plan, tok=slicelib.load_tokenizer_of(data_cfg, plan))


def _slice_job(slice_id: int, docs: Optional[List[str]] = None) -> Tuple[int, int]:
    partial = slicelib.run_slice(_WORKER["cfg"], _WORKER["plan"], _WORKER["tok"], slice_id, docs)
    return slice_id, sum(partial["splits"][k]["tokens"] for k in ("train", "val"))


# --- CLI ----------------------------------------------------------------------------------------


def task_from_env(task: Optional[int], tasks: Optional[int]) -> Tuple[int, int]:
    """``--task/--tasks``, else a SLURM job array's, else an srun step's task index and count."""
    if tasks is not None:
        return (task or 0), tasks
    env = os.environ
    if env.get("SLURM_ARRAY_TASK_ID") and env.get("SLURM_ARRAY_TASK_COUNT"):
        first = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        return int(env["SLURM_ARRAY_TASK_ID"]) - first, int(env["SLURM_ARRAY_TASK_COUNT"])
    # an srun step's tasks (SLURM_STEP_NUM_TASKS is unset in the batch script itself, which is one task)
    if int(env.get("SLURM_STEP_NUM_TASKS", "1") or 1) > 1 and env.get("SLURM_PROCID"):
        return int(env["SLURM_PROCID"]), int(env["SLURM_STEP_NUM_TASKS"])
    return 0, 1


def summary(manifest: Dict[str, Any]) -> str:
    sp = manifest["splits"]
    val = sp.get("val", {"shards": [], "sequences": 0, "tokens": 0})
    files = manifest.get("slice_files")  # absent from manifests of earlier versions
    origin = f" from {slicelib.describe_slices(files)}" if files else ""
    return (
        f"{manifest['location']}: {len(sp['train']['shards'])} train shards ({sp['train']['sequences']:,} sequences, "
        f"{sp['train']['tokens']:,} tokens), {len(val['shards'])} val shards ({val['sequences']:,} sequences, "
        f"{val['tokens']:,} tokens){origin}; seq_len {manifest['seq_len']}, vocab {manifest['vocab_size']} "
        f"({manifest['dtype']}); tokenizer in {manifest['tokenizer']['path']}/"
    )


def main(cfg, task: Optional[int] = None, tasks: Optional[int] = None, step: str = "all") -> int:
    """``scale-hyper prepare [--task I --tasks N] [--plan | --merge]``; prints a summary."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    data, seed = cfg.data, cfg.train.seed
    i, n = task_from_env(task, tasks)
    if not 0 <= i < n:
        raise PrepareError(f"--task {i} is not in [0, --tasks {n}) — tasks are numbered from 0")
    try:
        if step == "plan":
            _validate(data)
            with space.full_disk_is_one_line(data):
                plan = get_plan(data, seed, create=True)
            what = slicelib.describe_slices(slicelib.slice_files(plan))
            print(f"planned {what} in {storage.join(data.output, slicelib.PLAN)}")
            return 0
        if step == "merge":
            with space.full_disk_is_one_line(data):
                manifest = merge_only(data, seed)
        elif n == 1 or shardlib.load_manifest(data.output, data.allow_pipe) is not None:
            manifest = ensure_prepared(data, seed=seed)
        else:
            manifest = prepare(data, seed, task=i, tasks=n)
    except ValueError as err:  # bad input from any part of prepare: one line, exit 2, nothing marked complete
        from scale_hyper.config import errors

        return errors.report(err)
    if manifest:
        print(f"prepared {summary(manifest)}")
    else:
        print(f"task {i}/{n}: its slices are done; the last task to finish writes the manifest")
    return 0
