#!/usr/bin/env bash
# Start a real SLURM cluster on this one machine, for the SLURM integration tests (tests/test_slurm.py).
#
#   sudo .ci/start-slurm.sh          # idempotent: re-running it on a healthy cluster only re-checks it
#
# What it builds (Debian/Ubuntu `slurm-wlm` + `munge`, run as root):
#   * munged with a local key, slurmctld, and TWO slurmd daemons on this host, one per emulated node
#     (NodeName=shnode1/shnode2, same NodeHostname, own Port=, spool, pid and log files, `slurmd -N`).
#     Debian's slurm is not built with --enable-multiple-slurmd, but with per-node %n paths and ports
#     two daemons coexist: jobs see two nodes, SLURM_NODEID 0 and 1, SLURM_JOB_NODELIST=shnode[1-2],
#     which is what the multi-node templates need. Both nodes resolve to 127.0.0.1 (NodeAddr).
#   * each node advertises CPUs=max(2, nproc): on a 2-core box that is a 2x overcommit (4 "CPUs" over 2
#     cores) so a 2-task job fits on ONE node (single-node template) and a 1-task-per-node job spans both
#     (multi-node templates). SlurmdParameters=config_overrides lets slurmd accept the larger count.
#   * AuthInfo=cred_expire=10: a requeued job may start again after cred_expire seconds (default 120);
#     the preemption test requeues a job and should not wait two minutes for it.
#
# Environment knobs: SLURM_EMU_NODES (default 2), SLURM_EMU_CPUS (per node, default max(2, nproc)),
# SLURM_EMU_PARTITION (default debug), SLURM_EMU_WAIT (seconds to wait for idle nodes, default 60).
# Exits non-zero with a message when it cannot work (not root, no apt-get and slurm missing, daemons dead).
set -euo pipefail

die() { echo "start-slurm: ERROR: $*" >&2; exit 1; }
log() { echo "start-slurm: $*"; }

[[ $(id -u) -eq 0 ]] || die "must run as root (it installs packages and starts munged/slurmctld/slurmd)"

NODES=${SLURM_EMU_NODES:-2}
NCPU=$(nproc)
CPUS=${SLURM_EMU_CPUS:-$(( NCPU > 2 ? NCPU : 2 ))}
PARTITION=${SLURM_EMU_PARTITION:-debug}
WAIT_S=${SLURM_EMU_WAIT:-60}
HOST=$(hostname -s)
PREFIX=shnode
CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
LOG_DIR=/var/log/slurm

# --- 1. packages ---------------------------------------------------------------------------------
need_install=0
for bin in sbatch srun sinfo scontrol slurmctld slurmd munged; do
    command -v "$bin" >/dev/null 2>&1 || need_install=1
done
if (( need_install )); then
    command -v apt-get >/dev/null 2>&1 || die "slurm/munge are not installed and apt-get is not available"
    log "installing slurm-wlm and munge with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || die "apt-get update failed (no package mirror reachable?)"
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null \
        || die "apt-get install slurm-wlm munge failed"
fi

# --- 2. munge --------------------------------------------------------------------------------------
install -d -o munge -g munge -m 0700 /etc/munge /var/log/munge /var/lib/munge
install -d -o munge -g munge -m 0755 /run/munge
if [[ ! -s /etc/munge/munge.key ]]; then
    log "creating munge key"
    if command -v mungekey >/dev/null 2>&1; then
        mungekey --create --keyfile=/etc/munge/munge.key --force
    else
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "starting munged"
    rm -f /run/munge/munged.pid /run/munge/munge.socket.2.lock
    runuser -u munge -- /usr/sbin/munged || die "munged did not start (see /var/log/munge/munged.log)"
    for _ in $(seq 20); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break
        sleep 0.5
    done
    munge -n | unmunge >/dev/null 2>&1 || die "munge credentials do not round-trip"
fi

