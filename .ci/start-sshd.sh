#!/usr/bin/env bash
# Start sshd on this one machine under two host names, for the multi-node-over-ssh test
# (tests/test_multinode_ssh.py): `deepspeed --hostfile H --master_addr A ...` with the launcher's
# default backend, pdsh over ssh, on 2 "nodes" that are both this host.
#
#   sudo .ci/start-sshd.sh          # idempotent: re-running it on a healthy setup only re-checks it
#
# What it sets up (Debian/Ubuntu `openssh-server`, `openssh-client`, `pdsh`, run as root):
#   * /etc/hosts: shssh1 -> 127.0.0.2, shssh2 -> 127.0.0.3 (loopback aliases; nothing leaves the host).
#   * a dedicated sshd (own config /etc/ssh/sshd_config_scalehyper, own pid file) listening on those two
#     addresses only, key authentication only.
#   * a key made here (/root/.ssh/id_scalehyper_ci, no passphrase) in root's authorized_keys, and a
#     marked block in /root/.ssh/config: for these two names only, that key, and no host-key checking
#     (StrictHostKeyChecking no, known hosts in /dev/null), so `ssh shssh1` and pdsh never prompt.
#
# Environment knobs: SSHD_EMU_HOSTS (default "shssh1 shssh2"), SSHD_EMU_FIRST_ADDR (default 2: the
# hosts get 127.0.0.2, 127.0.0.3, ...), SSHD_EMU_PORT (default 22).
# Exits non-zero with a message when it cannot work (not root, packages missing and no apt-get, sshd dead).
set -euo pipefail

die() { echo "start-sshd: ERROR: $*" >&2; exit 1; }
log() { echo "start-sshd: $*"; }

[[ $(id -u) -eq 0 ]] || die "must run as root (it installs packages, edits /etc/hosts and starts sshd)"

read -r -a HOSTS <<<"${SSHD_EMU_HOSTS:-shssh1 shssh2}"
FIRST=${SSHD_EMU_FIRST_ADDR:-2}
PORT=${SSHD_EMU_PORT:-22}
CONF=/etc/ssh/sshd_config_scalehyper
PIDFILE=/run/sshd-scalehyper.pid
KEY=/root/.ssh/id_scalehyper_ci
LOG=/var/log/sshd-scalehyper.log

# --- 1. packages ---------------------------------------------------------------------------------
need_install=0
for bin in sshd ssh ssh-keygen pdsh; do
    command -v "$bin" >/dev/null 2>&1 || [[ -x /usr/sbin/$bin ]] || need_install=1
done
if (( need_install )); then
    command -v apt-get >/dev/null 2>&1 || die "openssh/pdsh are not installed and apt-get is not available"
    log "installing openssh-server, openssh-client and pdsh with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || die "apt-get update failed (no package mirror reachable?)"
    apt-get install -y -qq --no-install-recommends openssh-server openssh-client pdsh >/dev/null \
        || die "apt-get install openssh-server openssh-client pdsh failed"
fi

# --- 2. host names ----------------------------------------------------------------------------------
addrs=()
for i in "${!HOSTS[@]}"; do
    host=${HOSTS[$i]}
    addr=127.0.0.$(( FIRST + i ))
    addrs+=("$addr")
    if ! grep -Eq "^${addr//./\\.}[[:space:]]+${host}\$" /etc/hosts; then
        # /etc/hosts may be a bind mount (containers): rewrite in place, never replace the file.
        grep -Ev "[[:space:]]${host}\$" /etc/hosts >/tmp/start-sshd.hosts || true
        echo "${addr} ${host}" >>/tmp/start-sshd.hosts
        cat /tmp/start-sshd.hosts >/etc/hosts
        rm -f /tmp/start-sshd.hosts
        log "/etc/hosts: ${addr} ${host}"
    fi
done

