#!/usr/bin/env bash
# Install scale-hyper and its training stack into the current Python environment.
#
# The Docker images run exactly this script (docker/Dockerfile, docker/Dockerfile.cpu), and CI runs
# it outside Docker with --check, so the install steps are exercised even where no image can be built.
#
#   docker/install.sh --gpu            # in a CUDA image whose torch is already installed (NGC PyTorch):
#                                      #   keep that torch, build DeepSpeed's common ops ahead of time
#   docker/install.sh --cpu            # install the CPU torch build if torch is missing
#   docker/install.sh --check [--cpu|--gpu]
#                                      # change nothing: resolve every step with `pip install --dry-run`,
#                                      # fail if one would replace torch or deepspeed, then verify that
#                                      # torch, deepspeed and the scale-hyper CLI import and run
# Options:
#   --editable        install the project with `pip install -e` (development checkouts)
#   --src DIR         the project to install (default: the repository this script lives in)
# Environment:
#   TORCH_VERSION (2.13.0)      torch to install when none is present
#   TORCH_INDEX_URL             wheel index for that torch (Dockerfile.cpu: the PyTorch CPU index);
#                               unset = pip's configured indexes
#   DEEPSPEED_VERSION (0.19.8)  pinned: the trainer uses DeepSpeed internals
#   TORCH_CUDA_ARCH_LIST ("8.0;9.0")  GPU architectures DeepSpeed's ops are compiled for (A100, H100)
#   EXTRAS                      project extras, e.g. "ui" for the full MLflow UI
#   PYTHON (python3)            the interpreter whose environment receives everything
set -euo pipefail

MODE=cpu
CHECK=0
EDITABLE=0
SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
while (($#)); do
    case $1 in
        --gpu) MODE=gpu ;;
        --cpu) MODE=cpu ;;
        --check) CHECK=1 ;;
        --editable) EDITABLE=1 ;;
        --src) SRC=$2; shift ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
DEEPSPEED_VERSION=${DEEPSPEED_VERSION:-0.19.8}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0}
PIP=("$PYTHON" -m pip)
step() { echo "==> install.sh: $*"; }
fail() { echo "install.sh: ERROR: $*" >&2; exit 1; }

[[ -f $SRC/pyproject.toml ]] || fail "no pyproject.toml in $SRC (use --src)"
"${PIP[@]}" --version >/dev/null 2>&1 || fail "$PYTHON has no pip"

# pip install, or in --check mode the same resolution with --dry-run: nothing may replace the pinned
# torch or deepspeed (a silent torch swap would pull a multi-GB CUDA build or break the NGC build).
pip_install() {
    if ((CHECK)); then
        local out
        out=$("${PIP[@]}" install --dry-run "$@" 2>&1) || { echo "$out" >&2; fail "pip install --dry-run $* failed"; }
        local would
        would=$(grep '^Would install' <<<"$out" || true)
        echo "    ${would:-nothing to install}"
        if grep -Eq '(^| )(torch|deepspeed)-[0-9]' <<<"$would"; then
            fail "this step would replace torch or deepspeed: $would"
        fi
    else
        "${PIP[@]}" install "$@"
    fi
}

# (package metadata, not `import torch`: a few ms instead of seconds)
torch_version() { "$PYTHON" -c 'from importlib.metadata import version; print(version("torch"))' 2>/dev/null || true; }

# --- 1. torch ----------------------------------------------------------------------------------------
installed=$(torch_version)
if [[ -n $installed ]]; then
    step "keeping the installed torch $installed"
elif ((CHECK)); then
    fail "torch is not installed here (run without --check to install torch==$TORCH_VERSION)"
elif [[ $MODE == gpu ]]; then
    fail "--gpu expects a base image with a CUDA torch (e.g. nvcr.io/nvidia/pytorch); none is installed"
else
    step "installing torch==$TORCH_VERSION (CPU)"
    if [[ -n ${TORCH_INDEX_URL:-} ]]; then
        "${PIP[@]}" install --index-url "$TORCH_INDEX_URL" "torch==$TORCH_VERSION"
    else
        "${PIP[@]}" install "torch==$TORCH_VERSION"
    fi
    installed=$(torch_version)
    [[ -n $installed ]] || fail "torch did not import after installing it"
