# shellcheck shell=bash
# Shared logic of the scale-hyper sbatch templates. Sourced by them; never run directly.
#
# The templates set their user-facing variables first (the "EDIT HERE" block); everything here only
# fills in what is still unset, so `sbatch --export=ALL,VAR=value` overrides any of it.
#
# Functions the templates call:
#   sh_setup MODE "$@"   defaults, environment, MASTER_ADDR/PORT, containers, the train command.
#                        MODE: srun (one task per rank) | launcher (one task per node running deepspeed);
#                        "$@": the template's arguments, appended to the train command (key=value ...)
#   sh_preflight         optional rank/connectivity check through the same launch path
#   sh_train             run training as a background step, forward SIGUSR1 to it, requeue if preempted
#                        or if a rank hung (exit HUNG_EXIT_CODE) after a newer checkpoint was saved
#   sh_doctor            run `scale-hyper doctor` instead (slurm/doctor.sbatch): table in the log, JSON beside it
# See slurm/README.md for the why of each choice.

sh_log() { echo "[slurm $(date +%H:%M:%S)] $*"; }
sh_die() { echo "[slurm] ERROR: $*" >&2; exit 2; }

# ---------------------------------------------------------------------------------------------------
# Defaults. Every one can be overridden from the environment (sbatch --export=ALL,NAME=value).
# ---------------------------------------------------------------------------------------------------
sh_defaults() {
    [[ -n ${SLURM_JOB_ID:-} ]] || sh_die "submit this with sbatch (SLURM_JOB_ID is not set)"
    : "${CONFIG:=hyperbert-base}"
    : "${RUN_NAME:=${SLURM_JOB_NAME:-scale-hyper}}"
    : "${RUNS_DIR:=${SLURM_SUBMIT_DIR:-$PWD}/runs}"
    : "${DATA_DIR:=}"
    : "${MLFLOW_TRACKING_URI:=sqlite:///${RUNS_DIR}/mlflow.db}"
    : "${MLFLOW_EXPERIMENT:=scale-hyper}"
    : "${CONTAINER:=none}"
    : "${IMAGE:=}"
    : "${CONTAINER_MOUNTS:=}"
    : "${CONTAINER_EXTRA_ARGS:=}"
    : "${VENV:=}"
    : "${CPU_TASKS_PER_NODE:=}"
    : "${DIST_TIMEOUT_MINUTES:=30}"
    : "${PREFLIGHT:=1}"
    : "${MAX_REQUEUES:=20}"
    : "${HUNG_EXIT_CODE:=5}"   # what every live rank exits with when a rank sent no heartbeat (hung)
    : "${FINISHED_PATTERN:=training finished}"
    RUN_DIR=${RUN_DIR:-$RUNS_DIR/$RUN_NAME}
    export MLFLOW_TRACKING_URI MLFLOW_EXPERIMENT_NAME="$MLFLOW_EXPERIMENT"

    # --- communication (NCCL on GPUs, gloo on CPU) -----------------------------------------------
    # Report NCCL problems without the INFO flood; set NCCL_DEBUG=INFO once when debugging topology.
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    # A failed or timed-out collective aborts the process instead of hanging until the time limit,
    # so the job ends (and srun --kill-on-bad-exit stops the other ranks). Old and new names.
    export NCCL_ASYNC_ERROR_HANDLING=${NCCL_ASYNC_ERROR_HANDLING:-1}
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
    # InfiniBand/RoCE stays on (0). Set NCCL_IB_DISABLE=1 on clusters without an IB fabric, or when
    # NCCL picks a broken HCA; NCCL then uses TCP sockets.
    export NCCL_IB_DISABLE=${NCCL_IB_DISABLE:-0}
    # Which NIC NCCL/gloo use for bootstrap and socket traffic. Unset = NCCL's own choice (it skips lo
    # and docker*). Set it when nodes have several networks, e.g. NCCL_SOCKET_IFNAME=ib0 or =^lo,docker.
    # gloo (CPU runs, preflight) has no "^" exclusion syntax: it only inherits a plain interface list.
    if [[ -n ${NCCL_SOCKET_IFNAME:-} ]]; then
        export NCCL_SOCKET_IFNAME
        if [[ -z ${GLOO_SOCKET_IFNAME:-} && $NCCL_SOCKET_IFNAME != ^* ]]; then
            export GLOO_SOCKET_IFNAME=$NCCL_SOCKET_IFNAME
        fi
    fi
    # A rank silent this long (minutes, fractions allowed) is named and the job ends (status
    # HUNG_EXIT_CODE); collectives wait a little longer. DeepSpeed reads DEEPSPEED_TIMEOUT as whole
    # minutes at import (int(): "0.5" would crash it), hence the rounding up.
    export DEEPSPEED_TIMEOUT=${DEEPSPEED_TIMEOUT:-$(awk -v m="$DIST_TIMEOUT_MINUTES" \
        'BEGIN { c = int(m); if (c < m) c++; if (c < 1) c = 1; print c }')}
    # Python tracebacks of all threads on a hard crash (segfault, abort) end up in the job log.
    export PYTHONFAULTHANDLER=1 PYTHONUNBUFFERED=1
}

