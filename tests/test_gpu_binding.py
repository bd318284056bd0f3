"""One task, one GPU: the rank's device whether a task sees all of its node's GPUs or only its own.

This machine has no GPU, so torch.cuda's device count and set_device are MOCKED: the mock derives
the count from CUDA_VISIBLE_DEVICES exactly as the CUDA runtime does (unset = all of the node's 4
GPUs, "2" = one), and records what set_device was asked for. The environment handling (SLURM's
variables mapped onto RANK/LOCAL_RANK, the LOCAL_RANK that DeepSpeed then reads) is the real code.
"""

import os

import pytest
import torch

from scale_hyper.config.errors import is_user_error
from scale_hyper.launch import map_launcher_env, pick_device

NODE_GPUS = 4


@pytest.fixture
def fake_node(monkeypatch):
    """A node with NODE_GPUS GPUs as a task sees them through CUDA_VISIBLE_DEVICES (mocked CUDA)."""
    asked = []

    def visible() -> int:
        value = os.environ.get("CUDA_VISIBLE_DEVICES")
        return NODE_GPUS if value is None else len([v for v in value.split(",") if v.strip()])

    monkeypatch.setattr(torch.cuda, "is_available", lambda: visible() > 0)
    monkeypatch.setattr(torch.cuda, "device_count", visible)
    monkeypatch.setattr(torch.cuda, "set_device", asked.append)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return asked


def srun_task(monkeypatch, localid: int, procid: int, per_task_gpu: bool) -> dict:
    """The environment srun gives task `localid` of a 2-node × NODE_GPUS job, mapped as the trainer
    maps it (a dict: this process' own environment stays untouched). --gpus-per-task=1 /
    --gpu-bind=single:1 add CUDA_VISIBLE_DEVICES naming the task's one GPU (set for the mocked runtime)."""
    env = {"SLURM_PROCID": str(procid), "SLURM_LOCALID": str(localid), "SLURM_NTASKS": str(2 * NODE_GPUS),
           "SLURM_JOB_ID": "77", "MASTER_ADDR": "node1"}  # fmt: skip
    if per_task_gpu:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", str(localid))
    map_launcher_env(env)
    return env


@pytest.mark.parametrize("per_task_gpu", [False, True], ids=["all-gpus-visible", "one-gpu-per-task"])
def test_every_local_rank_gets_a_device_it_can_see(fake_node, monkeypatch, per_task_gpu):
    for localid in range(NODE_GPUS):
        env = srun_task(monkeypatch, localid, NODE_GPUS + localid, per_task_gpu)  # the second node's tasks
        assert env["LOCAL_RANK"] == str(localid) and env["RANK"] == str(NODE_GPUS + localid)
        device = pick_device("auto", int(env["LOCAL_RANK"]), env)
        want = 0 if per_task_gpu else localid
        assert device == torch.device("cuda", want)
        assert fake_node[-1] == want < torch.cuda.device_count()  # never an "invalid device ordinal"
        # DeepSpeed's own set_device(LOCAL_RANK), zero.Init and NCCL's device_id read this variable
        assert env["LOCAL_RANK"] == str(want)
    assert len(fake_node) == NODE_GPUS


def test_a_task_seeing_some_but_not_its_gpu_is_a_user_error(fake_node, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # e.g. --gpus-per-task=2 with 4 tasks per node
    env = {"LOCAL_RANK": "3"}
    with pytest.raises(Exception, match=r"LOCAL_RANK=3 but this task sees 2 GPUs \(CUDA_VISIBLE_DEVICES=0,1\)") as err:
        pick_device("cuda", 3, env)
    assert is_user_error(err.value) and "--gpus-per-task=1" in str(err.value)
    assert not fake_node and env["LOCAL_RANK"] == "3"
    assert pick_device("cuda", 1, env) == torch.device("cuda", 1)  # a rank whose number it can see


def test_cpu_is_untouched(fake_node, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU visible: auto → CPU, nothing rewritten
    env = {"LOCAL_RANK": "3"}
    assert pick_device("auto", 3, env) == torch.device("cpu") and env == {"LOCAL_RANK": "3"} and not fake_node
    with pytest.raises(RuntimeError, match="train.device=cuda"):
        pick_device("cuda", 3, env)
