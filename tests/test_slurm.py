"""The sbatch templates in slurm/, run for real on a one-machine SLURM cluster.

`.ci/start-slurm.sh` (run by CI, or by the `cluster` fixture below when we are root) starts munged,
slurmctld and two slurmd daemons, i.e. two emulated nodes `shnode1`/`shnode2` on this host. The
templates are submitted unchanged: `sbatch` options override their `#SBATCH` lines (no GPUs, CPU
tasks, the test partition) and `--export=ALL,VAR=...` overrides their edit block.

* single-node.sbatch: 2 CPU ranks on one node; the run finishes, leaves a checkpoint and an MLflow
  run whose loss went down.
* multi-node-launcher.sbatch: one deepspeed launcher per node on two nodes; every rank reports the
  right RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR and training finishes.
* multi-node-srun.sbatch + a hung rank: SIGSTOP of rank 2 of 4 -> named by every live rank, exit 5 ->
  requeued (a newer checkpoint exists) -> resumes and finishes.
* multi-node-srun.sbatch + preemption: SIGUSR1 to the batch shell (what `--signal=B:USR1@120` sends
  before the time limit) -> checkpoint -> `scontrol requeue` -> the job resumes from that step and
  finishes; MLflow holds every step exactly once.

Skipped, with the reason, only where SLURM cannot run here (not root and no running cluster); under
CI=true that is a failure (conftest.unavailable), as for every test that reuses the `cluster` fixture.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Dict, List

import pytest
from conftest import SHELLCHECK_HINT, need_program, unavailable

REPO = Path(__file__).resolve().parents[1]
SLURM_DIR = REPO / "slurm"
TEMPLATES = ["single-node.sbatch", "multi-node-launcher.sbatch", "multi-node-srun.sbatch"]
SHELL_FILES = [*(f"slurm/{t}" for t in TEMPLATES), "slurm/common.sh", ".ci/start-slurm.sh"]

# The tiny job every run uses (shards are prepared once by the `shards` fixture).
DATA = ["data.max_documents=200", "data.vocab_size=512", "data.seq_len=64", "data.sequences_per_shard=128"]
TRAIN = [
    *DATA, "train.micro_batch_size=8", "train.global_batch_size=0", "train.log_every=1", "train.eval_batches=2",
    "train.eval_every=1000", "train.save_every=1000", "deepspeed.precision=fp32", "train.lr=3e-3",
]  # fmt: skip
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def run(cmd: List[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


# ------------------------------------------------------------------------------------------------
# Static checks (no cluster needed)
# ------------------------------------------------------------------------------------------------
def test_shell_passes_shellcheck():
    exe = need_program("shellcheck", SHELLCHECK_HINT)
    proc = run([exe, "-x", *SHELL_FILES], cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("name", TEMPLATES)
def test_template_layout(name):
    text = (SLURM_DIR / name).read_text()
    run_bash = run(["bash", "-n", str(SLURM_DIR / name)])
    assert run_bash.returncode == 0, run_bash.stderr
    edit = text.index("EDIT HERE")
    end = text.index("END OF EDIT BLOCK")
    block = text[edit:end]
    # One place to edit: every #SBATCH line and every site setting sits inside the marked block.
    assert all(text.index(line) in range(edit, end) for line in re.findall(r"^#SBATCH.*$", text, re.M))
    for key in ("--partition", "--nodes", "--gpus-per-node", "--time", "--output=logs/%x-%j.out", "--requeue",
                "--signal=B:USR1@", "--open-mode=append", "CONTAINER=", "IMAGE=", "DATA_DIR=", "RUNS_DIR=",
                "MLFLOW_TRACKING_URI="):  # fmt: skip
        assert key in block, f"{name}: {key} missing from the edit block"
    assert 'source "$SH_SLURM_DIR/common.sh"' in text
    assert "sh_train" in text


FAKE_SCONTROL = """#!/bin/sh
case "$1 $2" in
  "show hostnames") echo gpu-a01; echo gpu-a02 ;;
  "show node") echo "NodeName=$3 Arch=x86_64 NodeAddr=10.0.0.1 NodeHostName=$3" ;;
