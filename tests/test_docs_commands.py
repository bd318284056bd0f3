"""Docs that run: every shell command in README.md, docs/*.md, slurm/README.md and docker/README.md is
executed here with its text unchanged, or sits in NOT_RUNNABLE below with the reason it cannot run on
the test machine, or in COVERED with the test that already runs it. CONTRIBUTING.md ("A documented
shell command") states the rules; in short:

* Commands: each top-level shell statement of a ```bash / ```sh / ```shell block (a line, a line with
  `\\` continuations, a loop, a heredoc, a multi-line quoted assignment), the `$ ` lines of a ```console
  block, and every inline code span that starts with `scale-hyper VERB` unless it is a synopsis (it has
  a placeholder: `<...>`, `[...]`, `...`, an ALL-CAPS word) or names a verb that cannot run without
  arguments (`scale-hyper eval`). A fence without a language must not hold commands.
* Each document runs as ONE bash session, in document order, in a scratch directory laid out like the
  repository (links to pyproject.toml, scale_hyper/, ds_configs/, docker/; a copy of slurm/; corpus/*.txt;
  the shared shard set), so a block may use a variable or a run directory an earlier one made. A
  not-runnable command is left out (and whatever needs its output is not runnable either, saying so).
* The one shrinking mechanism: the session exports `SCALE_HYPER_APPEND` = OVERLAY (below), which the CLI
  appends to every verb's CONFIG arguments, so every `scale-hyper`/`deepspeed`/`torchrun`/`srun` run
  trains a tiny geometry for 2 steps on a small corpus. sbatch templates are submitted as shipped,
  from a copy whose `#SBATCH` hardware lines (partition, nodes, GPUs, tasks, CPUs, time) are the test
  cluster's; the job gets the overlay through sbatch's exported environment; the test waits for it
  and wants COMPLETED, exit 0 and (training templates) `training finished` in its log.
* XFAIL: commands that fail today for a reason an open issue fixes (strict: once they pass, the mark
  must go).

A new command in these files is run by the next test session: if it cannot run here it fails until it
gets an entry in NOT_RUNNABLE with its reason.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest
from conftest import unavailable
from launch import free_port
from test_slurm import TERMINAL, Job, cluster  # noqa: F401  (cluster: tests/test_slurm.py's SLURM fixture, reused)

REPO = Path(__file__).resolve().parents[1]

DOC_FILES = ["README.md", *sorted(p.relative_to(REPO).as_posix() for p in (REPO / "docs").glob("*.md")),
             "slurm/README.md", "docker/README.md"]  # fmt: skip

# The `ci` overlay: appended (SCALE_HYPER_APPEND) to every documented scale-hyper command. Tiny geometry for
# every mixer, a 200-document corpus, 512-token vocabulary, 64-token sequences, 2 steps of 16 sequences.
# Batch keys are shrunk, not relaxed: 16 per step with a micro batch of at most 16, so a command that
# cannot split a global batch over its ranks still fails as it would for a user.
OVERLAY = (
    "model.hidden_size=32 model.num_layers=2 model.num_heads=2 model.ffn_size=64 model.max_position=64 "
    "model.hyper_width=16 model.hyper_heads=2 model.hyper_ffn_ratio=2 model.mixer_width=32 "
    "data.max_documents=200 data.vocab_size=512 data.seq_len=64 data.sequences_per_shard=128 "
    "train.max_steps=2 train.global_batch_size=16 train.micro_batch_size=16 train.eval_batches=2 train.log_every=1"
)
SHARDS = "data/stdlib-v512-s64"  # what every command without its own data.output reads (defaults.yaml + OVERLAY)
# Paths documents name for shards that their earlier commands prepared at the real geometry under the
# default name (docs/results.md: the tiny presets' data/stdlib-v4096-s128); under the overlay those
# commands wrote SHARDS, so these are links to the same shard set.
SHARDS_ALIASES = ["data/stdlib-v4096-s128"]

# The #SBATCH hardware lines of the templates' copies: the test cluster (2 CPU nodes, 2 CPUs each), no
# GPUs, 1 CPU per task, 20 minutes; a multi-node template gets 2 nodes x 1 task, a single-node one
# 1 node x 2 tasks (the launcher template keeps its one task per node).
SBATCH_COMMON = {"--gpus-per-node": "0", "--cpus-per-task": "1", "--time": "20"}


def sbatch_hardware(text: str, partition: str) -> Dict[str, str]:
    nodes = int(re.search(r"^#SBATCH --nodes=(\d+)", text, re.M).group(1))
    tasks = re.search(r"^#SBATCH --ntasks-per-node=(\d+)", text, re.M).group(1)
    multi = nodes > 1
    return {"--partition": partition, **SBATCH_COMMON, "--nodes": "2" if multi else "1",
            "--ntasks-per-node": "1" if multi or tasks == "1" else "2"}  # fmt: skip


GPU = "needs CUDA GPUs"
INSTALL = "installs packages into the environment from the package index (what .ci/run itself does first)"
DOCKER = "needs a Docker engine (none on the test machines: the images are built with buildah, docker/build.sh)"
IMAGE_GPU = (
    "the GPU image: several GB of CUDA wheels and a build longer than the CI budget; built once by hand, its "
    "figures are in docker/README.md"
)
ENROOT = "needs enroot (not installable here: neither a Debian 12 package nor on PyPI) and a registry or Docker daemon"
APPTAINER = "needs Apptainer (not installable here: neither a Debian 12 package nor on PyPI)"
HUB = "downloads from the Hugging Face Hub (internet; the test machines reach only package registries)"

# (document, start of the command's text with whitespace collapsed) -> why it cannot run here.
NOT_RUNNABLE: Dict[Tuple[str, str], str] = {
    # README.md
    ("README.md", "pip install torch==2.13.0 && pip install -e . && scale-hyper train"): INSTALL,
    ("README.md", 'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest'): (
        INSTALL + "; then the test suite itself, which this test is part of"
    ),
    ("README.md", "scale-hyper train hyperbert-base model.mixer_kernel=triton"): GPU + " (Triton kernel, CUDA only)",
    ("README.md", "deepspeed --hostfile hostfile --master_addr node-1"): (
        "needs several machines reachable over ssh (node-1, node-2); tests/test_multinode_ssh.py runs this "
        "launch on two host names of the test machine"
    ),
    # docs/experiments.md: sweeps on WikiText-103 / C4 from the Hub, 8-GPU nodes, S3, GLUE
    ("docs/experiments.md", "scale-hyper sweep sweeps/c4-base.yaml --dry-run"): (
        "under the docs overlay (global batch 16) the spec's 64 GPUs per run cannot split the batch; "
        "tests/test_sweep.py::test_shipped_spec_dry_run runs this dry run on the spec as shipped"
    ),
    ("docs/experiments.md", "scale-hyper sweep sweeps/cpu-study.yaml --local"): (
        "48 training runs and their evaluations (about 39 min on 2 cores as shipped, over 10 min even under "
        "the overlay); tests/test_sweep_local.py runs the same --local runner end to end on a 2-run grid, "
        "tests/test_sweep_slurm.py the --slurm one"
    ),
    ("docs/results.md", "scale-hyper sweep sweeps/cpu-study.yaml --local"): (
        "the CPU study itself, 48 training runs (39 min on 2 cores); tests/test_sweep_local.py runs the same "
        "--local runner end to end on a 2-run grid"
    ),
    ("docs/experiments.md", "scale-hyper prepare data.source=hf:wikitext"): HUB + " (WikiText-103)",
    ("docs/experiments.md", "scale-hyper sweep sweeps/wt103-mini.yaml --slurm"): (
        "submits 60 8-GPU jobs (and GLUE from the Hub) on the WikiText-103 shards of the Hub download above"
    ),
    ("docs/experiments.md", "scale-hyper sweep sweeps/wt103-transplant.yaml --slurm"): (
        "submits 60 8-GPU jobs on the WikiText-103 shards of the Hub download above"
    ),
    ("docs/experiments.md", "scale-hyper prepare data.source=hf:allenai/c4"): (
        HUB + " (C4, hundreds of GB) and writes to s3://"
    ),
    ("docs/experiments.md", "scale-hyper sweep sweeps/c4-base.yaml --slurm"): (
        "submits 45 64-GPU jobs on the C4 shards in s3:// (the test cluster has 2 CPU nodes)"
    ),
    ("docs/experiments.md", "deepspeed --num_gpus 8 --module scale_hyper train hyperbert-mini"): (
        "8 GPUs, on the WikiText-103 shards of the Hub download above"
    ),
    # docs/benchmarks.md
    ("docs/benchmarks.md", "scale-hyper bench train"): (
        "a throughput benchmark whose figures are the point: minutes of timed steps by design (the overlay "
        "does not shrink its sweep); tests/test_bench.py runs the same verb narrowed by SCALE_HYPER_BENCH_*"
    ),
    ("docs/benchmarks.md", "scale-hyper bench prepare --files 100000"): (
        "prepares 100,000 files (~250 MB) three times: tens of minutes on 2 cores by design (the overlay does "
        "not shrink its file count); tests/test_prepare_small_files.py runs the same measurement at 2,000 files"
    ),
    # slurm/README.md
    ("slurm/README.md", "cd /path/to/scale-hyper"): "a placeholder path (the session already runs in a checkout)",
    ("slurm/README.md", "$EDITOR slurm/multi-node-srun.sbatch"): (
        "opens an interactive editor (the test's copy has its #SBATCH lines set already)"
    ),
    ("slurm/README.md", "tail -f logs/scale-hyper-<jobid>.out"): "follows a log forever, with a placeholder job id",
    ("slurm/README.md", "sbatch --nodes=8 --time=48:00:00"): "asks for 8 nodes (the test cluster has 2)",
    ("slurm/README.md", "mkdir -p logs && sbatch --array=0-15"): (
        "a 16-task array over a C4 copy on /shared (none here); tests/test_prepare_slurm.py runs prepare.sbatch as "
        "a 2-task array, interrupted and resumed, on the test cluster"
    ),
    # docker/README.md: the images are built once per CI run by .ci/build-image.sh and run by tests/test_docker.py
    ("docker/README.md", "apt-get install -y mmdebstrap buildah podman runc catatonit"): (
        "installs system packages (.ci/build-image.sh installs them when missing)"
    ),
    ("docker/README.md", "docker/build.sh cpu #"): (
        "its default torch index (download.pytorch.org) is unreachable here; .ci/build-image.sh runs "
        "docker/build.sh cpu --host-pip --torch-index-url '' once per CI run"
    ),
    ("docker/README.md", "docker/build.sh gpu #"): IMAGE_GPU,
    ("docker/README.md", "docker/build.sh cpu --mirror http://apt.example.internal/debian"): (
        "a site's Debian/PyPI mirrors and proxy CA (example hosts that do not exist)"
    ),
    ("docker/README.md", "docker build -f docker/Dockerfile.cpu"): DOCKER + "; and example mirror hosts",
    ("docker/README.md", "docker build -f docker/Dockerfile -t"): DOCKER + "; the NGC base image is many GB",
    ("docker/README.md", 'podman run --rm --network none -v "$PWD/work:/workspace" scale-hyper:0.1.0-cpu train'): (
        "the embedded job (300 steps) in the image, which the docs overlay cannot reach (podman passes no "
        "environment); tests/test_docker.py runs this command with the overlay as arguments"
    ),
    ("docker/README.md", "docker run --rm --gpus all"): DOCKER + "; " + GPU,
    ("docker/README.md", "podman run --rm --network none --shm-size 1g"): (
        "the doctor in the image, which the docs overlay cannot reach (podman passes no environment); "
        "tests/test_docker.py runs this command with the overlay as arguments (ZeRO-Offload, no resume check)"
    ),
    ("docker/README.md", "enroot import -o scale-hyper.sqsh docker://"): ENROOT,
    ("docker/README.md", "enroot import -o scale-hyper.sqsh dockerd://"): ENROOT,
    ("docker/README.md", "apptainer build scale-hyper.sif docker-daemon://"): APPTAINER,
    ("docker/README.md", "apptainer build scale-hyper.sif docker://"): APPTAINER,
    ("docker/README.md", "apptainer run --nv scale-hyper.sif"): APPTAINER,
    ("docker/README.md", "bash docker/install.sh --cpu #"): INSTALL,
    ("docker/README.md", "bash docker/install.sh --cpu --editable"): INSTALL,
    ("docker/README.md", "bash docker/install.sh --gpu"): INSTALL + "; " + GPU,
}

# (document, start of the command's text) -> the test that already runs this command (the same launch or the
# same template, with assertions on what it did, where this test checks only the exit status). The session
# leaves it out like a not-runnable one, so CI runs it once. test_covered_commands_name_existing_tests keeps
# every named test real.
PIPELINE = "tests/test_eval_pipeline.py::"
SUPERSEDED = "a superseded record (train / eval / transplant / report, exit codes only); "
SRUN = (
    "tests/test_slurm.py::test_preempted_job_checkpoints_requeues_and_resumes runs multi-node-srun.sbatch to completion"
)
COVERED: Dict[Tuple[str, str], str] = {
    # README.md
    ("README.md", "torchrun --nproc_per_node 2 -m scale_hyper train deepspeed.zero_stage=3"): (
        "tests/test_batch_resume.py::test_readme_torchrun_line_runs_as_written (and checks the micro × accumulation split)"
    ),
    ("README.md", "scale-hyper checkpoint verify runs/default"): (
        "tests/test_checkpoint_integrity.py::test_a_damaged_newest_checkpoint_is_named_set_aside_and_the_run_resumes_"
        "from_the_newest_intact (verify on a run directory: intact and damaged checkpoints; runs/default is made by "
        "the torchrun line above, itself covered)"
    ),
    ("README.md", "torchrun --nproc_per_node 2 -m scale_hyper doctor deepspeed.zero_stage=3 --json"): (
        "tests/test_doctor.py::test_two_rank_doctor_fp32_under_torchrun (the same launch; checks every row)"
    ),
    ("README.md", "scale-hyper transplant runs/default --layers 8"): (
        PIPELINE + "test_continue_training_from_a_bert_transplant (transplant, then train.init_from=DIR)"
    ),
    ("README.md", "mkdir -p logs && sbatch slurm/multi-node-srun.sbatch"): SRUN,
    # docs/results.md: sections 1, 2 and the appendix, kept as measured (section 0's study is a sweep)
    ("docs/results.md", "for m in hyperbert bert hypermixer hyla; do"): SUPERSEDED
    + PIPELINE
    + "test_eval_checkpoint_run_dir_and_export_agree_and_log",
    ("docs/results.md", "for m in hyperbert bert hypermixer; do"): SUPERSEDED
    + PIPELINE
    + "test_eval_checkpoint_run_dir_and_export_agree_and_log",
    ("docs/results.md", "scale-hyper report cmp-mini"): SUPERSEDED + PIPELINE + "test_glue_from_checkpoint_and_report",
    ("docs/results.md", "for lr in 2e-3 5e-4; do"): SUPERSEDED
    + PIPELINE
    + "test_eval_checkpoint_run_dir_and_export_agree_and_log",
    ("docs/results.md", "for m in hyperbert bert; do scale-hyper transplant"): SUPERSEDED
    + PIPELINE
    + "test_continue_training_from_a_bert_transplant",
    ("docs/results.md", "scale-hyper report transplant-mini"): SUPERSEDED
    + PIPELINE
    + "test_glue_from_checkpoint_and_report",
    ("docs/results.md", "for m in hyperbert bert; do scale-hyper train $m-tiny"): SUPERSEDED
    + PIPELINE
    + "test_continue_training_from_a_bert_transplant",
    ("docs/results.md", "for seed in 1234 2; do"): SUPERSEDED
    + PIPELINE
    + "test_eval_checkpoint_run_dir_and_export_agree_and_log",
    ("docs/results.md", "scale-hyper report cmp-tiny"): SUPERSEDED + PIPELINE + "test_glue_from_checkpoint_and_report",
    ("docs/results.md", "scale-hyper transplant runs/hyperbert-seed1234"): SUPERSEDED
    + PIPELINE
    + "test_transplant_from_checkpoint_then_eval",
    ("docs/results.md", "scale-hyper eval runs/hyperbert-L4-init"): SUPERSEDED
    + PIPELINE
    + "test_transplant_from_checkpoint_then_eval",
    ("docs/results.md", "scale-hyper transplant runs/bert-seed1234"): SUPERSEDED
    + PIPELINE
    + "test_transplant_from_checkpoint_then_eval",
    ("docs/results.md", "scale-hyper eval runs/bert-L4-init"): SUPERSEDED
    + PIPELINE
    + "test_transplant_from_checkpoint_then_eval",
    # slurm/README.md: the templates as submitted by tests/test_slurm.py (environment and --export included)
    ("slurm/README.md", "sbatch slurm/multi-node-srun.sbatch train.max_steps=100000"): SRUN,
    ("slurm/README.md", "RUN_NAME=ablation-lr3 sbatch slurm/multi-node-srun.sbatch"): SRUN
    + " (RUN_NAME and CONFIG by --export)",
    ("slurm/README.md", "sbatch --export=ALL,CONFIG=hyperbert-large,RUN_NAME=large"): SRUN
    + " (CONFIG and RUN_NAME by --export)",
    ("slurm/README.md", "sbatch --partition=debug --gpus-per-node=0 --nodes=2"): (
        "tests/test_slurm.py::test_multi_node_launcher_ranks_and_training (this submission, with checks of every rank)"
    ),
}

# (document, start of the command's text) -> why it fails today, naming the issue that fixes it. strict: an
# XPASS fails the test, so the entry goes when the fix lands. Empty: the README's torchrun/deepspeed
# examples, which failed before issue 12 item 1 (micro 32 = global 32 in every preset), now pass.
XFAIL: Dict[Tuple[str, str], str] = {}


@dataclass(frozen=True)
class Command:
    doc: str
    line: int  # 1-based line of the command's first line in the document
    text: str  # exactly as written (continuations and loops included)
    inline: bool = False

    @property
    def key(self) -> str:
        return " ".join(self.text.split())

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"


# ------------------------------------------------------------------------------------------------
# Extraction
# ------------------------------------------------------------------------------------------------
SHELL_LANGS = {"bash", "sh", "shell", "console"}
FENCE = re.compile(r"^(\s*)(```+|~~~+)\s*([\w+-]*)")
PLACEHOLDER = re.compile(r"[<>\[\]|…]|\.\.\.|\b[A-Z][A-Z0-9_]*\b")


def _complete(text: str) -> bool:
    """True when `text` is a syntactically complete shell statement (bash -n)."""
    if text.rstrip().endswith("\\"):
        return False
    proc = subprocess.run(["bash", "-n"], input=text + "\n", capture_output=True, text=True)
    return proc.returncode == 0 and "here-document" not in proc.stderr  # an open heredoc is only a warning


def _statements(lines: List[Tuple[int, str]]) -> List[Tuple[int, str]]:
    out, buf, start = [], [], 0
    for no, line in lines:
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue  # blank or comment between statements
        if not buf:
            start = no
        buf.append(line)
        if _complete("\n".join(buf)):
            out.append((start, "\n".join(buf)))
            buf = []
    assert not buf, f"unterminated shell statement at line {start}: {buf}"
    return out


def _verbs_needing_arguments() -> set:
    from scale_hyper.cli import build_parser

    parser, needy = build_parser(), set()
    verbs = next(a for a in parser._actions if a.dest == "verb").choices
    for verb in verbs:
        with contextlib.redirect_stderr(io.StringIO()):
            try:
                parser.parse_args([verb])
            except SystemExit:
                needy.add(verb)
    return needy | {"--help"}


def extract(doc: str) -> Tuple[List[Command], List[str]]:
    """The document's commands in order, and the problems (commands in a fence without a language)."""
    lines = (REPO / doc).read_text().splitlines()
    commands: List[Command] = []
    problems: List[str] = []
    verbs = None
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m:
            fence, lang = m.group(2), m.group(3).lower()
            j = i + 1
            while j < len(lines) and not lines[j].lstrip().startswith(fence):
                j += 1
            body = [(no + 1, lines[no]) for no in range(i + 1, j)]
            if lang == "console":
                body = [(no, text.lstrip()[2:]) for no, text in body if text.lstrip().startswith("$ ")]
            if lang in SHELL_LANGS:
                commands += [Command(doc, no, text) for no, text in _statements(body)]
            elif not lang:
                for no, text in body:
                    launcher = re.match(r"\s*(\$ )?(scale-hyper|deepspeed|torchrun|sbatch|srun|docker|pip) ", text)
                    if launcher and _complete(text):  # a diagram's `scale-hyper train (cli.py)` is not shell
                        problems.append(f"{doc}:{no}: a command in a fence without a language: {text.strip()}")
            i = j + 1
            continue
        for span in re.findall(r"(?<!`)`([^`\n]+)`(?!`)", lines[i]):
            if not span.startswith("scale-hyper ") or PLACEHOLDER.search(span):
                continue
            if verbs is None:
                verbs = _verbs_needing_arguments()
            words = span.split()
            if len(words) == 2 and words[1] in verbs:
                continue  # names a verb that needs arguments: prose, not a command
            if not re.fullmatch(r"[a-z]+", words[1]):
                continue  # `scale-hyper preflight: ...`: a log line
            commands.append(Command(doc, i + 1, span, inline=True))
        i += 1
    return commands, problems