# --- 3. keys and client config ---------------------------------------------------------------------
install -d -m 0700 /root/.ssh
[[ -s $KEY ]] || ssh-keygen -q -t ed25519 -N "" -C "scale-hyper-ci" -f "$KEY"
touch /root/.ssh/authorized_keys
chmod 0600 /root/.ssh/authorized_keys
grep -qF "$(cut -d' ' -f2 "$KEY.pub")" /root/.ssh/authorized_keys || cat "$KEY.pub" >>/root/.ssh/authorized_keys
touch /root/.ssh/config
chmod 0600 /root/.ssh/config
block_start="# >>> scale-hyper CI (.ci/start-sshd.sh)"
block_end="# <<< scale-hyper CI"
awk -v a="$block_start" -v b="$block_end" '$0 == a {skip = 1} !skip {print} $0 == b {skip = 0}' \
    /root/.ssh/config >/root/.ssh/config.new
cat /root/.ssh/config.new >/root/.ssh/config
rm -f /root/.ssh/config.new
{
    echo "$block_start"
    echo "Host ${HOSTS[*]}"
    echo "    User root"
    echo "    Port ${PORT}"
    echo "    IdentityFile ${KEY}"
    echo "    IdentitiesOnly yes"
    echo "    StrictHostKeyChecking no"
    echo "    UserKnownHostsFile /dev/null"
    echo "    LogLevel ERROR"
    echo "    BatchMode yes"
    echo "$block_end"
} >>/root/.ssh/config

# --- 4. sshd ----------------------------------------------------------------------------------------
ssh-keygen -A >/dev/null   # host keys, if the package did not make them
install -d -m 0755 /run/sshd
new_conf=$(mktemp)
{
    echo "# Written by .ci/start-sshd.sh: sshd for the emulated nodes ${HOSTS[*]} (loopback only)."
    echo "Port ${PORT}"
    for addr in "${addrs[@]}"; do echo "ListenAddress ${addr}"; done
    echo "PidFile ${PIDFILE}"
    echo "PermitRootLogin prohibit-password"
    echo "PubkeyAuthentication yes"
    echo "PasswordAuthentication no"
    echo "KbdInteractiveAuthentication no"
    echo "UsePAM no"
    echo "PrintMotd no"
    echo "AcceptEnv LANG LC_*"
    echo "Subsystem sftp internal-sftp"
} >"$new_conf"
restart=0
if ! cmp -s "$new_conf" "$CONF"; then
    install -m 0644 "$new_conf" "$CONF"
    restart=1
fi
rm -f "$new_conf"
/usr/sbin/sshd -t -f "$CONF" || die "sshd rejects $CONF"

pid_alive() { [[ -s $PIDFILE ]] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }
if (( restart )) && pid_alive; then
    kill "$(cat "$PIDFILE")" 2>/dev/null || true
    for _ in $(seq 20); do pid_alive || break; sleep 0.5; done
fi
if ! pid_alive; then
    log "starting sshd on ${addrs[*]} port ${PORT}"
    /usr/sbin/sshd -f "$CONF" -E "$LOG" || die "sshd did not start (see $LOG)"
fi

# --- 5. check: every name answers, without a prompt, and pdsh reaches them all ----------------------
for host in "${HOSTS[@]}"; do
    ok=0
    for _ in $(seq 20); do
        if ssh -o ConnectTimeout=5 "$host" true 2>/dev/null; then ok=1; break; fi
        sleep 0.5
    done
    (( ok )) || die "ssh ${host} does not work (sshd log: $LOG)"
done
hosts_csv=$(IFS=,; echo "${HOSTS[*]}")
out=$(PDSH_RCMD_TYPE=ssh pdsh -S -w "$hosts_csv" hostname 2>&1) || die "pdsh -w ${hosts_csv} failed: $out"
log "sshd is up: ${HOSTS[*]} (${addrs[*]}, port ${PORT}); pdsh -w ${hosts_csv} works"