esac
"""


@pytest.mark.parametrize("container", ["none", "pyxis", "apptainer"])
def test_common_sh_builds_the_commands(tmp_path, container):
    """common.sh outside SLURM (a fake scontrol): rank layout, master, container wrapping, train args."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "scontrol").write_text(FAKE_SCONTROL)
    (tmp_path / "bin" / "scontrol").chmod(0o755)
    env = {
        "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "HOME": str(tmp_path), "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "exp", "SLURM_JOB_NODELIST": "gpu-a[01-02]", "SLURM_JOB_NUM_NODES": "2",
        "SLURM_GPUS_ON_NODE": "8", "SLURM_CPUS_PER_TASK": "64", "SLURM_SUBMIT_DIR": str(tmp_path),
        "CONTAINER": container, "IMAGE": "/img/scale-hyper.img", "DATA_DIR": "/srv/shards",
        "MLFLOW_TRACKING_URI": "sqlite:///" + str(tmp_path / "ml" / "m.db"),
    }  # fmt: skip
    script = (
        f'source {SLURM_DIR}/common.sh; sh_setup launcher train.lr=1e-3; sh_launcher_cmd "$MASTER_PORT"; '
        'printf "%s\\n" "MASTER=$MASTER_ADDR:$MASTER_PORT" "WORLD=$WORLD_SIZE" "OMP=$OMP_NUM_THREADS" '
        '"SRUN=${SH_SRUN_CONTAINER[*]}" "EXEC=${SH_EXEC[*]}" "LAUNCH=${SH_LAUNCH[*]}" "TRAIN=${SH_TRAIN_ARGS[*]}"'
    )
    proc = run(["bash", "-c", script], cwd=tmp_path, env=env)  # a job runs in its submit directory
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line and not line.startswith("["))
    assert out["MASTER"] == "10.0.0.1:29742" and out["WORLD"] == "16" and out["OMP"] == "8"
    assert "--no_ssh --node_rank=__NODE_RANK__ --master_addr 10.0.0.1 --master_port 29742" in out["LAUNCH"]
    hostfile = tmp_path / "runs" / "exp" / "hostfile.4242"
    assert hostfile.read_text() == "gpu-a01 slots=8\ngpu-a02 slots=8\n"
    assert out["TRAIN"].endswith("data.output=/srv/shards train.lr=1e-3")
    assert f"train.output_dir={tmp_path}/runs/exp" in out["TRAIN"]
    mounts = f"{tmp_path}:{tmp_path},/srv/shards:/srv/shards"  # run dir and sqlite store: inside the submit dir
    if container == "pyxis":
        assert (
            out["SRUN"]
            == f"--container-image=/img/scale-hyper.img --container-mounts={mounts} --container-workdir={tmp_path}"
        )
    elif container == "apptainer":
        assert out["EXEC"] == f"apptainer exec --bind {mounts} --pwd {tmp_path} --nv /img/scale-hyper.img"
    else:
        assert out["SRUN"] == "" and out["EXEC"] == ""


# ------------------------------------------------------------------------------------------------
# The cluster
# ------------------------------------------------------------------------------------------------
def _usable_nodes() -> Dict[str, int]:
    """Usable (idle or busy, not down) nodes of the default partition -> CPUs; {} when SLURM does not answer."""
    if shutil.which("sinfo") is None:
        return {}
    try:
        proc = run(["sinfo", "-h", "-N", "-o", "%N %t %c %P"], timeout=20)
    except subprocess.TimeoutExpired:
        return {}
    nodes = {}
    for line in proc.stdout.splitlines() if proc.returncode == 0 else []:
        node, state, cpus, part = line.split()
        if part.endswith("*") and state.rstrip("*~#!%$@^-") in ("idle", "mix", "alloc", "comp"):
            nodes[node] = int(cpus)
    return nodes


@pytest.fixture(scope="module")
def cluster() -> Dict[str, str]:
    nodes = _usable_nodes()
    if len(nodes) < 2:
        if os.geteuid() != 0:
            unavailable(
                "no running SLURM cluster with 2 idle nodes, and not root, so .ci/start-slurm.sh cannot start one"
            )
        proc = run(["bash", str(REPO / ".ci/start-slurm.sh")], timeout=600)
        if proc.returncode != 0 and "apt-get is not available" in proc.stderr:
            unavailable(f"SLURM cannot be installed here: {proc.stderr.strip()}")
        assert proc.returncode == 0, f".ci/start-slurm.sh failed:\n{proc.stdout}\n{proc.stderr}"
        nodes = _usable_nodes()
    assert len(nodes) >= 2 and min(nodes.values()) >= 2, f"need 2 idle nodes with >= 2 CPUs, sinfo: {nodes}"
    part = next(line.rstrip("*") for line in run(["sinfo", "-h", "-o", "%P"]).stdout.split() if line.endswith("*"))
    return {"partition": part}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """One prepared shard set for every job (preparing data is not what these tests are about)."""
    out = tmp_path_factory.mktemp("slurm-data") / "shards"
    proc = run(["scale-hyper", "prepare", "hyperbert-tiny", *DATA, f"data.output={out}"], timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


class Job:
    def __init__(self, job_id: str, log: Path):
        self.id, self.log = job_id, log

    def info(self) -> Dict[str, str]:
        out = run(["scontrol", "show", "job", "-o", self.id]).stdout
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else "<no log yet>"

    def wait(self, timeout: float, restarts: int = 0) -> Dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.info()
            if info.get("JobState") in TERMINAL and int(info.get("Restarts", 0)) >= restarts:
                return info
            time.sleep(2)
        raise AssertionError(
            f"job {self.id} not done after {timeout:.0f}s: {self.info().get('JobState')}\n{self.text()[-6000:]}"
        )

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.text())
            if m:
                return m
            if self.info().get("JobState") in TERMINAL:
                break
            time.sleep(1)
        raise AssertionError(f"job {self.id}: no /{pattern}/ in the log\n{self.text()[-6000:]}")