def all_commands() -> List[Command]:
    out: List[Command] = []
    seen_inline = set()
    for doc in DOC_FILES:
        for cmd in extract(doc)[0]:
            if cmd.inline:  # one run per distinct inline command, where it first appears
                if cmd.key in seen_inline:
                    continue
                seen_inline.add(cmd.key)
            out.append(cmd)
    return out


def _lookup(table: Dict[Tuple[str, str], str], cmd: Command) -> Optional[str]:
    hits = [why for (doc, prefix), why in table.items() if doc == cmd.doc and cmd.key.startswith(prefix)]
    assert len(hits) <= 1, f"{cmd.id}: several entries match {cmd.key!r}"
    return hits[0] if hits else None


COMMANDS = all_commands()


# ------------------------------------------------------------------------------------------------
# Fast checks: the lists are exact, the mechanism is written down
# ------------------------------------------------------------------------------------------------
def skipped(cmd: Command) -> bool:
    """Left out of the session: not runnable here, or run by another test already."""
    return bool(_lookup(NOT_RUNNABLE, cmd) or _lookup(COVERED, cmd))


def test_lists_match_commands_exactly():
    for table in (NOT_RUNNABLE, COVERED, XFAIL):
        for doc, prefix in table:
            hits = [c for c in COMMANDS if c.doc == doc and c.key.startswith(prefix)]
            assert len(hits) == 1, f"{doc}: {prefix!r} matches {len(hits)} commands (stale or ambiguous entry)"
    twice = [c.id for c in COMMANDS if sum(bool(_lookup(t, c)) for t in (NOT_RUNNABLE, COVERED, XFAIL)) > 1]
    assert not twice, f"in more than one of NOT_RUNNABLE, COVERED, XFAIL: {twice}"
    assert all(why.strip() for why in NOT_RUNNABLE.values())
    assert len([c for c in COMMANDS if not skipped(c)]) >= 20  # the extraction finds commands


