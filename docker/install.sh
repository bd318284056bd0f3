#!/usr/bin/env bash
# Install scale-hyper and its training stack into the current Python environment, with DeepSpeed's ops
# compiled now rather than at every start. Both images run exactly this script (docker/Dockerfile,
# docker/Dockerfile.cpu), one --step per image layer, so a source change rebuilds only the last layer.
#
#   docker/install.sh --cpu            # CPU torch if none is installed; DeepSpeed with CPU Adam and the
#                                      #   CPU shared-memory collectives prebuilt
#   docker/install.sh --gpu            # keep the CUDA torch of the base (NGC) or install PyPI's CUDA torch,
#                                      #   plus PyPI's nvcc when the base has none; DeepSpeed with FusedAdam,
#                                      #   CPU Adam and utils prebuilt for TORCH_CUDA_ARCH_LIST
# Options:
#   --step stack|deps|project|all   stack: torch, compilers' helpers, DeepSpeed and its ops; deps: the
#                     project's dependencies (from pyproject.toml); project: the project, then checks.
#                     all (default) = the three in order
#   --editable        install the project with `pip install -e` (development checkouts)
#   --src DIR         the project to install (default: the repository this script lives in)
# Environment:
#   TORCH_VERSION (2.13.0)      torch to install when none is present
#   TORCH_INDEX_URL             wheel index for that torch (Dockerfile.cpu: the PyTorch CPU index);
#                               unset or empty = pip's own settings (PyPI's torch is a CUDA build)
#   DEEPSPEED_VERSION (0.19.8)  pinned: the trainer uses DeepSpeed internals
#   TORCH_CUDA_ARCH_LIST ("8.0;9.0")  GPU architectures of the prebuilt CUDA ops (A100, H100)
#   CPU_OPS_ARCH (x86-64-v3)    x86 level of the prebuilt CPU ops (AVX2); native = the build machine's
#   EXTRAS                      project extras, e.g. "ui" for the full MLflow UI
#   PYTHON (python3)            the interpreter whose environment receives everything
#   PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS, PIP_CERT, ...   pip's own settings; in an image
#                               build they are build arguments, and the build secrets `pip-ca` (a CA
#                               bundle) and `pip-conf` (a pip.conf) are used when given (docker/README.md)
set -euo pipefail

MODE=cpu
STEP=all
EDITABLE=0
SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
while (($#)); do
    case $1 in
        --gpu) MODE=gpu ;;
        --cpu) MODE=cpu ;;
        --step) STEP=${2:-}; shift ;;
        --editable) EDITABLE=1 ;;
        --src) SRC=${2:-}; shift ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
case $STEP in stack | deps | project | all) ;; *) echo "install.sh: --step $STEP: use stack, deps, project or all" >&2; exit 2 ;; esac

PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
DEEPSPEED_VERSION=${DEEPSPEED_VERSION:-0.19.8}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0}
PIP=("$PYTHON" -m pip)
step() { echo "==> install.sh: $*"; }
# One line naming what to change, exit 1 (in an image build the hint names the build argument).
fail() { echo "install.sh: ERROR: $*" >&2; exit 1; }
wants() { [[ $STEP == all || $STEP == "$1" ]]; }

# Build secrets (buildah/docker `--secret id=...`): present only during the RUN that mounts them, so
# neither the CA bundle nor a pip.conf with credentials ends up in the image.
if [[ -s /run/secrets/pip-ca ]]; then export PIP_CERT=/run/secrets/pip-ca; fi
if [[ -s /run/secrets/pip-conf ]]; then export PIP_CONFIG_FILE=/run/secrets/pip-conf; fi

if wants deps || wants project; then [[ -f $SRC/pyproject.toml ]] || fail "no pyproject.toml in $SRC (use --src)"; fi
command -v "$PYTHON" >/dev/null || fail "no $PYTHON — in an image build, BASE_IMAGE must be an image with Python 3.10+ (--build-arg BASE_IMAGE=...)"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || fail "$PYTHON is $("$PYTHON" -V 2>&1); scale-hyper needs 3.10+ — in an image build, pick another --build-arg BASE_IMAGE"
"${PIP[@]}" --version >/dev/null 2>&1 \
    || fail "$PYTHON has no pip — in an image build, BASE_IMAGE needs pip (a venv first on PATH, or python's official image)"

