#!/usr/bin/env bash
# Build a scale-hyper image on a machine with no registry access: the Python base is made from Debian
# packages with mmdebstrap (once; reused while its recipe is unchanged), then the image is built with
# buildah, or with docker where a Docker engine runs.
#
#   docker/build.sh cpu [OPTIONS] [-- BUILD-ARGS]   docker/Dockerfile.cpu -> scale-hyper:<version>-cpu
#   docker/build.sh gpu [OPTIONS] [-- BUILD-ARGS]   docker/Dockerfile on the Debian base: PyPI's CUDA torch,
#                                                   PyPI's nvcc -> scale-hyper:<version>-cuda
#   docker/build.sh base [OPTIONS]                  only the base image (localhost/scale-hyper-base:...)
# Options:
#   --tag NAME                 image name (default scale-hyper:<version>-cpu / -cuda)
#   --base IMAGE               build FROM this image instead of the Debian base (e.g. the Dockerfile's
#                              default: python:3.11.11-slim-bookworm, nvcr.io/nvidia/pytorch:25.05-py3)
#   --rebuild-base             make the Debian base again even if it exists
#   --mirror URL               Debian mirror for the base (default http://deb.debian.org/debian)
#   --security-mirror URL|none its security suite (default http://deb.debian.org/debian-security)
#   --pip-index-url URL        pip's index in the build (a PyPI mirror)
#   --pip-extra-index-url URL  an extra index (repeatable)
#   --pip-find-links DIR|URL   a wheel directory or page (repeatable); host directories are mounted
#   --pip-cert FILE            CA bundle for pip (TLS-inspecting proxy, private mirror): build secret pip-ca
#   --pip-conf FILE            a pip.conf (e.g. with credentials): build secret pip-conf
#   --host-pip                 the index, extra indexes, find-links and CA bundle of this machine's pip
#                              (`pip config list`, PIP_* variables), local directories mounted
#   --torch-index-url URL      cpu: the torch wheel index (default: Dockerfile.cpu's, the PyTorch CPU
#                              index); '' = the pip settings above
#   --engine buildah|docker    default: docker if `docker info` works, else buildah
# Everything after `--` goes to `buildah bud` / `docker build` unchanged.
# Needs (Debian): apt-get install mmdebstrap buildah runc (or a Docker engine). Run as root, or as a
# user for whom mmdebstrap's unshare mode and rootless buildah work.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
die() { echo "build.sh: error: $1 — $2" >&2; exit 2; }
log() { echo "==> build.sh: $*"; }

VARIANT=${1:-}
case $VARIANT in
    cpu | gpu | base) shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown image '${VARIANT}'" "use docker/build.sh cpu, gpu or base (--help)" ;;
esac

VERSION=$(awk -F'"' '/^version *=/ {print $2; exit}' "$REPO/pyproject.toml")
TAG='' BASE='' REBUILD_BASE=0 ENGINE=''
MIRROR=http://deb.debian.org/debian
SECURITY_MIRROR=http://deb.debian.org/debian-security
PIP_INDEX='' PIP_EXTRA=() PIP_LINKS=() PIP_CERT_FILE='' PIP_CONF_FILE='' HOST_PIP=0
TORCH_INDEX_SET=0 TORCH_INDEX=''
EXTRA=()
need_value() { [[ $# -ge 2 ]] || die "$1 needs a value" "see docker/build.sh --help"; }
while (($#)); do
    case $1 in
        --tag) need_value "$@"; TAG=$2; shift ;;
        --base) need_value "$@"; BASE=$2; shift ;;
        --rebuild-base) REBUILD_BASE=1 ;;
        --mirror) need_value "$@"; MIRROR=$2; shift ;;
        --security-mirror) need_value "$@"; SECURITY_MIRROR=$2; shift ;;
        --pip-index-url) need_value "$@"; PIP_INDEX=$2; shift ;;
        --pip-extra-index-url) need_value "$@"; PIP_EXTRA+=("$2"); shift ;;
        --pip-find-links) need_value "$@"; PIP_LINKS+=("$2"); shift ;;
        --pip-cert) need_value "$@"; PIP_CERT_FILE=$2; shift ;;
        --pip-conf) need_value "$@"; PIP_CONF_FILE=$2; shift ;;
        --host-pip) HOST_PIP=1 ;;
        --torch-index-url) need_value "$@"; TORCH_INDEX_SET=1; TORCH_INDEX=$2; shift ;;
        --engine) need_value "$@"; ENGINE=$2; shift ;;
        --) shift; EXTRA=("$@"); break ;;
        *) die "unknown option $1" "see docker/build.sh --help" ;;
    esac
    shift
done