def test_covered_commands_name_existing_tests():
    for (doc, prefix), by in COVERED.items():
        names = re.findall(r"(tests/test_\w+\.py)::(test_\w+)", by)
        assert names, f"{doc}: {prefix!r}: COVERED must name the test (tests/FILE.py::test_name)"
        for path, name in names:
            assert re.search(rf"^def {name}\(", (REPO / path).read_text(), re.M), f"{path}::{name} does not exist"


def test_no_commands_hide_in_plain_fences():
    problems = [p for doc in DOC_FILES for p in extract(doc)[1]]
    assert not problems, "\n".join(problems)


def test_contributing_states_the_overlay():
    text = " ".join((REPO / "CONTRIBUTING.md").read_text().split())
    assert "SCALE_HYPER_APPEND" in text and "tests/test_docs_commands.py" in text
    for token in OVERLAY.split():
        assert token in text, f"CONTRIBUTING.md does not show the overlay's {token}"


def test_extraction_rules():
    fenced = [c for c in COMMANDS if c.doc == "docs/results.md" and not c.inline]
    assert any(c.text.startswith("for m in hyperbert bert hypermixer hyla; do") and c.text.endswith("done")
               for c in fenced)  # fmt: skip
    inline = {c.key for c in COMMANDS if c.inline}
    assert "scale-hyper config --explain train.lr" in inline
    assert not any(k in inline for k in ("scale-hyper eval", "scale-hyper bench", "scale-hyper export CKPT OUT"))