# pip with one last line that says where it looked, when it fails (a mirror or proxy not passed in).
pip_install() {
    "${PIP[@]}" install "$@" && return 0
    local where=${PIP_INDEX_URL:-https://pypi.org/simple}
    fail "pip install $* failed (index $where${PIP_EXTRA_INDEX_URL:+, extra $PIP_EXTRA_INDEX_URL}${PIP_FIND_LINKS:+, find-links $PIP_FIND_LINKS}) — behind a mirror or a TLS-inspecting proxy, pass the build arguments PIP_INDEX_URL / PIP_EXTRA_INDEX_URL / PIP_FIND_LINKS and the CA bundle as the secret pip-ca (docker/README.md, \"Behind a package mirror or a proxy\")"
}

# (package metadata, not `import torch`: a few ms instead of seconds)
torch_version() { "$PYTHON" -c 'from importlib.metadata import version; print(version("torch"))' 2>/dev/null || true; }

# Every step after torch keeps exactly this torch and this DeepSpeed.
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
pin() { echo "$1" >>"$constraints"; }

# --- 1. the stack: torch, DeepSpeed, its ops --------------------------------------------------------
if wants stack; then
    # The ops compile against the Python headers with g++ (Debian: python3-dev, g++).
    include=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
    [[ -f $include/Python.h ]] \
        || fail "no Python.h in $include: DeepSpeed's ops cannot be compiled — install the Python headers (Debian: python3-dev), or in an image build use a BASE_IMAGE that has them"
    command -v g++ >/dev/null || fail "no g++: DeepSpeed's ops cannot be compiled — apt-get install g++"

    installed=$(torch_version)
    fresh=0
    if [[ -n $installed ]]; then
        step "keeping the installed torch $installed"
    else
        fresh=1
        step "installing torch==$TORCH_VERSION ($MODE)${TORCH_INDEX_URL:+ from $TORCH_INDEX_URL}"
        if [[ -n ${TORCH_INDEX_URL:-} ]]; then
            pip_install --index-url "$TORCH_INDEX_URL" "torch==$TORCH_VERSION"
        else
            pip_install "torch==$TORCH_VERSION"
        fi
        installed=$(torch_version)
        [[ -n $installed ]] || fail "torch did not install"
    fi
    cuda=$("$PYTHON" -c 'import torch; print(torch.version.cuda or "")')
    if [[ $MODE == gpu && -z $cuda ]]; then
        fail "--gpu: torch $installed is a CPU build — in an image build, leave TORCH_INDEX_URL empty (PyPI's torch is the CUDA build) or use a CUDA base image"
    elif [[ $MODE == cpu && -n $cuda ]] && ((fresh)); then
        fail "--cpu: torch $installed is a CUDA $cuda build (multi-GB) — pass TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu, or a find-links directory with the +cpu wheel"
    fi
    pin "torch==$installed"

    # Prebuilt CPU kernels must run wherever the image runs, not only where it was built: DeepSpeed
    # compiles them with -march=native and the build machine's SIMD width (AVX-512 on many build hosts:
    # an illegal instruction on a CPU without it). On x86-64 a compiler wrapper puts CPU_OPS_ARCH in
    # their place (default x86-64-v3: AVX2 + FMA, any x86 server CPU of the last decade, 256-bit SIMD);
    # CPU_OPS_ARCH=native keeps DeepSpeed's flags (an image for this machine only).
    CPU_OPS_ARCH=${CPU_OPS_ARCH:-x86-64-v3}
    if [[ $(uname -m) == x86_64 && $CPU_OPS_ARCH != native ]]; then
        case $CPU_OPS_ARCH in
            x86-64-v4) simd=-D__AVX512__ ;;
            x86-64-v3) simd=-D__AVX256__ ;;
            *) simd=-D__SCALAR__ ;;
        esac
        # C++ sources go to CXX (setuptools >= 72), C and nvcc's host side to CC: wrap both. Named gcc
        # and g++, as nvcc (given CC as its host compiler) recognises a compiler by its name.
        wrap=$(mktemp -d)
        for var in CC CXX; do
            real=$("$PYTHON" -c 'import sys, sysconfig; print(sysconfig.get_config_var(sys.argv[1]) or "")' "$var")
            [[ -n $real ]] || real=$([[ $var == CC ]] && echo gcc || echo g++)
            name=$([[ $var == CC ]] && echo gcc || echo g++)
            cat >"$wrap/$name" <<EOF