# --- pip settings -----------------------------------------------------------------------------------
if ((HOST_PIP)); then
    command -v python3 >/dev/null || die "--host-pip: no python3 here to ask for pip's settings" "pass --pip-* options instead"
    # `pip config list` prints files' values, then PIP_* variables (":env:"); a variable wins, an empty one is ignored.
    host_pip() {
        python3 -m pip config list 2>/dev/null | awk -F"='" -v k="$1" '
            { split($1, a, "."); key = a[length(a)]; v = substr($0, length($1) + 3); sub(/'\''$/, "", v) }
            key == k && v != "" { if ($1 ~ /^:env:/) env = v; else file = v }
            END { print (env != "" ? env : file) }'
    }
    [[ -n $PIP_INDEX ]] || PIP_INDEX=$(host_pip index-url)
    read -r -a more <<<"$(host_pip extra-index-url)"; PIP_EXTRA+=("${more[@]}")
    read -r -a more <<<"$(host_pip find-links)"; PIP_LINKS+=("${more[@]}")
    [[ -n $PIP_CERT_FILE ]] || PIP_CERT_FILE=$(host_pip cert)
fi

MOUNTED=" " ARGS=()
local_dir() {  # a file:// URL or a path -> the host directory to mount (an index's parent: its pages link ../../files)
    local p=$1
    [[ $p == file://* ]] && p=${p#file://}
    [[ $p == /* ]] || return 1
    [[ $p == */simple || $p == */simple/ ]] && p=$(dirname "${p%/}")
    printf '%s' "${p%/}"
}
mount_local() {
    local dir
    dir=$(local_dir "$1") || return 0
    [[ -d $dir ]] || die "pip setting $1: $dir is not a directory here" "fix the path, or leave it out"
    [[ $MOUNTED == *" $dir "* ]] && return 0
    ARGS+=(-v "$dir:$dir:ro")
    MOUNTED+="$dir "
    LOCAL_SETTING=$1
}
if [[ -n $PIP_INDEX ]]; then mount_local "$PIP_INDEX"; ARGS+=(--build-arg "PIP_INDEX_URL=$PIP_INDEX"); fi
if ((${#PIP_EXTRA[@]})); then
    for u in "${PIP_EXTRA[@]}"; do mount_local "$u"; done
    ARGS+=(--build-arg "PIP_EXTRA_INDEX_URL=${PIP_EXTRA[*]}")
fi
if ((${#PIP_LINKS[@]})); then
    for u in "${PIP_LINKS[@]}"; do mount_local "$u"; done
    ARGS+=(--build-arg "PIP_FIND_LINKS=${PIP_LINKS[*]}")
fi
if [[ -n $PIP_CERT_FILE ]]; then
    [[ -r $PIP_CERT_FILE ]] || die "--pip-cert $PIP_CERT_FILE is not a readable file" "pass the CA bundle pip should trust"
    ARGS+=(--secret "id=pip-ca,src=$PIP_CERT_FILE")
fi
if [[ -n $PIP_CONF_FILE ]]; then
    [[ -r $PIP_CONF_FILE ]] || die "--pip-conf $PIP_CONF_FILE is not a readable file" "pass a pip.conf"
    ARGS+=(--secret "id=pip-conf,src=$PIP_CONF_FILE")
fi
((TORCH_INDEX_SET)) && ARGS+=(--build-arg "TORCH_INDEX_URL=$TORCH_INDEX")

# --- the engine ---------------------------------------------------------------------------------------
if [[ -z $ENGINE ]]; then
    if command -v docker >/dev/null && docker info >/dev/null 2>&1; then ENGINE=docker
    elif command -v buildah >/dev/null; then ENGINE=buildah
    else die "neither buildah nor a running Docker engine is available" "apt-get install buildah runc (Debian 12), or start Docker"
    fi
fi
case $ENGINE in
    buildah) command -v buildah >/dev/null || die "--engine buildah: buildah is not installed" "apt-get install buildah runc" ;;
    docker) docker info >/dev/null 2>&1 || die "--engine docker: no Docker engine answers (docker info)" "start it, or use --engine buildah" ;;
    *) die "--engine $ENGINE" "use buildah or docker" ;;
esac
image_exists() { if [[ $ENGINE == docker ]]; then docker image inspect "$1" >/dev/null 2>&1; else buildah inspect --type image "$1" >/dev/null 2>&1; fi; }
image_size() {
    local bytes
    if [[ $ENGINE == docker ]]; then bytes=$(docker image inspect --format '{{.Size}}' "$1")
    else bytes=$(podman image inspect --format '{{.Size}}' "$1" 2>/dev/null || echo 0); fi
    awk -v b="$bytes" 'BEGIN {printf "%.2f GB", b / 1e9}'
}

if [[ $MOUNTED != " " && $ENGINE == docker ]]; then
    die "pip setting $LOCAL_SETTING is a local directory, which docker build cannot mount" "serve it over HTTP, or build with --engine buildah"
fi

# --- the Debian base (python3 + venv on PATH, headers, g++) ---------------------------------------------
# Its name carries a hash of the recipe, so a changed recipe makes a new base and an unchanged one is reused.
BASE_PACKAGES=python3,python3-venv,python3-dev,python-is-python3,ca-certificates,g++
BASE_SUITE=bookworm
BASE_RECIPE="$BASE_SUITE $BASE_PACKAGES venv=/opt/venv minbase nodoc v1"
BASE_TAG=localhost/scale-hyper-base:$BASE_SUITE-$(printf '%s' "$BASE_RECIPE" | sha256sum | cut -c1-12)

make_base() {
    command -v mmdebstrap >/dev/null || die "mmdebstrap is not installed (it makes the Debian base)" "apt-get install mmdebstrap, or pass --base IMAGE"
    local sources=("deb $MIRROR $BASE_SUITE main" "deb $MIRROR $BASE_SUITE-updates main")
    [[ $SECURITY_MIRROR == none ]] || sources+=("deb $SECURITY_MIRROR $BASE_SUITE-security main")
    local importer=(podman import)
    [[ $ENGINE == docker ]] && importer=(docker import)
    command -v "${importer[0]}" >/dev/null || die "${importer[0]} is not installed (it imports the base)" "apt-get install podman"
    log "making the base $BASE_TAG with mmdebstrap ($BASE_PACKAGES) from $MIRROR"
    local start=$SECONDS
    # The venv keeps pip away from Debian's externally managed system Python; docs, man pages and
    # translations are left out; apt lists are dropped (the Dockerfile runs apt-get update if it needs apt).
    # shellcheck disable=SC2016  # "$1" is the hook's argument (the root directory), expanded by mmdebstrap
    mmdebstrap --variant=minbase --include="$BASE_PACKAGES" \
        --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        --customize-hook='chroot "$1" python3 -m venv /opt/venv' \
        --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
        "$BASE_SUITE" - "${sources[@]}" \
        | "${importer[@]}" --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
            --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$BASE_TAG" >/dev/null \
        || die "making the base with mmdebstrap failed (see above)" "check --mirror (and that this runs as root or with unprivileged user namespaces)"
    log "base $BASE_TAG: $(image_size "$BASE_TAG") in $((SECONDS - start)) s"
}

if [[ -z $BASE ]]; then
    if ((REBUILD_BASE)) || ! image_exists "$BASE_TAG"; then make_base; else log "reusing the base $BASE_TAG"; fi
    BASE=$BASE_TAG
elif ! image_exists "$BASE"; then
    log "pulling the base $BASE"
    "$ENGINE" pull "$BASE" >/dev/null \
        || die "--base $BASE is not in local storage and could not be pulled" "pull or load it first, or leave --base out (build.sh then makes a Debian base)"
fi
[[ $VARIANT == base ]] && exit 0

# The labels say what the image was built from (tests/test_docker.py runs install.sh in the same base).
revision=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)
git -C "$REPO" diff --quiet HEAD -- 2>/dev/null || revision+="-dirty"
ARGS+=(--build-arg "BASE_IMAGE=$BASE" --label "org.opencontainers.image.revision=$revision"
    --label "org.opencontainers.image.version=$VERSION" --label "scale-hyper.base=$BASE")

# --- the image ----------------------------------------------------------------------------------------
if [[ $VARIANT == cpu ]]; then
    DOCKERFILE=docker/Dockerfile.cpu
    : "${TAG:=scale-hyper:$VERSION-cpu}"
else
    DOCKERFILE=docker/Dockerfile
    : "${TAG:=scale-hyper:$VERSION-cuda}"
fi
if [[ $ENGINE == buildah ]]; then
    # --layers: every Dockerfile step is cached, so a source change rebuilds only the project layer.
    CMD=(buildah bud --layers --network host -f "$DOCKERFILE" -t "$TAG" "${ARGS[@]}" "${EXTRA[@]}" .)
else
    CMD=(docker build -f "$DOCKERFILE" -t "$TAG" "${ARGS[@]}" "${EXTRA[@]}" .)
fi
log "building $TAG from $DOCKERFILE on $BASE"
echo "    $(printf '%q ' "${CMD[@]}")"
start=$SECONDS
(cd "$REPO" && "${CMD[@]}") || die "building $TAG failed (see the step above)" "a missing pip setting is named in install.sh's last line"
log "built $TAG: $(image_size "$TAG") in $((SECONDS - start)) s"
