#!/usr/bin/env bash
# CI: build the CPU image ONCE per CI run, from this checkout, for the container tests
# (tests/test_docker.py: podman alone and under SLURM), with the host settings podman needs here.
#
# * apt: buildah, podman, mmdebstrap, runc, catatonit (podman run --init), installed when missing.
# * podman: a containers.conf drop-in whose default ulimits stay within this host's hard limits
#   (podman's defaults for root are far above them, and a container then fails to start with
#   "setrlimit ... operation not permitted").
# * the image: docker/build.sh cpu with this machine's pip settings (--host-pip: its index, wheel
#   directories and CA bundle; the CPU torch wheel comes from its find-links, as in .ci/run). The Debian
#   base and the torch/DeepSpeed layers are cached between runs on the same machine (a source change
#   rebuilds only the project layer); dangling layers of earlier runs are removed afterwards.
# Needs root. Prints the build time and the image size.
set -euo pipefail
cd "$(dirname "$0")/.."
log() { echo "[build-image] $*"; }
die() { echo "[build-image] ERROR: $*" >&2; exit 1; }
[[ $(id -u) == 0 ]] || die "needs root (apt-get, mmdebstrap, buildah)"

PACKAGES=(buildah podman mmdebstrap runc catatonit)
missing=()
for p in "${PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
    command -v apt-get >/dev/null || die "${missing[*]} not installed and no apt-get"
    log "apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || die "apt-get update failed (no package mirror reachable?)"
    apt-get install -y -qq "${missing[@]}" >/dev/null || die "apt-get install ${missing[*]} failed"
fi

# RLIMIT_NPROC above the pid limit is refused here even under the hard limit: the lower of the two.
nofile=$(ulimit -Hn)
nproc=$(ulimit -Hu)
pid_max=$(cat /proc/sys/kernel/pid_max)
[[ $nofile == unlimited ]] && nofile=1048576
if [[ $nproc == unlimited ]] || ((nproc > pid_max)); then nproc=$pid_max; fi
mkdir -p /etc/containers/containers.conf.d
cat >/etc/containers/containers.conf.d/50-scale-hyper-ci.conf <<EOF
# written by scale-hyper's .ci/build-image.sh: container rlimits within this host's hard limits
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]
EOF

start=$SECONDS
bash docker/build.sh cpu --host-pip --torch-index-url ''
tag=scale-hyper:$(awk -F'"' '/^version *=/ {print $2; exit}' pyproject.toml)-cpu
podman run --rm "$tag" --help >/dev/null || die "the image was built but does not start (podman run $tag --help)"
podman image prune -f >/dev/null || true
log "$tag ready in $((SECONDS - start)) s ($(podman image inspect --format '{{.Size}}' "$tag" | awk '{printf "%.2f GB", $1 / 1e9}'))"
