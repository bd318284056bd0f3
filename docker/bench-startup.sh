#!/usr/bin/env bash
# Start-up of the CPU image with DeepSpeed's ops prebuilt (as built) and JIT-compiled at start (as an
# image without them would): seconds from `podman run` to the trainer's first step, for the main job's
# optimizer (torch AdamW: only the shared-memory collectives op loads) and for ZeRO-Offload (CPU Adam).
#
#   docker/bench-startup.sh [IMAGE] [REPEATS]     # default scale-hyper:<version>-cpu, 2 repeats
#
# "JIT" marks the ops as not installed before the CLI starts (deepspeed.git_version_info.installed_ops),
# which is exactly what DeepSpeed sees in an image built without them: it compiles them into the
# container's empty TORCH_EXTENSIONS_DIR. The job is the docs' tiny one, on shards prepared first.
# Prints one line per run and a median per case. Needs podman and root (a workspace owned by uid 10001).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VERSION=$(awk -F'"' '/^version *=/ {print $2; exit}' "$REPO/pyproject.toml")
IMAGE=${1:-scale-hyper:$VERSION-cpu}
REPEATS=${2:-2}
TINY=(model.hidden_size=32 model.num_layers=2 model.num_heads=2 model.ffn_size=64 model.max_position=64
    model.hyper_width=16 model.hyper_heads=2 model.hyper_ffn_ratio=2 model.mixer_width=32 data.max_documents=200
    data.vocab_size=512 data.seq_len=64 data.sequences_per_shard=128 train.global_batch_size=16
    train.micro_batch_size=16 deepspeed.precision=fp32 train.max_steps=1 train.export=false tracking.enabled=false)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
chown 10001:10001 "$work"
podman run --rm --network none -v "$work:/workspace" "$IMAGE" prepare "${TINY[@]}" >/dev/null 2>&1

# One run: seconds until the first "[scale-hyper] step 1/" line.
first_step() {
    local jit=$1 n=$2
    shift 2
    local code="import sys, runpy
if $jit:
    import deepspeed.git_version_info as g
    g.installed_ops.update(cpu_adam=False, deepspeed_shm_comm=False)
sys.argv = ['scale-hyper', *sys.argv[1:]]
runpy.run_module('scale_hyper', run_name='__main__')"
    local t0
    t0=$(date +%s.%N)
    podman run --rm --network none -v "$work:/workspace" --entrypoint python "$IMAGE" -c "$code" train "${TINY[@]}" \
        "train.output_dir=runs/s$n" "$@" 2>&1 | while IFS= read -r line; do
        if [[ $line == "[scale-hyper] step 1/"* ]]; then
            awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f\n", b - a}'
        fi
    done
}

median() { sort -n | awk '{a[NR] = $1} END {print (NR % 2 ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2)}'; }

echo "image $IMAGE, $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg), $(date -u +%F)"
n=0
for case in "adamw:" "offload:deepspeed.zero_stage=2 deepspeed.offload_optimizer=true"; do
    name=${case%%:*}
    read -r -a extra <<<"${case#*:}"
    for mode in prebuilt JIT; do
        jit=$([[ $mode == JIT ]] && echo True || echo False)
        times=()
        for ((r = 1; r <= REPEATS; r++)); do
            n=$((n + 1))
            t=$(first_step "$jit" "$n" "${extra[@]}")
            echo "  $name $mode run $r: ${t:-?} s to the first step"
            times+=("${t:-0}")
        done
        printf '%-8s %-9s median %s s\n' "$name" "$mode" "$(printf '%s\n' "${times[@]}" | median)"
    done
done