# GPUs per node: GPUS_PER_NODE, else what SLURM allocated (SLURM_GPUS_ON_NODE / --gpus-per-node).
sh_gpus_per_node() {
    local g=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-0}}}
    g=${g##*:}            # "a100:8" -> "8"
    g=${g%%(*}            # "8(x2)"  -> "8"
    [[ $g =~ ^[0-9]+$ ]] || g=0
    echo "$g"
}

# ---------------------------------------------------------------------------------------------------
# Everything a step needs: rank layout, master address, container wrapping, the train command.
# ---------------------------------------------------------------------------------------------------
sh_setup() {
    SH_MODE=$1            # srun: one task per rank | launcher: one task per node running deepspeed
    shift
    SH_USER_ARGS=("$@")   # the script's own arguments: key=value overrides (and extra CONFIGs)
    # From now on (a signal during the preflight is honoured after it): USR1 from --signal=B:USR1@120,
    # TERM from a `kill -TERM -<pgid>` of this script (a wrapper, a user) — both mean "checkpoint now".
    trap 'sh_on_stop_signal USR1' USR1
    trap 'sh_on_stop_signal TERM' TERM
    sh_defaults
    if [[ $CONTAINER == none && -n $VENV ]]; then
        # shellcheck disable=SC1091
        source "$VENV/bin/activate" || sh_die "cannot activate VENV=$VENV"
    fi

    GPUS_PER_NODE=$(sh_gpus_per_node)
    NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
    if (( GPUS_PER_NODE > 0 )); then
        PROCS_PER_NODE=$GPUS_PER_NODE          # one rank per GPU
    else                                        # CPU-only nodes (tests, CPU clusters)
        PROCS_PER_NODE=${CPU_TASKS_PER_NODE:-${SLURM_NTASKS_PER_NODE:-1}}
    fi
    WORLD_SIZE=$(( NNODES * PROCS_PER_NODE ))

    # The first node of the allocation hosts rank 0. Use its NodeAddr from slurm.conf (what the nodes
    # really reach each other by; equal to the node name on most clusters).
    local first_node
    first_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    if [[ -z ${MASTER_ADDR:-} ]]; then
        MASTER_ADDR=$(scontrol show node "$first_node" 2>/dev/null \
            | tr ' ' '\n' | awk -F= '$1 == "NodeAddr" {print $2; exit}')
        MASTER_ADDR=${MASTER_ADDR:-$first_node}
    fi
    # Job-specific port (the trainer's own fallback uses the same formula): two jobs sharing a node
    # do not collide.
    MASTER_PORT=${MASTER_PORT:-$(( 29500 + SLURM_JOB_ID % 1000 ))}
    export MASTER_ADDR MASTER_PORT

    # Threads per rank: the CPUs SLURM gave each task, split among the ranks that task starts.
    if [[ -z ${OMP_NUM_THREADS:-} ]]; then
        local cpt=${SLURM_CPUS_PER_TASK:-1}
        local ranks_per_task=1
        [[ $SH_MODE == launcher ]] && ranks_per_task=$PROCS_PER_NODE
        OMP_NUM_THREADS=$(( cpt / ranks_per_task ))
        (( OMP_NUM_THREADS >= 1 )) || OMP_NUM_THREADS=1
    fi
    export OMP_NUM_THREADS

    mkdir -p "$RUN_DIR" || sh_die "cannot create RUN_DIR=$RUN_DIR"

    # --- containers -------------------------------------------------------------------------------
    # SH_SRUN_CONTAINER: extra srun options (pyxis). SH_EXEC: command prefix on the node (apptainer).
    # Host paths are mounted at the same path inside the container, so no path changes.
    SH_SRUN_CONTAINER=()
    SH_EXEC=()
    local dirs=("$PWD" "$RUN_DIR") mounts="" d
    [[ -n $DATA_DIR ]] && dirs+=("$DATA_DIR")
    if [[ $MLFLOW_TRACKING_URI == sqlite:///* ]]; then
        d=${MLFLOW_TRACKING_URI#sqlite:///}   # sqlite:////abs/x.db -> /abs/x.db; sqlite:///x.db -> x.db
        d=$(dirname "$d")
        mkdir -p "$d"
        dirs+=("$d")
    fi
    for d in "${dirs[@]}"; do
        [[ $d == /* ]] || d="$PWD/$d"
        [[ $d == "$PWD"/* ]] && continue      # already visible through the submit directory
        [[ ",$mounts," == *",$d:$d,"* ]] || mounts+="${mounts:+,}$d:$d"
    done
    [[ -n $CONTAINER_MOUNTS ]] && mounts+=",$CONTAINER_MOUNTS"
    local extra=()
    read -r -a extra <<<"$CONTAINER_EXTRA_ARGS"
    case $CONTAINER in
        none) ;;
        pyxis | enroot)
            [[ -n $IMAGE ]] || sh_die "CONTAINER=$CONTAINER needs IMAGE (e.g. registry#org/scale-hyper:0.1.0-cu124 or a .sqsh file)"
            SH_SRUN_CONTAINER=(--container-image="$IMAGE" --container-mounts="$mounts"
                --container-workdir="$PWD" "${extra[@]}")
            ;;
        apptainer | singularity)
            [[ -n $IMAGE ]] || sh_die "CONTAINER=$CONTAINER needs IMAGE (a .sif file)"
            SH_EXEC=(apptainer exec --bind "$mounts" --pwd "$PWD")
            (( GPUS_PER_NODE > 0 )) && SH_EXEC+=(--nv)
            SH_EXEC+=("${extra[@]}" "$IMAGE")
            ;;
        podman)
            [[ -n $IMAGE ]] || sh_die "CONTAINER=podman needs IMAGE (e.g. scale-hyper:0.1.0-cpu from docker/build.sh, on every node)"
            sh_podman_exec "$mounts" "${extra[@]}"
            ;;
        *) sh_die "CONTAINER=$CONTAINER: use none, pyxis (or enroot), apptainer (or singularity) or podman" ;;
    esac

    # --- the training command ----------------------------------------------------------------------
    local configs=()
    read -r -a configs <<<"$CONFIG"
    SH_TRAIN_ARGS=(train "${configs[@]}"
        "train.output_dir=$RUN_DIR"
        "train.dist_timeout_minutes=$DIST_TIMEOUT_MINUTES"
        "tracking.uri=$MLFLOW_TRACKING_URI"
        "tracking.experiment=$MLFLOW_EXPERIMENT"
        "tracking.run_name=$RUN_NAME")
    [[ -n $DATA_DIR ]] && SH_TRAIN_ARGS+=("data.output=$DATA_DIR")
    SH_TRAIN_ARGS+=("${SH_USER_ARGS[@]}")

    # Every task runs under this wrapper. It ignores SIGUSR1 and then execs the real command: the
    # ignore is inherited by everything below it (deepspeed launcher, apptainer), while the trainer
    # installs its own SIGUSR1 handler. So when the signal reaches all processes of the step, only the
    # Python ranks act on it (checkpoint, exit 0) and the launchers wait for them instead of dying.
    # __NODE_RANK__ in the command becomes this task's SLURM_NODEID.
    # shellcheck disable=SC2016  # expanded by the task's bash, not here
    SH_TASK=(bash -c 'trap "" USR1; exec "${@//__NODE_RANK__/$SLURM_NODEID}"' scale-hyper-task)
    [[ $CONTAINER == podman ]] && SH_TASK=(bash -c "$SH_PODMAN_TASK" scale-hyper-podman-task)  # see SH_PODMAN_TASK

    sh_log "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST:" \
        "$NNODES node(s) x $PROCS_PER_NODE rank(s) = world $WORLD_SIZE, GPUs/node $GPUS_PER_NODE," \
        "master $MASTER_ADDR:$MASTER_PORT, container $CONTAINER"
    sh_log "run dir $RUN_DIR, data ${DATA_DIR:-<config default>}, MLflow $MLFLOW_TRACKING_URI"
}

# CONTAINER=podman (podman, podman-hpc): each task runs one container of IMAGE. The container shares the
# host's network and IPC namespaces (ranks reach MASTER_ADDR and share memory as without a container),
# gets the job's environment by name (podman does not inherit it), the mounts at the same paths, and runs
# as the job's user (rootless podman: --userns=keep-id), so files on shared storage are yours as with
# CONTAINER=none. The label finds a job's containers: podman ps --filter label=scale-hyper.slurm-job=<id>.
#
# Signals: not podman's own relay (--sig-proxy). scancel sends SIGCONT and SIGTERM to every process of
# the step, and this script adds SIGUSR1: the `runc kill` that podman starts to forward one signal is
# killed by the next, and podman then stops relaying and dies of the signal itself, leaving the rank's
# container running without it (seen on the test cluster). So each task runs SH_PODMAN_TASK: `podman
# run --sig-proxy=false` is started outside the task's process tree (its output still goes to the
# task's), the task traps USR1/TERM and passes each to the container with `podman kill`, retried until
# it lands, waits for the container and exits with its status. --init: a small init as PID 1 passes the
# signal to the command, which ignores SIGUSR1 below the trainer as SH_TASK does without containers.
# shellcheck disable=SC2016  # expanded by the task's bash
SH_PODMAN_TASK='
set -u
name=scale-hyper-$SLURM_JOB_ID-${SLURM_STEP_ID:-0}-${SLURM_PROCID:-0}
args=("${@//__NODE_RANK__/$SLURM_NODEID}")
cmd=("${args[0]}" "${args[1]}" --name "$name" --sig-proxy=false)
for a in "${args[@]:2}"; do [[ $a == --rm ]] || cmd+=("$a"); done
relay() {
    local i
    for i in $(seq 40); do
        podman kill --signal "$1" "$name" >/dev/null 2>&1 && return
        [[ $(podman container inspect --format "{{.State.Running}}" "$name" 2>/dev/null) == true ]] || return
        sleep 0.25
    done
}
trap "relay USR1" USR1
trap "relay TERM" TERM
trap "" CONT
podman rm -f "$name" >/dev/null 2>&1
tmp=$(mktemp -d)
( "${cmd[@]}" & echo $! >"$tmp/pid" )
until podman container exists "$name" 2>/dev/null; do
    kill -0 "$(cat "$tmp/pid")" 2>/dev/null || { rm -rf "$tmp"; echo "podman run failed: ${cmd[*]}" >&2; exit 125; }
    sleep 0.2
done
code=
while [[ -z $code ]]; do
    podman wait "$name" >"$tmp/code" 2>/dev/null &
    waiter=$!
    while kill -0 "$waiter" 2>/dev/null; do wait "$waiter"; done
    code=$(cat "$tmp/code")
    if [[ -z $code ]] && [[ $(podman container inspect --format "{{.State.Running}}" "$name" 2>/dev/null) != true ]]; then
        code=$(podman container inspect --format "{{.State.ExitCode}}" "$name" 2>/dev/null || echo 1)
    fi
done
while kill -0 "$(cat "$tmp/pid")" 2>/dev/null; do sleep 0.1; done
podman rm -f "$name" >/dev/null 2>&1
rm -rf "$tmp"
exit "$code"
'
SH_PODMAN_ENV=('SLURM_*' MASTER_ADDR MASTER_PORT RANK LOCAL_RANK WORLD_SIZE OMP_NUM_THREADS 'MLFLOW_*'
    'NCCL_*' 'TORCH_NCCL_*' 'GLOO_*' 'DEEPSPEED_*' 'SCALE_HYPER_*' PYTHONFAULTHANDLER PYTHONUNBUFFERED
    CUDA_VISIBLE_DEVICES HF_HUB_OFFLINE HF_DATASETS_OFFLINE TRANSFORMERS_OFFLINE TOKENIZERS_PARALLELISM)
sh_podman_exec() {
    local mounts=$1 m env
    shift
    SH_EXEC=(podman run --init --network host --ipc host --label "scale-hyper.slurm-job=$SLURM_JOB_ID"
        --workdir "$PWD" --entrypoint "")
    if [[ $(id -u) == 0 ]]; then SH_EXEC+=(--user 0:0); else SH_EXEC+=(--userns=keep-id); fi
    (( GPUS_PER_NODE > 0 )) && SH_EXEC+=(--device nvidia.com/gpu=all)   # CDI (nvidia-container-toolkit)
    local list=()
    IFS=, read -r -a list <<<"$mounts"
    for m in "${list[@]}"; do SH_EXEC+=(--volume "$m"); done
    for env in "${SH_PODMAN_ENV[@]}"; do SH_EXEC+=(--env "$env"); done
    # shellcheck disable=SC2016  # expanded by the container's bash
    SH_EXEC+=("$@" "$IMAGE" bash -c 'trap "" USR1; exec "$@"' scale-hyper-task)
}

# The srun options shared by all steps.
sh_srun_opts() {
    local ntasks_per_node=$1
    SH_SRUN=(srun --nodes="$NNODES" --ntasks-per-node="$ntasks_per_node"
        --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}"
        --kill-on-bad-exit=1 "${SH_SRUN_CONTAINER[@]}")
}

# deepspeed launcher arguments for one node (one srun task per node).
sh_launcher_cmd() {
    local port=$1
    local hostfile="$RUN_DIR/hostfile.$SLURM_JOB_ID"
    # DeepSpeed hostfile: one "host slots=N" line per node, in SLURM's node order (node rank order).
    scontrol show hostnames "$SLURM_JOB_NODELIST" | awk -v n="$PROCS_PER_NODE" '{print $1 " slots=" n}' >"$hostfile"
    SH_LAUNCH=(deepspeed --hostfile "$hostfile" --no_ssh --node_rank=__NODE_RANK__
        --master_addr "$MASTER_ADDR" --master_port "$port")
}

# ---------------------------------------------------------------------------------------------------
# Preflight: every rank prints where it is and joins one gloo all_reduce, through the same launch path
# as training (catches a wrong MASTER_ADDR, a firewall, a bad rank layout in seconds, not after the
# distributed timeout). PREFLIGHT=0 skips it. It tests TCP reachability, not NCCL/InfiniBand.
# ---------------------------------------------------------------------------------------------------
SH_PREFLIGHT_PY='
import datetime, os, socket
env = os.environ
if "RANK" not in env and "SLURM_PROCID" in env:  # srun mode: the same mapping the trainer does
    env.update(RANK=env["SLURM_PROCID"], LOCAL_RANK=env.get("SLURM_LOCALID", "0"), WORLD_SIZE=env["SLURM_NTASKS"])
import torch
import torch.distributed as dist
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
total = torch.ones(1)
dist.all_reduce(total)
node, rank, world, local = env.get("SLURM_NODEID", "?"), env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]
master = env["MASTER_ADDR"] + ":" + env["MASTER_PORT"]
print(f"scale-hyper preflight: host {socket.gethostname()} node {node} rank {rank}/{world} local {local} "
      f"master {master} all_reduce {int(total.item())}", flush=True)
dist.destroy_process_group()
'

sh_preflight() {
    local mode=$SH_MODE
    (( PREFLIGHT )) || return 0
    local port=$(( MASTER_PORT + 1 ))   # not the training port: no TIME_WAIT surprises
    local probe="$RUN_DIR/preflight.py"     # on shared storage (and mounted in containers)
    printf '%s' "$SH_PREFLIGHT_PY" >"$probe"
    sh_log "preflight: $WORLD_SIZE rank(s) via $mode"
    if [[ $mode == launcher ]]; then
        sh_srun_opts 1
        sh_launcher_cmd "$port"
        "${SH_SRUN[@]}" "${SH_TASK[@]}" "${SH_EXEC[@]}" "${SH_LAUNCH[@]}" --log_level=warning \
            --no_python --no_local_rank python3 "$probe" \
            || sh_die "preflight failed: the ranks could not form a process group (see above)"
    else
        sh_srun_opts "$PROCS_PER_NODE"
        MASTER_PORT=$port "${SH_SRUN[@]}" "${SH_TASK[@]}" "${SH_EXEC[@]}" python3 "$probe" \
            || sh_die "preflight failed: the ranks could not form a process group (see above)"
    fi
}

# ---------------------------------------------------------------------------------------------------
# Preemption. The templates ask SLURM for `--signal=B:USR1@120`: 120 s before the time limit SLURM
# sends SIGUSR1 to this batch shell only. The trap below forwards it to the running training step
# (srun relays it to every process of the step); the trainer checkpoints at the next step boundary
# and exits 0; then this script requeues the job (`scontrol requeue`), which restarts it under the
# same job id with train.resume=auto, i.e. from exactly that checkpoint.
# SIGTERM means "stop" (a plain scancel, preemption, a kill of the script): checkpoint the same way,
# but never requeue — a requeue would undo the user's scancel (SLURM requeues a preempted
# PreemptMode=REQUEUE job itself).
# ---------------------------------------------------------------------------------------------------
SH_PREEMPTED=0
SH_STOP_SIGNAL=
SH_STEP_PID=
sh_on_stop_signal() {
    SH_PREEMPTED=1
    SH_STOP_SIGNAL=$1
    if [[ $1 == TERM ]]; then
        sh_log "SIGTERM (scancel, preemption or a kill: stop): asking the ranks to checkpoint and exit"
    else
        sh_log "SIG$1 (time limit near, or a pause request): asking the ranks to checkpoint and exit"
    fi
    if [[ -n $SH_STEP_PID ]]; then
        # As USR1: srun relays USR1 to every task, whereas an srun that gets TERM cancels the step
        # (SIGKILL to the tasks), which would lose the checkpoint.
        kill -USR1 "$SH_STEP_PID" 2>/dev/null || true
    fi
}

# Runs "$@" in the background so the trap can fire while it runs (bash defers traps during a
# foreground command), then waits for it. Sets SH_STEP_RC. The step runs in its own session: a
# SIGTERM to this script's process group reaches the trap above, not srun.
sh_run_step() {
    setsid "$@" &
    SH_STEP_PID=$!
    while kill -0 "$SH_STEP_PID" 2>/dev/null; do
        wait "$SH_STEP_PID" || true   # returns early whenever a trapped signal arrives
    done
    SH_STEP_RC=0
    wait "$SH_STEP_PID" || SH_STEP_RC=$?
    SH_STEP_PID=
}

sh_newest_checkpoint() {  # the step of the newest complete checkpoint in the run dir (empty: none)
    local marker step newest=
    for marker in "$RUN_DIR"/checkpoints/step_*/trainer_state.json; do
        [[ -f $marker ]] || continue
        step=${marker%/trainer_state.json}
        step=${step##*/step_}
        step=${step%_universal}
        if [[ -z $newest ]] || (( step > newest )); then newest=$step; fi
    done
    printf '%s' "$newest"
}

sh_job_log() {  # this job's stdout file (the --output pattern, expanded by SLURM)
    scontrol show job "$SLURM_JOB_ID" 2>/dev/null | tr ' ' '\n' | awk -F= '$1 == "StdOut" {print $2; exit}'
}

sh_train() {
    local mode=$SH_MODE
    if (( SH_PREEMPTED )) && [[ $SH_STOP_SIGNAL == TERM ]]; then
        sh_log "stopped (SIGTERM) before training started: not training, not requeueing"
        return 0
    elif (( SH_PREEMPTED )); then
        sh_log "signalled before training started: requeueing without training"
    else
        local inner
        if [[ $mode == launcher ]]; then
            sh_srun_opts 1
            sh_launcher_cmd "$MASTER_PORT"
            inner=("${SH_EXEC[@]}" "${SH_LAUNCH[@]}" --module scale_hyper "${SH_TRAIN_ARGS[@]}")
        else
            sh_srun_opts "$PROCS_PER_NODE"
            inner=("${SH_EXEC[@]}" scale-hyper "${SH_TRAIN_ARGS[@]}")
        fi
        local log offset=0
        log=$(sh_job_log)
        [[ -n $log && -f $log ]] && offset=$(stat -c %s "$log")
        local before after
        before=$(sh_newest_checkpoint)
        sh_log "training: ${SH_SRUN[*]} <task wrapper> $(printf '%q ' "${inner[@]}")"
        sh_run_step "${SH_SRUN[@]}" "${SH_TASK[@]}" "${inner[@]}"
        after=$(sh_newest_checkpoint)
        sh_log "training step exited with status $SH_STEP_RC (newest checkpoint: step ${after:-none})"
        if (( SH_PREEMPTED )) && [[ -n $log && -f $log ]] \
            && tail -c +$(( offset + 1 )) "$log" | grep -- "$FINISHED_PATTERN" >/dev/null; then
            sh_log "the run had already finished when the signal came: not requeueing"
            return 0
        fi
        if (( ! SH_PREEMPTED )) && (( SH_STEP_RC != HUNG_EXIT_CODE )); then
            return "$SH_STEP_RC"
        fi
        local why=signalled
        if (( ! SH_PREEMPTED )); then
            # A rank sent no heartbeat for train.dist_timeout_minutes (stopped, hung, its node gone): every
            # live rank named it in the log above and exited with HUNG_EXIT_CODE. Requeued like a preemption.
            why="a rank hung (status $SH_STEP_RC)"
        fi
        # Requeue on the evidence of a new complete checkpoint, not on the exit status: a launcher
        # (deepspeed, torchrun) relaying the signal may exit non-zero while its ranks saved and exited 0;
        # and a hang that recurs before the next checkpoint must not requeue the job forever.
        if [[ -z $after || $after == "$before" ]]; then
            sh_log "$why, but no new checkpoint was completed (status $SH_STEP_RC): not requeueing"
            return $(( SH_STEP_RC != 0 ? SH_STEP_RC : 1 ))
        fi
        (( SH_PREEMPTED )) || sh_log "$why after saving the checkpoint of step $after"
        if [[ $SH_STOP_SIGNAL == TERM ]]; then
            sh_log "stopped by SIGTERM with a checkpoint at step $after: not requeueing" \
                "(resubmit the same job to resume from it)"
            return 0
        fi
    fi
    if (( ${SLURM_RESTART_COUNT:-0} >= MAX_REQUEUES )); then
        sh_log "already restarted ${SLURM_RESTART_COUNT} times (MAX_REQUEUES=$MAX_REQUEUES): not requeueing"
        return 1
    fi
    sh_log "requeueing job $SLURM_JOB_ID (it resumes from the newest checkpoint)"
    scontrol requeue "$SLURM_JOB_ID" || sh_die "scontrol requeue failed (was the job submitted with --requeue?)"
    return 0
}

# ---------------------------------------------------------------------------------------------------
# Doctor (slurm/doctor.sbatch): `scale-hyper doctor` with the training job's configs, through the
# same launch path (srun, one task per rank), in the foreground. The table goes to the job log, the
# JSON beside it (<log without .out>.json, or DOCTOR_JSON). Returns the doctor's exit status
# (0 nothing failed, 1 a check failed, 2 bad input).
# ---------------------------------------------------------------------------------------------------
sh_doctor() {
    local log json rc=0
    log=$(sh_job_log)
    json=${DOCTOR_JSON:-}
    if [[ -z $json && -n $log ]]; then
        json=${log%.out}.json
    elif [[ -z $json ]]; then
        json=$RUN_DIR/doctor-$SLURM_JOB_ID.json
    fi
    local args=(doctor "${SH_TRAIN_ARGS[@]:1}" --json "$json" --join-timeout "${DOCTOR_JOIN_TIMEOUT:-90}")
    if [[ -n ${DOCTOR_CHECKS:-} ]]; then
        args+=(--checks "$DOCTOR_CHECKS")
    fi
    sh_srun_opts "$PROCS_PER_NODE"
    sh_log "doctor: ${SH_SRUN[*]} <task wrapper> $(printf '%q ' "${SH_EXEC[@]}" scale-hyper "${args[@]}")"
    "${SH_SRUN[@]}" "${SH_TASK[@]}" "${SH_EXEC[@]}" scale-hyper "${args[@]}" || rc=$?
    sh_log "doctor exited with status $rc; JSON: $json"
    return "$rc"
}