@pytest.fixture
def submit(cluster, tmp_path, request):
    jobs: List[Job] = []

    def _submit(template: str, name: str, sbatch: List[str], env: Dict[str, str], args: List[str]) -> Job:
        (tmp_path / "logs").mkdir(exist_ok=True)
        export = ",".join(["ALL", *(f"{k}={v}" for k, v in env.items())])
        assert all("," not in v for v in env.values())
        cmd = [
            "sbatch", "--parsable", f"--partition={cluster['partition']}", "--gpus-per-node=0", "--time=20",
            f"--job-name={name}", f"--chdir={tmp_path}", f"--output={tmp_path}/logs/%x-%j.out", f"--export={export}",
            *sbatch, str(SLURM_DIR / template), *args,
        ]  # fmt: skip
        proc = run(cmd, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        job_id = proc.stdout.strip().split(";")[0]  # "ID" or "ID;cluster"
        job = Job(job_id, tmp_path / "logs" / f"{name}-{job_id}.out")
        jobs.append(job)
        return job

    yield _submit
    for job in jobs:  # never leave a job behind, whatever happened
        if job.info().get("JobState") not in TERMINAL:
            run(["scancel", job.id])


def job_env(tmp_path: Path, shards: Path, name: str, **extra: str) -> Dict[str, str]:
    return {
        "CONFIG": "hyperbert-tiny", "RUNS_DIR": str(tmp_path / "runs"), "RUN_NAME": name, "DATA_DIR": str(shards),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "OMP_NUM_THREADS": "1", **extra,
    }  # fmt: skip


def mlflow_run(tmp_path: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("scale-hyper")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]  # one run, continued across a requeue
    return client, runs[0]


def loss_history(client, run_id: str) -> Dict[int, float]:
    history = client.get_metric_history(run_id, "loss")
    steps = [m.step for m in history]
    assert len(steps) == len(set(steps)), f"duplicated MLflow steps: {sorted(steps)}"
    return {m.step: m.value for m in history}


def preflight(text: str) -> List[Dict[str, str]]:
    pat = r"scale-hyper preflight: host \S+ node (\S+) rank (\d+)/(\d+) local (\d+) master (\S+):(\d+) all_reduce (\d+)"
    keys = ("node", "rank", "world", "local", "addr", "port", "sum")
    return sorted((dict(zip(keys, m, strict=True)) for m in re.findall(pat, text)), key=lambda r: int(r["rank"]))


def node_addr(node: str) -> str:
    out = run(["scontrol", "show", "node", node]).stdout
    m = re.search(r"NodeAddr=(\S+)", out)
    return m.group(1) if m else node


def first_node(info: Dict[str, str]) -> str:
    return run(["scontrol", "show", "hostnames", info["NodeList"]]).stdout.split()[0]


def trainer_world_line(text: str) -> re.Match:
    m = re.search(r"\[scale-hyper\] world (\d+) \(rank 0, local 0, master (\S+):(\d+)\)", text)
    assert m, text[-6000:]
    return m


# ------------------------------------------------------------------------------------------------
# Jobs
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_single_node_two_ranks_trains(submit, shards, tmp_path):
    job = submit(
        "single-node.sbatch", "single", ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1"],
        job_env(tmp_path, shards, "single"), [*TRAIN, "train.max_steps=20"],
    )  # fmt: skip
    info = job.wait(300)
    text = job.text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-6000:]

    ranks = preflight(text)  # one node, two tasks: local ranks 0 and 1
    addr = node_addr(first_node(info))
    port = 29500 + int(job.id) % 1000
    assert [(r["node"], r["rank"], r["world"], r["local"], r["addr"]) for r in ranks] == [
        ("0", "0", "2", "0", addr), ("0", "1", "2", "1", addr)]  # fmt: skip
    world = trainer_world_line(text)
    assert (world.group(1), world.group(2), int(world.group(3))) == ("2", addr, port)
    assert "training finished" in text

    ckpt = tmp_path / "runs" / "single" / "checkpoints" / "step_20"
    assert ckpt.is_dir() and any(ckpt.iterdir()), text[-3000:]
    client, mrun = mlflow_run(tmp_path)
    assert mrun.info.status == "FINISHED"
    losses = loss_history(client, mrun.info.run_id)
    assert max(losses) == 20
    first, last = [losses[s] for s in sorted(losses)[:3]], [losses[s] for s in sorted(losses)[-3:]]
    assert sum(last) / 3 < sum(first) / 3 - 0.1, losses


