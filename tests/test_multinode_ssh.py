"""Several nodes without SLURM: `deepspeed --hostfile H --master_addr A --module scale_hyper train ...`
over ssh, with DeepSpeed's default multi-node backend (pdsh), as the README documents it.

`.ci/start-sshd.sh` (run once by `.ci/run`) gives this machine two host names, `shssh1` (127.0.0.2) and
`shssh2` (127.0.0.3), an sshd on them and passwordless root ssh to both: two "nodes" of one slot each.
What DeepSpeed 0.19.8 does with them (deepspeed/launcher/runner.py, multinode_runner.PDSHRunner):
it ssh-checks the first host, then runs `pdsh -S -f 1024 -w shssh1,shssh2 'export ...; cd <cwd>;
<sys.executable> -u -m deepspeed.launcher.launch --world_info=... --node_rank=%n --master_addr=A ...'`;
pdsh replaces `%n` by each host's position in the hostfile, which is the node rank. The exports are the
launcher's environment variables starting with MLFLOW, PYTHON, MV2, UCX (and NCCL on CUDA machines)
plus every KEY=VALUE line of `.deepspeed_env` in the current or home directory; nothing else (not PATH)
reaches the remote ranks.

* a probe script through the same launch: each rank reports RANK/LOCAL_RANK/WORLD_SIZE, its node rank
  (CROSS_RANK), MASTER_ADDR/PORT, a variable that only `.deepspeed_env` can have delivered, and joins
  one gloo all_reduce;
* training: hyperbert-tiny, 2 nodes x 1 rank, a few steps; it finishes, with the world and master
  the hostfile implies, a checkpoint and the Hugging Face export.

Skipped, with the reason, where sshd for those names is not up and CI is not set; under CI=true
(`.ci/run`) a missing setup fails instead.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import List

import pytest
from conftest import SHELLCHECK_HINT, need_program, unavailable
from launch import free_port, prepare_shards

REPO = Path(__file__).resolve().parents[1]
HOSTS = ["shssh1", "shssh2"]
DATA = ["data.max_documents=200", "data.vocab_size=512", "data.seq_len=64", "data.sequences_per_shard=128"]
TRAIN = [
    "hyperbert-tiny", *DATA, "train.micro_batch_size=8", "train.global_batch_size=16", "train.max_steps=4",
    "train.log_every=1", "train.eval_batches=2", "deepspeed.precision=fp32",
]  # fmt: skip
MARK = "reached every node"

PROBE = """
import datetime, os, sys
import torch
import torch.distributed as dist
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
total = torch.ones(1)
dist.all_reduce(total)
e = os.environ
print(f"probe: rank {e['RANK']}/{e['WORLD_SIZE']} local {e['LOCAL_RANK']} node {e['CROSS_RANK']}/{e['CROSS_SIZE']} "
      f"master {e['MASTER_ADDR']}:{e['MASTER_PORT']} mark [{e.get('SH_DEEPSPEED_ENV_MARK', '')}] "
      f"omp {e.get('OMP_NUM_THREADS', '')} all_reduce {int(total.item())}", flush=True)
dist.destroy_process_group()
"""


def _ssh_ok(host: str) -> bool:
    try:
        proc = subprocess.run(
            ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", host, "true"], capture_output=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


@pytest.fixture(scope="module")
def nodes() -> List[str]:
    missing = [exe for exe in ("ssh", "pdsh", "deepspeed") if shutil.which(exe) is None]
    down = [] if missing else [h for h in HOSTS if not _ssh_ok(h)]
    if missing or down:
        why = (
            f"not installed: {', '.join(missing)}" if missing else f"no passwordless ssh to {', '.join(down)}"
        ) + " (run `sudo bash .ci/start-sshd.sh`: sshd + pdsh, two host names for this machine)"
        unavailable(f"the multi-node ssh setup is missing: {why}")
    return HOSTS


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, nodes) -> Path:
    """The launch directory: shards, hostfile, .deepspeed_env (DeepSpeed reads it from the current dir)."""
    work = prepare_shards(tmp_path_factory.mktemp("ssh-nodes"), ["hyperbert-tiny", *DATA])
    (work / "hostfile").write_text("".join(f"{h} slots=1\n" for h in nodes))
    # One KEY=VALUE per line, no comments or blank lines (DeepSpeed splits every line at its first '=').
    (work / ".deepspeed_env").write_text(f"OMP_NUM_THREADS=1\nSH_DEEPSPEED_ENV_MARK={MARK}\n")
    (work / "probe.py").write_text(PROBE)
    return work


def deepspeed(work: Path, *args: str, timeout: float = 300) -> str:
    # Launched the way a user on the first node would; the environment we pass is NOT what the remote
    # ranks get (they are started by sshd): only the exports on the pdsh command line reach them.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SH_")}
    env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = ["deepspeed", "--hostfile", "hostfile", "--master_addr", HOSTS[0], "--master_port", str(free_port()), *args]
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-8000:]
    assert re.search(r"cmd = pdsh -S -f \d+ -w shssh1,shssh2 ", out), out[-8000:]  # the default backend: pdsh
    return out


@pytest.mark.slow
def test_hostfile_launch_over_ssh_ranks_nodes_master_and_env(workdir):
    out = deepspeed(workdir, "probe.py")
    port = re.search(r"--master_port=(\d+)", out).group(1)
    # pdsh -S prefixes every line with the host it came from.
    probes = sorted(re.findall(r"^(\S+): probe: (.*)$", out, re.M), key=lambda m: m[1])
    assert probes == [
        ("shssh1", f"rank 0/2 local 0 node 0/2 master shssh1:{port} mark [{MARK}] omp 1 all_reduce 2"),
        ("shssh2", f"rank 1/2 local 0 node 1/2 master shssh1:{port} mark [{MARK}] omp 1 all_reduce 2"),
    ], out[-8000:]


@pytest.mark.slow
def test_hostfile_launch_over_ssh_trains(workdir):
    out = deepspeed(workdir, "--module", "scale_hyper", "train", *TRAIN, f"data.output={workdir}/shards")
    port = re.search(r"--master_port=(\d+)", out).group(1)
    for node_rank, host in enumerate(HOSTS):
        assert re.search(rf"^{host}: .*nnodes=2, num_local_procs=1, node_rank={node_rank}$", out, re.M), out[-8000:]
    assert re.search(rf"^shssh1: \[scale-hyper\] world 2 \(rank 0, local 0, master shssh1:{port}\)", out, re.M)
    assert re.search(r"^shssh1: === scale-hyper: training finished ===$", out, re.M), out[-8000:]
    assert re.search(r"^shssh1: steps\s+4 ", out, re.M), out[-8000:]
    assert all(f"{h}: " in out and re.search(rf"^{h}: .*exits successfully", out, re.M) for h in HOSTS)
    run = workdir / "runs" / "default"
    assert (run / "checkpoints" / "step_4").is_dir() and (run / "hf" / "config.json").is_file()


def test_start_sshd_script_is_valid_bash():
    proc = subprocess.run(["bash", "-n", str(REPO / ".ci" / "start-sshd.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    exe = need_program("shellcheck", SHELLCHECK_HINT)
    proc = subprocess.run([exe, str(REPO / ".ci" / "start-sshd.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