fi
if [[ $MODE == gpu ]]; then
    "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.version.cuda else 1)' \
        || fail "--gpu: torch $installed is a CPU build"
fi
# Every later step must keep exactly this torch.
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==$installed" >"$constraints"

# --- 2. DeepSpeed ------------------------------------------------------------------------------------
if [[ $MODE == gpu ]]; then
    # Compile the ops this project uses now, for A100 (8.0) and H100 (9.0), instead of JIT-building
    # them on every node at first use: FusedAdam (deepspeed.optimizer=fused_adam), DeepSpeedCPUAdam
    # (offload_optimizer / cpu_adam) and the flatten/unflatten utils ZeRO uses. --no-build-isolation:
    # the build must see the image's CUDA torch.
    step "installing deepspeed==$DEEPSPEED_VERSION with FusedAdam, CPUAdam, utils prebuilt for $TORCH_CUDA_ARCH_LIST"
    DS_BUILD_FUSED_ADAM=1 DS_BUILD_CPU_ADAM=1 DS_BUILD_UTILS=1 DS_BUILD_OPS=0 \
        pip_install --no-build-isolation -c "$constraints" "deepspeed==$DEEPSPEED_VERSION"
else
    step "installing deepspeed==$DEEPSPEED_VERSION (ops JIT-built on first use; CPU needs only gcc)"
    pip_install -c "$constraints" "deepspeed==$DEEPSPEED_VERSION"
fi

# --- 3. the project ----------------------------------------------------------------------------------
target=$SRC
[[ -n ${EXTRAS:-} ]] && target="${SRC}[${EXTRAS}]"
step "installing scale-hyper from $target"
echo "deepspeed==$DEEPSPEED_VERSION" >>"$constraints"
build=()
# --check only resolves: reuse this environment's setuptools instead of building an isolated one.
if ((CHECK)) && "$PYTHON" -c 'import setuptools, sys; sys.exit(int(setuptools.__version__.split(".")[0]) < 68)' 2>/dev/null; then
    build=(--no-build-isolation)
fi
if ((EDITABLE)); then
    pip_install "${build[@]}" -c "$constraints" -e "$target"
else
    pip_install "${build[@]}" -c "$constraints" "$target"
fi

# --- 4. verify ---------------------------------------------------------------------------------------
step "verifying: torch, deepspeed and the scale-hyper CLI"
scripts=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
[[ -x $scripts/scale-hyper ]] || fail "no scale-hyper command in $scripts"
"$PYTHON" - "$MODE" "$DEEPSPEED_VERSION" <<'EOF'
import contextlib, io, sys

mode, ds_version = sys.argv[1], sys.argv[2]
import torch
import deepspeed

assert deepspeed.__version__ == ds_version, f"deepspeed {deepspeed.__version__} != {ds_version}"
if mode == "gpu" and torch.cuda.is_available():  # at image build time there is usually no GPU
    from deepspeed.ops.op_builder import FusedAdamBuilder
    assert FusedAdamBuilder().is_compatible(), "FusedAdam is not compatible with this torch/CUDA"
from scale_hyper.cli import main

out = io.StringIO()
with contextlib.redirect_stdout(out):
    rc = main(["presets"])
presets = out.getvalue().split()
assert rc == 0 and presets, "scale-hyper presets printed nothing"
print(f"    torch {torch.__version__} (cuda {torch.version.cuda}), deepspeed {deepspeed.__version__}, "
      f"scale-hyper CLI ok ({len(presets)} presets)")
EOF
if [[ $MODE == gpu && $CHECK == 0 ]]; then
    # The ops compiled in step 2 show as installed ("[YES]" in the first column) in ds_report.
    ds_report 2>/dev/null | grep -E '^(fused_adam|cpu_adam)' || true
fi
step "done ($([[ $CHECK == 1 ]] && echo 'check only: nothing was changed' || echo installed))"