#!/usr/bin/env bash
# docker/install.sh: DeepSpeed's CPU op flags made portable (-march=$CPU_OPS_ARCH $simd)
args=()
for a in "\$@"; do
    case \$a in
        -march=native) args+=(-march=$CPU_OPS_ARCH) ;;
        -D__AVX512__ | -D__AVX256__) args+=($simd) ;;
        *) args+=("\$a") ;;
    esac
done
exec $real "\${args[@]}"
EOF
            chmod +x "$wrap/$name"
            export "$var=$wrap/$name"
        done
        step "CPU ops for $CPU_OPS_ARCH ($simd), not for this build machine's CPU"
    fi
    # --no-build-isolation below: DeepSpeed's setup.py must see this torch, and these helpers.
    pip_install -c "$constraints" "setuptools>=77" wheel ninja py-cpuinfo packaging

    if [[ $MODE == gpu ]]; then
        # nvcc: the base's (NGC: /usr/local/cuda), else PyPI's CUDA compiler of the release torch was
        # built against (torch's own cuda-toolkit pin), laid out as a CUDA_HOME torch's extension builder understands.
        if ! command -v nvcc >/dev/null && [[ ! -x ${CUDA_HOME:-/usr/local/cuda}/bin/nvcc ]]; then
            toolkit=$("$PYTHON" - <<'EOF'
import re
from importlib.metadata import requires
pins = [r for r in (requires("torch") or []) if re.match(r"cuda-toolkit\b", r)]
print(re.search(r"==\s*([0-9.]+)", pins[0]).group(1) if pins else "")
EOF
)
            [[ -n $toolkit ]] || fail "torch $installed does not name its cuda-toolkit release and there is no nvcc — use a CUDA base image with nvcc (NGC)"
            step "installing the CUDA compiler from PyPI: cuda-toolkit[nvcc,cccl,cudart]==$toolkit (the release torch $installed uses)"
            pip_install -c "$constraints" "cuda-toolkit[nvcc,cccl,cudart]==$toolkit"
            # The wheels share one tree, site-packages/nvidia/cuNN/{bin,include,lib,nvvm}: a CUDA_HOME once
            # lib/ has the unversioned libcudart.so the linker asks for. /usr/local/cuda points at it, the
            # place torch's extension builder looks when CUDA_HOME is unset (later JIT builds find it too).
            home=$("$PYTHON" -c 'import nvidia, os, sys; print(next(p for p in (os.path.join(d, "cu" + sys.argv[1]) for d in nvidia.__path__) if os.path.isfile(os.path.join(p, "bin", "nvcc"))))' "${toolkit%%.*}") \
                || fail "cuda-toolkit $toolkit installed no nvidia/cu${toolkit%%.*}/bin/nvcc"
            cudart=("$home"/lib/libcudart.so.*)
            [[ -e $home/lib/libcudart.so ]] || ln -s "${cudart[0]##*/}" "$home/lib/libcudart.so"
            if [[ ! -e /usr/local/cuda && -w /usr/local ]]; then ln -s "$home" /usr/local/cuda; export CUDA_HOME=/usr/local/cuda; else export CUDA_HOME=$home; fi
            export PATH="$CUDA_HOME/bin:$PATH"
        fi
        step "nvcc: $(nvcc --version | tail -n 1)"
        # The op builders pick the accelerator from the GPUs they see; an image build sees none.
        export DS_ACCELERATOR=cuda
        step "installing deepspeed==$DEEPSPEED_VERSION with FusedAdam, CPU Adam and utils prebuilt for $TORCH_CUDA_ARCH_LIST"
        DS_BUILD_OPS=0 DS_BUILD_FUSED_ADAM=1 DS_BUILD_CPU_ADAM=1 DS_BUILD_UTILS=1 \
            pip_install --no-build-isolation -c "$constraints" "deepspeed==$DEEPSPEED_VERSION"
    else
        export DS_ACCELERATOR=cpu
        step "installing deepspeed==$DEEPSPEED_VERSION with CPU Adam and the CPU shared-memory collectives prebuilt"
        DS_BUILD_OPS=0 DS_BUILD_CPU_ADAM=1 DS_BUILD_SHM_COMM=1 \
            pip_install --no-build-isolation -c "$constraints" "deepspeed==$DEEPSPEED_VERSION"
    fi