# ------------------------------------------------------------------------------------------------
# The sessions
# ------------------------------------------------------------------------------------------------
@dataclass
class Result:
    rc: int
    failed_inside: bool  # a command inside the statement (loop body, && list head) failed
    output: str


def _corpus(dest: Path) -> None:
    """corpus/*.txt for `prepare data.source='corpus/*.txt'`: English text (standard-library docstrings),
    one document per module (documents are separated by blank lines), about 1 MB: enough validation
    sequences for 8 ranks under the overlay."""
    import importlib

    dest.mkdir()
    names = ["argparse", "collections", "json", "pathlib", "subprocess", "typing", "os", "re", "string",
             "datetime", "decimal", "fractions", "functools", "itertools", "logging", "email.message",
             "http.client", "urllib.request", "tarfile", "zipfile", "sqlite3", "csv", "threading", "asyncio"]  # fmt: skip
    for n, name in enumerate(names):
        mod = importlib.import_module(name)
        parts = [mod.__doc__ or ""]
        for attr in sorted(dir(mod)):
            doc = getattr(getattr(mod, attr, None), "__doc__", None)
            if isinstance(doc, str) and not attr.startswith("_"):
                parts.append(doc)
        text = "\n".join(line for part in parts for line in part.splitlines() if line.strip())
        with open(dest / f"part-{n % 3}.txt", "a") as fh:
            fh.write(text + "\n\n")