# --- 3. slurm.conf ---------------------------------------------------------------------------------
mem_mb=$(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo)
node_mem=$(( mem_mb / NODES / 2 ))  # half the RAM, split between the emulated nodes
install -d "$CONF_DIR" "$LOG_DIR" /var/spool/slurmctld /var/spool/slurmd
new_conf=$(mktemp)
{
    echo "# Written by .ci/start-slurm.sh: a ${NODES}-node emulated cluster on host ${HOST}."
    echo "ClusterName=scalehyper"
    echo "SlurmctldHost=${HOST}(127.0.0.1)"
    echo "SlurmUser=root"
    echo "SlurmdUser=root"
    echo "AuthType=auth/munge"
    echo "CredType=cred/munge"
    echo "AuthInfo=cred_expire=10"
    echo "ProctrackType=proctrack/linuxproc"
    echo "TaskPlugin=task/none"
    echo "SwitchType=switch/none"
    echo "MpiDefault=none"
    echo "SelectType=select/cons_tres"
    echo "SelectTypeParameters=CR_CPU"
    echo "SchedulerType=sched/backfill"
    echo "SchedulerParameters=sched_interval=5"
    echo "JobRequeue=1"
    echo "ReturnToService=2"
    echo "SlurmdParameters=config_overrides"
    echo "SlurmctldTimeout=30"
    echo "SlurmdTimeout=60"
    echo "InactiveLimit=0"
    echo "KillWait=30"
    echo "MinJobAge=600"
    echo "JobAcctGatherType=jobacct_gather/none"
    echo "AccountingStorageType=accounting_storage/none"
    echo "StateSaveLocation=/var/spool/slurmctld"
    echo "SlurmdSpoolDir=/var/spool/slurmd/%n"
    echo "SlurmctldPidFile=/run/slurmctld.pid"
    echo "SlurmdPidFile=/run/slurmd-%n.pid"
    echo "SlurmctldLogFile=${LOG_DIR}/slurmctld.log"
    echo "SlurmdLogFile=${LOG_DIR}/slurmd-%n.log"
    echo "SlurmctldPort=6817"
    for i in $(seq "$NODES"); do
        echo "NodeName=${PREFIX}${i} NodeHostname=${HOST} NodeAddr=127.0.0.1 Port=$(( 17000 + i )) CPUs=${CPUS} RealMemory=${node_mem} State=UNKNOWN"
    done
    echo "PartitionName=${PARTITION} Nodes=${PREFIX}[1-${NODES}] Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO"
} > "$new_conf"

restart=0
if ! cmp -s "$new_conf" "$CONF"; then
    log "writing $CONF"
    install -m 0644 "$new_conf" "$CONF"
    restart=1
fi
rm -f "$new_conf"

pid_alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }
stop_pidfile() {
    if pid_alive "$1"; then
        kill "$(cat "$1")" 2>/dev/null || true
        for _ in $(seq 20); do pid_alive "$1" || break; sleep 0.5; done
    fi
    rm -f "$1"
}

# --- 4. daemons --------------------------------------------------------------------------------------
if (( restart )); then
    for i in $(seq 8); do stop_pidfile "/run/slurmd-${PREFIX}${i}.pid"; done
    stop_pidfile /run/slurmctld.pid
fi
if ! pid_alive /run/slurmctld.pid; then
    log "starting slurmctld"
    # -i: start even when state saved by an earlier, differently shaped cluster cannot be read back.
    slurmctld -i || die "slurmctld did not start (see ${LOG_DIR}/slurmctld.log)"
fi
for i in $(seq "$NODES"); do
    node=${PREFIX}${i}
    install -d "/var/spool/slurmd/${node}"
    if ! pid_alive "/run/slurmd-${node}.pid"; then
        log "starting slurmd for node ${node}"
        slurmd -N "$node" || die "slurmd -N ${node} did not start (see ${LOG_DIR}/slurmd-${node}.log)"
    fi
done

# --- 5. wait until every node is idle ----------------------------------------------------------------
deadline=$(( SECONDS + WAIT_S ))
while :; do
    states=$(sinfo -h -N -p "$PARTITION" -o "%N %t" 2>/dev/null || true)
    idle=$(awk '$2 == "idle" || $2 == "mix" || $2 == "alloc"' <<<"$states" | wc -l)
    if (( idle == NODES )); then
        break
    fi
    if grep -Eq ' (down|drain|drng|fail)' <<<"$states"; then
        # A node left DOWN by an earlier run (ReturnToService cannot resume a node set down by hand).
        for i in $(seq "$NODES"); do
            scontrol update NodeName="${PREFIX}${i}" State=RESUME >/dev/null 2>&1 || true
        done
    fi
    if (( SECONDS > deadline )); then
        echo "$states" >&2
        die "nodes not idle after ${WAIT_S}s (logs: ${LOG_DIR}/)"
    fi
    sleep 1
done
log "SLURM is up: partition ${PARTITION}, ${NODES} idle node(s) ${PREFIX}[1-${NODES}] on ${HOST}, ${CPUS} CPUs each ($(nproc) cores)"
sinfo -N -p "$PARTITION"