@pytest.mark.slow
def test_multi_node_launcher_ranks_and_training(submit, shards, tmp_path):
    job = submit(
        "multi-node-launcher.sbatch", "launcher", ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=2"],
        job_env(tmp_path, shards, "launcher", CPU_TASKS_PER_NODE="1"), [*TRAIN, "train.max_steps=6"],
    )  # fmt: skip
    info = job.wait(300)
    text = job.text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-6000:]

    nodes = run(["scontrol", "show", "hostnames", info["NodeList"]]).stdout.split()
    assert len(nodes) == 2
    hostfile = tmp_path / "runs" / "launcher" / f"hostfile.{job.id}"
    assert hostfile.read_text().split("\n")[:2] == [f"{nodes[0]} slots=1", f"{nodes[1]} slots=1"]

    addr, port = node_addr(nodes[0]), 29500 + int(job.id) % 1000
    ranks = preflight(text)  # one rank per node, node rank = SLURM_NODEID
    assert [(r["node"], r["rank"], r["world"], r["local"], r["addr"], r["sum"]) for r in ranks] == [
        ("0", "0", "2", "0", addr, "2"), ("1", "1", "2", "0", addr, "2")]  # fmt: skip
    world = trainer_world_line(text)
    assert (world.group(1), world.group(2), int(world.group(3))) == ("2", addr, port)
    assert "--no_ssh" in text and "training finished" in text
    assert (tmp_path / "runs" / "launcher" / "checkpoints" / "step_6").is_dir()


@pytest.mark.slow
def test_preempted_job_checkpoints_requeues_and_resumes(submit, shards, tmp_path):
    steps = 60
    job = submit(
        "multi-node-srun.sbatch", "preempt", ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1"],
        job_env(tmp_path, shards, "preempt", PREFLIGHT="0"), [*TRAIN, f"train.max_steps={steps}"],
    )  # fmt: skip
    job.wait_for(r"\[scale-hyper\] step [3-9]/", timeout=300)
    # What SLURM itself does at (time limit - 120 s) with --signal=B:USR1@120.
    assert run(["scancel", "--signal=USR1", "--batch", job.id]).returncode == 0
    info = job.wait(300, restarts=1)
    text = job.text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text[-8000:]

    saved = re.search(r"SIGUSR1.*checkpoint saved at step (\d+)", text)  # the trainer's stop line
    assert saved, text[-8000:]
    k = int(saved.group(1))
    assert 3 <= k < steps
    assert "requeueing job" in text
    assert re.search(rf"resumed from \S+step_{k} at step {k}\b", text), text[-8000:]
    assert re.search(rf"steps\s+{steps}\b", text) and text.count("training finished") == 1
    world = trainer_world_line(text)
    assert world.group(1) == "2" and world.group(2) == node_addr(first_node(info))

    client, mrun = mlflow_run(tmp_path)  # the same MLflow run continued: no lost or repeated steps
    assert mrun.info.status == "FINISHED"
    assert sorted(loss_history(client, mrun.info.run_id)) == list(range(1, steps + 1))


def batch_shell_pid(job_id: str) -> int:
    """The pid of a running job's batch script on this host (slurmd runs it as .../slurm_script)."""
    for pid in run(["pgrep", "-f", "slurm_script"]).stdout.split():
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"SLURM_JOB_ID={job_id}".encode() in environ:
            return int(pid)
    raise AssertionError(f"no batch script of job {job_id} found")