def _sbatch_copy(src: Path, dest: Path, partition: str) -> None:
    """The template with only its #SBATCH hardware lines set for the test cluster."""
    want = sbatch_hardware(src.read_text(), partition)
    out = []
    for line in src.read_text().splitlines(keepends=True):
        m = re.match(r"#SBATCH (--[a-z-]+)=(\S+)", line)
        if m and m.group(1) in want:
            line = line.replace(f"{m.group(1)}={m.group(2)}", f"{m.group(1)}={want[m.group(1)]}", 1)
        out.append(line)
    dest.write_text("".join(out))
    changed = [a for a, b in zip(src.read_text().splitlines(), out, strict=True) if a != b.rstrip("\n")]
    assert all(line.startswith("#SBATCH ") for line in changed)


class Sessions:
    """Runs each document once per test session (on first use) and keeps every command's result."""

    def __init__(self, root: Path, shards: Path, partition: Optional[str]):
        self.root, self.shards, self.partition = root, shards, partition
        self.results: Dict[str, Dict[str, Result]] = {}
        self.errors: Dict[str, str] = {}
        self.jobs: List[Job] = []

    def workdir(self, doc: str) -> Path:
        work = self.root / doc.replace("/", "_").replace(".md", "")
        work.mkdir()
        for name in ("ds_configs", "docker", "scale_hyper", "sweeps", "pyproject.toml", "README.md"):
            (work / name).symlink_to(REPO / name)
        (work / "slurm").mkdir()
        for f in (REPO / "slurm").iterdir():
            if f.suffix == ".sbatch" and self.partition:
                _sbatch_copy(f, work / "slurm" / f.name, self.partition)
            else:
                shutil.copy(f, work / "slurm" / f.name)
        _corpus(work / "corpus")
        (work / SHARDS).parent.mkdir(parents=True)
        for path in (SHARDS, *SHARDS_ALIASES):
            (work / path).symlink_to(self.shards)  # the one prepared shard set
        return work

    def run(self, doc: str) -> Dict[str, Result]:
        if doc in self.errors:
            raise AssertionError(f"{doc}: the session could not run: {self.errors[doc]}")
        if doc not in self.results:
            try:
                self.results[doc] = self._run(doc)
            except Exception as err:
                self.errors[doc] = f"{type(err).__name__}: {err}"
                raise
        return self.results[doc]

    def _run(self, doc: str) -> Dict[str, Result]:
        work = self.workdir(doc)
        cmds = [c for c in COMMANDS if c.doc == doc]
        script = ["set -o errtrace"]
        for n, cmd in enumerate(cmds):
            if skipped(cmd) or ("sbatch " in cmd.text and not self.partition):
                continue
            script += [f"echo '@@docs {n} begin'", "__docs_bad=0", "trap '__docs_bad=1' ERR", cmd.text,
                       "__docs_rc=$?", "trap - ERR", f"echo \"@@docs {n} end $__docs_rc $__docs_bad\""]  # fmt: skip
        env = dict(os.environ)
        env.update(
            SCALE_HYPER_APPEND=OVERLAY, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
            PET_MASTER_PORT=str(free_port()),  # torchrun's --master-port: no clash with parallel test runs
        )  # fmt: skip
        log = work / "session.log"
        with open(log, "w") as fh:
            try:
                subprocess.run(
                    ["bash", "-c", "\n".join(script)],
                    cwd=work,
                    env=env,
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    timeout=1500,
                )  # fmt: skip  (< pytest-timeout)
            except subprocess.TimeoutExpired:
                print("\n@@docs session timed out after 1500 s", file=fh)  # commands not reached: no result
        text = log.read_text(errors="replace")
        results = {}
        for n, cmd in enumerate(cmds):
            m = re.search(rf"^@@docs {n} begin\n(.*?)^@@docs {n} end (\d+) (\d)$", text, re.S | re.M)
            if m:
                results[cmd.id] = Result(int(m.group(2)), m.group(3) == "1", m.group(1))
        return results

    def wait_jobs(self, output: str, cmd: Command) -> List[str]:
        ids = re.findall(r"^Submitted batch job (\d+)", output, re.M)
        assert ids, f"{cmd.id}: sbatch printed no job id:\n{output[-3000:]}"
        problems = []
        for job_id in ids:
            job = Job(job_id, Path("/nonexistent"))
            self.jobs.append(job)
            info = job.wait(900)
            job.log = Path(info.get("StdOut", "/nonexistent"))
            log = job.text()
            trains = "doctor" not in cmd.text  # the training templates end with the trainer's summary
            if (
                info["JobState"] != "COMPLETED"
                or info["ExitCode"] != "0:0"
                or (trains and "training finished" not in log)
            ):
                problems.append(f"job {job_id}: {info['JobState']} {info['ExitCode']}\n{log[-6000:]}")
        return problems