fi

installed=$(torch_version)
[[ -n $installed ]] || fail "torch is not installed (run --step stack first)"
: >"$constraints"
pin "torch==$installed"
pin "deepspeed==$DEEPSPEED_VERSION"

# --- 2. the project's dependencies (a layer of their own: a source change does not redo them) --------
if wants deps; then
    requirements=$(mktemp)
    "$PYTHON" - "$SRC/pyproject.toml" "${EXTRAS:-}" >"$requirements" <<'EOF'
import sys
try:
    import tomllib
except ImportError:  # Python 3.10
    from pip._vendor import tomli as tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
reqs = list(project["dependencies"])
for extra in filter(None, sys.argv[2].split(",")):
    reqs += [r for r in project["optional-dependencies"][extra] if not r.startswith(project["name"])]
print("\n".join(reqs))
EOF
    step "installing the project's dependencies ($(wc -l <"$requirements") requirements)"
    pip_install -c "$constraints" -r "$requirements"
    rm -f "$requirements"
fi

# --- 3. the project, then checks ----------------------------------------------------------------------
if wants project; then
    target=$SRC
    [[ -n ${EXTRAS:-} ]] && target="${SRC}[${EXTRAS}]"
    step "installing scale-hyper from $target"
    if ((EDITABLE)); then
        pip_install --no-build-isolation -c "$constraints" -e "$target"
    else
        pip_install --no-build-isolation -c "$constraints" "$target"
        rm -rf "$SRC/build" "$SRC"/*.egg-info   # setuptools' leftovers in the source tree
    fi

    step "verifying: torch, deepspeed, the prebuilt ops and the scale-hyper CLI"
    scripts=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
    [[ -x $scripts/scale-hyper ]] || fail "no scale-hyper command in $scripts"
    "$PYTHON" - "$MODE" "$DEEPSPEED_VERSION" <<'EOF' || fail "the installed stack does not work (see above)"
import contextlib, importlib, importlib.util, io, os, platform, subprocess, sys

mode, ds_version = sys.argv[1], sys.argv[2]
import torch
import deepspeed
from deepspeed.git_version_info import installed_ops, accelerator_name

assert deepspeed.__version__ == ds_version, f"deepspeed {deepspeed.__version__} != {ds_version}"
want = {"cpu": ["cpu_adam", "deepspeed_shm_comm"], "gpu": ["fused_adam", "cpu_adam"]}[mode]
missing = [op for op in want if not installed_ops.get(op)]
assert not missing, f"not prebuilt: {missing} (installed_ops={installed_ops})"
assert accelerator_name == ("cpu" if mode == "cpu" else "cuda"), f"ops built for the {accelerator_name} accelerator"
arch = os.environ.get("CPU_OPS_ARCH", "x86-64-v3")
if platform.machine() == "x86_64" and arch not in ("native", "x86-64-v4"):  # portable: no 512-bit registers
    so = importlib.util.find_spec("deepspeed.ops.adam.cpu_adam_op").origin
    dis = subprocess.run(["objdump", "-d", so], capture_output=True, text=True, check=True).stdout
    assert "%zmm" not in dis, f"{so} uses AVX-512 instructions (built with -march=native?)"
if mode == "cpu":  # load them as a run would: a prebuilt module, no compiler involved
    importlib.import_module("deepspeed.ops.adam.cpu_adam_op")
    importlib.import_module("deepspeed.ops.comm.deepspeed_shm_comm_op")
else:  # CUDA libraries load without a GPU
    importlib.import_module("deepspeed.ops.adam.fused_adam_op")
from scale_hyper.cli import main

out = io.StringIO()
with contextlib.redirect_stdout(out):
    rc = main(["presets"])
presets = out.getvalue().split()
assert rc == 0 and presets, "scale-hyper presets printed nothing"
print(f"    torch {torch.__version__} (cuda {torch.version.cuda}), deepspeed {deepspeed.__version__} "
      f"(prebuilt: {', '.join(want)}), scale-hyper CLI ok ({len(presets)} presets)")
EOF
fi
step "done (--step $STEP)"