@pytest.mark.slow
def test_sigterm_to_a_running_srun_jobs_process_group_checkpoints_stops_and_a_resubmission_resumes(
    submit, shards, tmp_path
):
    """`kill -TERM -<pgid>` of a running 2-rank srun job's batch script (what a plain `scancel` sends the
    batch shell too): the trap forwards it to the step as USR1 (an srun that got TERM itself would
    SIGKILL the tasks; the step runs in its own session so it does not), the ranks checkpoint and exit
    0, and the job is NOT requeued (a requeue would undo a scancel). Submitting it again resumes."""
    steps = 60
    sbatch = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1"]
    env = job_env(tmp_path, shards, "term", PREFLIGHT="0", SCALE_HYPER_TEST_STEP_SECONDS="0.2")
    args = [*TRAIN, f"train.max_steps={steps}", "train.stop_check_every=1"]
    job = submit("single-node.sbatch", "term", sbatch, env, args)
    job.wait_for(r"\[scale-hyper\] step [3-9]/", timeout=300)
    os.killpg(os.getpgid(batch_shell_pid(job.id)), 15)
    info = job.wait(300)
    text = job.text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", text[-8000:]
    assert "SIGTERM (scancel, preemption or a kill: stop)" in text
    saved = re.search(r"stopped by SIGUSR1: checkpoint saved at step (\d+)", text)
    assert saved, text[-8000:]
    k = int(saved.group(1))
    assert "Killed" not in text and re.search(
        rf"training step exited with status 0 \(newest checkpoint: step {k}\)", text
    )
    assert f"stopped by SIGTERM with a checkpoint at step {k}: not requeueing" in text
    assert "training finished" not in text and "requeueing job" not in text

    again = submit("single-node.sbatch", "term", sbatch, env, args)
    again.wait(300)
    text = again.text()
    assert re.search(rf"resumed from \S+step_{k} at step {k}\b", text), text[-8000:]
    assert re.search(rf"steps\s+{steps}\b", text) and text.count("training finished") == 1


def rank_pid(job_id: str, rank: int) -> int:
    """The pid of a running job's training rank on this host (its loader workers share its environment:
    the rank is the one whose parent is not one of them)."""
    want = [f"SLURM_JOB_ID={job_id}".encode(), f"SLURM_PROCID={rank}".encode()]
    found = {}
    for pid in run(["pgrep", "-f", "scale.hyper train"]).stdout.split():
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        if all(w in environ for w in want):
            found[int(pid)] = ppid
    ranks = [pid for pid, ppid in found.items() if ppid not in found]
    assert len(ranks) == 1, f"rank {rank} of job {job_id}: {found}"
    return ranks[0]


@pytest.mark.slow
@pytest.mark.slurm
def test_a_stopped_rank_of_4_is_named_by_every_live_rank_and_the_job_requeues_and_finishes(submit, shards, tmp_path):
    """SIGSTOP of rank 2 of 4 (2 nodes x 2 tasks; what a hung GPU or a swapped-out node looks like):
    rank 0 decides from the heartbeats, ranks 1 and 3 print its verdict too, all exit 5, srun ends the
    step, and the template requeues (a newer checkpoint exists), so the job resumes and finishes."""
    from scale_hyper.engine.heartbeat import Timings

    minutes, steps = 0.15, 8
    job = submit(
        "multi-node-srun.sbatch", "hung", ["--nodes=2", "--ntasks-per-node=2", "--cpus-per-task=1"],
        job_env(tmp_path, shards, "hung", PREFLIGHT="0", DIST_TIMEOUT_MINUTES=str(minutes),
                SCALE_HYPER_TEST_STEP_SECONDS="0.5"),
        [*TRAIN, f"train.max_steps={steps}", "train.save_every=4"],
    )  # fmt: skip
    job.wait_for(r"checkpoint saved: \S+step_4", timeout=300)
    victim = rank_pid(job.id, 2)
    os.kill(victim, signal.SIGSTOP)
    stopped, t = time.monotonic(), Timings.of(minutes)
    job.wait_for(r"training step exited with status 5", timeout=t.timeout_s + t.grace_s + 60)
    took = time.monotonic() - stopped
    info = job.wait(300, restarts=1)
    text = job.text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text[-8000:]
    for rank in (0, 1, 3):
        assert re.search(rf"scale-hyper: rank {rank}: no heartbeat from rank 2 for \d+ s .* newest checkpoint: "
                         rf"\S+step_4 .*exit 5", text), text[-8000:]  # fmt: skip
    assert took <= t.timeout_s + t.grace_s + 10, took  # + 10 s: srun ending the step, the log's polling
    assert "a rank hung (status 5) after saving the checkpoint of step 4" in text and "requeueing job" in text
    assert re.search(r"resumed from \S+step_4 at step 4\b", text) and text.count("training finished") == 1