@pytest.fixture(scope="module")
def sessions(tmp_path_factory, request):
    try:
        partition: Optional[str] = request.getfixturevalue("cluster")["partition"]
    except pytest.skip.Exception:  # local runs only: under CI=true the fixture fails (conftest.unavailable)
        partition = None
    root = tmp_path_factory.mktemp("docs")
    shards = root / "shards"
    env = dict(os.environ, SCALE_HYPER_APPEND=OVERLAY)
    proc = subprocess.run([sys.executable, "-m", "scale_hyper", "prepare", f"data.output={shards}"], env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    shutil.rmtree("/tmp/runs/scale-hyper", ignore_errors=True)  # where slurm/README.md's CPU example writes
    s = Sessions(root, shards, partition)
    yield s
    for job in s.jobs:  # never leave a job behind
        if job.info().get("JobState") not in TERMINAL:
            subprocess.run(["scancel", job.id], capture_output=True)


def _params():
    out = []
    submits = {c.doc for c in COMMANDS if "sbatch " in c.text and not skipped(c)}  # docs whose session uses SLURM
    for cmd in COMMANDS:
        if skipped(cmd):
            continue
        why = _lookup(XFAIL, cmd)
        marks = [pytest.mark.xfail(strict=True, reason=why)] if why else []
        if cmd.doc in submits:  # the whole session shares the test cluster (one xdist group: conftest.py)
            marks.append(pytest.mark.slurm)
        out.append(pytest.param(cmd, id=cmd.id, marks=marks))
    return out


def xdist_group_of(item) -> Optional[str]:
    """One xdist group per document (conftest.py): its commands run as ONE session, on one worker."""
    cmd = getattr(item, "callspec", None) and item.callspec.params.get("cmd")
    return f"docs:{cmd.doc}" if cmd is not None else None


@pytest.mark.slow
@pytest.mark.parametrize("cmd", _params())
def test_documented_command_runs(cmd: Command, sessions: Sessions):
    if "sbatch " in cmd.text and not sessions.partition:
        unavailable("no SLURM cluster here (tests/test_slurm.py's `cluster` fixture says why)")
    results = sessions.run(cmd.doc)
    assert cmd.id in results, f"{cmd.id} did not run (the session stopped before it?):\n{cmd.text}"
    res = results[cmd.id]
    assert res.rc == 0 and not res.failed_inside, (
        f"{cmd.id} failed (rc {res.rc}{', a command inside failed' if res.failed_inside else ''}):\n"
        f"{cmd.text}\n--- output (last 6000 chars) ---\n{res.output[-6000:]}"
    )
    if "sbatch " in cmd.text:
        problems = sessions.wait_jobs(res.output, cmd)
        assert not problems, f"{cmd.id}: {cmd.text}\n" + "\n".join(problems)
