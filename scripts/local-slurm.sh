#!/usr/bin/env bash
# A real Slurm cluster of several GPU nodes on this one host, for trying hpcserve without a cluster
# and for its tests.
#
#   scripts/local-slurm.sh install   # Debian packages: slurm-wlm, munge, slurmdbd, mariadb-server (needs root)
#   scripts/local-slurm.sh start     # munge, MariaDB + slurmdbd, slurmctld, one slurmd per node; waits until nodes are idle
#   scripts/local-slurm.sh stop      # stops every daemon it started
#   scripts/local-slurm.sh stop-controller  # stops slurmctld only (jobs keep running); `start` brings it back
#   scripts/local-slurm.sh stop-dbd  # stops slurmdbd only (accounting down, jobs run); `start` brings it back
#   scripts/local-slurm.sh status    # sinfo
#   scripts/local-slurm.sh env       # prints the export line that points clients at it
#
# How it works (verified on Debian bookworm, Slurm 22.05): several `slurmd -N NAME` daemons share the
# host through NodeHostname=localhost and one port each; GPUs are gres backed by empty files, so
# Slurm schedules them but sets no CUDA_VISIBLE_DEVICES. Accounting: slurmdbd on a private MariaDB
# (its data under the cluster's folder, TCP on 127.0.0.1 only), with the accounts physics and
# chemistry (the user that runs this is in both, physics the default) and fair share
# (priority/multifactor), as a site runs them; where slurmdbd or MariaDB is not installed (a release
# root built without them) the cluster runs without accounting. Settings: HPCSERVE_SLURM_DIR (where the
# config, logs and spool live, default /tmp/hpcserve-slurm), HPCSERVE_SLURM_NODES (default 4).
set -euo pipefail

dir="${HPCSERVE_SLURM_DIR:-/tmp/hpcserve-slurm}"
nodes="${HPCSERVE_SLURM_NODES:-4}"
conf="$dir/slurm.conf"

log() { printf 'local-slurm: %s\n' "$*" >&2; }

need_root() {
    if [ "$(id -u)" -ne 0 ]; then
        log "this needs root (it installs packages or runs slurmd); run it with sudo"
        exit 1
    fi
}

install() {
    need_root
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
            && command -v slurmdbd >/dev/null && command -v mariadbd >/dev/null; then
        log "slurm-wlm, munge, slurmdbd and mariadb-server are installed"
        return
    fi
    log "installing slurm-wlm, munge, slurmdbd and mariadb-server (Debian packages)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge slurmdbd mariadb-server >/dev/null
}

# Accounting runs where its programs are installed (the host after `install`; a release root only
# if it was built with them).
accounting() { command -v slurmdbd >/dev/null && command -v mariadbd >/dev/null && command -v sacctmgr >/dev/null; }

db_port=16819     # MariaDB, 127.0.0.1 only
dbd_port=16818    # slurmdbd

write_config() {
    mkdir -p "$dir/spool/ctld" "$dir/log" "$dir/gpus"
    for i in $(seq 1 "$nodes"); do mkdir -p "$dir/spool/gpu$i"; done
    for g in 0 1 2 3 4 5 6 7; do : >"$dir/gpus/nvidia$g"; done
    local last_port=$((17000 + nodes))
    cat >"$conf" <<EOF
# Written by hpcserve scripts/local-slurm.sh: $nodes GPU nodes on one host.
ClusterName=hpcserve-local
SlurmctldHost=localhost
SlurmctldPort=16817
SlurmdPort=17001
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$dir/spool/ctld
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
$(accounting_config)
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
SchedulerParameters=batch_sched_delay=0,sched_min_interval=100000
MinJobAge=120
KillWait=10
GresTypes=gpu
NodeName=gpu[1-$nodes] NodeHostname=localhost Port=[17001-$last_port] CPUs=16 RealMemory=64000 Gres=gpu:a100:8 State=UNKNOWN
PartitionName=gpu Nodes=gpu[1-$nodes] Default=YES MaxTime=INFINITE State=UP
# The CPU partition a site runs OpenWebUI in (hpcserve webui --sbatch): the same nodes here.
PartitionName=cpu Nodes=gpu[1-$nodes] MaxTime=INFINITE State=UP
EOF
    # Slurm 24.11's slurmd starts a cgroup plugin unless told not to; the nodes here share one
    # host and track processes by PID (proctrack/linuxproc). `CgroupPlugin=disabled` exists from
    # 23.02 on; 22.05's slurmd fails on it, and needs no cgroup.conf.
    rm -f "$dir/cgroup.conf"
    if slurmd -V | awk '{ split($2, v, "."); exit !(v[1] > 23 || (v[1] == 23 && v[2] >= 2)) }'; then
        printf 'CgroupPlugin=disabled\n' >"$dir/cgroup.conf"
    fi
    if accounting; then
        # slurmdbd reads slurmdbd.conf beside slurm.conf; it holds the database password: 0600.
        (umask 077; cat >"$dir/slurmdbd.conf" <<EOF
# Written by hpcserve scripts/local-slurm.sh: slurmdbd on the private MariaDB below.
AuthType=auth/munge
DbdHost=localhost
DbdPort=$dbd_port
SlurmUser=root
LogFile=$dir/log/slurmdbd.log
PidFile=$dir/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$db_port
StorageUser=slurm
StoragePass=$(db_password)
StorageLoc=slurm_acct_db
EOF
        )
    fi
    cat >"$dir/gres.conf" <<EOF
NodeName=gpu[1-$nodes] Name=gpu Type=a100 File=$dir/gpus/nvidia[0-7]
EOF
}

# The slurm.conf lines of accounting: slurmdbd and fair share, or none.
accounting_config() {
    if accounting; then
        cat <<EOF
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$dbd_port
AccountingStorageTRES=gres/gpu
PriorityType=priority/multifactor
PriorityWeightFairshare=100000
PriorityDecayHalfLife=1-0
PriorityCalcPeriod=1
EOF
    else
        echo "AccountingStorageType=accounting_storage/none"
    fi
}

# The database password, made once (random) and kept 0600 in the cluster's folder.
db_password() {
    [ -s "$dir/db.pass" ] || (umask 077; head -c 18 /dev/urandom | base64 | tr -d '/+=' >"$dir/db.pass")
    cat "$dir/db.pass"
}

start_accounting() {
    local sock="$dir/mariadb/mysqld.sock"
    if [ ! -d "$dir/mariadb/data/mysql" ]; then
        log "creating the accounting database (MariaDB, $dir/mariadb)"
        mkdir -p "$dir/mariadb"
        mariadb-install-db --no-defaults --datadir="$dir/mariadb/data" --user=root \
            --auth-root-authentication-method=socket --skip-test-db >"$dir/log/mariadb-install.log" 2>&1
        # A new database numbers the cluster anew: slurmctld, finding the old number in its state,
        # would stop ("CLUSTER ID MISMATCH"); its jobs are kept, the number is taken from slurmdbd.
        rm -f "$dir/spool/ctld/clustername"
        seed_usage=1
    fi
    if ! pgrep -f "mariadbd --no-defaults --datadir=$dir/mariadb/data" >/dev/null; then
        log "starting MariaDB"
        rm -f "$sock"   # one left by a MariaDB that was killed
        mariadbd --no-defaults --datadir="$dir/mariadb/data" --user=root --socket="$sock" \
            --port="$db_port" --bind-address=127.0.0.1 --skip-name-resolve --innodb-buffer-pool-size=64M \
            --pid-file="$dir/mariadb/mysqld.pid" --log-error="$dir/log/mariadb.log" >/dev/null 2>&1 &
        for _ in $(seq 1 60); do mariadb --no-defaults -S "$sock" -e "SELECT 1" >/dev/null 2>&1 && break; sleep 0.5; done
    fi
    mariadb --no-defaults -S "$sock" -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
        CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$(db_password)';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
    if ! kill -0 "$(cat "$dir/slurmdbd.pid" 2>/dev/null || echo none)" 2>/dev/null; then
        log "starting slurmdbd"
        SLURM_CONF="$conf" slurmdbd
        for _ in $(seq 1 60); do SLURM_CONF="$conf" sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 0.5; done
    fi
    # The cluster, its accounts and this user's associations (idempotent: sacctmgr -i adds only
    # what is missing).
    local user; user="$(id -un)"
    export SLURM_CONF="$conf"
    sacctmgr -i add cluster hpcserve-local >/dev/null 2>&1 || true
    sacctmgr -i add account physics,chemistry cluster=hpcserve-local Description=hpcserve-test Organization=hpcserve >/dev/null 2>&1 || true
    sacctmgr -i add user "$user" account=physics,chemistry defaultaccount=physics cluster=hpcserve-local >/dev/null 2>&1 || true
}

start() {
    need_root
    install
    write_config
    export SLURM_CONF="$conf"
    if ! pgrep -x munged >/dev/null; then
        log "starting munge"
        service munge start >/dev/null 2>&1 || { mkdir -p /run/munge && chown munge: /run/munge 2>/dev/null; runuser -u munge -- munged; }
    fi
    if accounting; then start_accounting; fi
    if ! pgrep -f "slurmctld -f $conf" >/dev/null; then
        log "starting slurmctld"
        slurmctld -f "$conf"
    else
        scontrol reconfigure >/dev/null 2>&1 || true   # the config just written (e.g. a new partition)
    fi
    for i in $(seq 1 "$nodes"); do
        if ! pgrep -f "slurmd -f $conf -N gpu$i\$" >/dev/null; then
            slurmd -f "$conf" -N "gpu$i"
        fi
    done
    log "waiting for $nodes idle nodes"
    for _ in $(seq 1 60); do
        local idle
        idle=$(sinfo --noheader -N -t idle,mixed,allocated -o '%N' 2>/dev/null | sort -u | wc -l || true)
        if [ "$idle" -ge "$nodes" ]; then
            if [ -n "${seed_usage:-}" ]; then
                # A site's accounts have a history: physics gets one CPU for 75 s, across one of
                # Slurm's fair-share ticks (PriorityCalcPeriod, a minute), so that its fair share is
                # below chemistry's from the start (tests/integration/test_accounts.py).
                sbatch --account=physics --partition=cpu -c 1 --mem=100 --time=3 -J local-slurm-usage \
                    --output=/dev/null --wrap "sleep 75" >/dev/null
            fi
            log "ready: $nodes nodes gpu[1-$nodes], 8 a100 gres each; export SLURM_CONF=$conf"
            return
        fi
        sleep 1
    done
    log "nodes did not come up; see $dir/log"
    sinfo >&2 || true
    exit 1
}

# terminate PATTERN WHAT: SIGTERM the daemons whose command line matches, SIGKILL them after 10 s.
terminate() {
    pkill -f "$1" 2>/dev/null || true
    for _ in $(seq 1 20); do
        pgrep -f "$1" >/dev/null || { log "$2 stopped"; return; }
        sleep 0.5
    done
    pkill -9 -f "$1" 2>/dev/null || true
    log "$2 stopped (killed)"
}

stop() {
    terminate "slurm(ctld|d) -f $conf" "slurmctld and slurmd"
    stop_dbd
    terminate "mariadbd --no-defaults --datadir=$dir/mariadb/data" "MariaDB"
}

# Stops slurmdbd (found by its pid file); slurmctld keeps what it would send until it is back.
stop_dbd() {
    local pid
    pid="$(cat "$dir/slurmdbd.pid" 2>/dev/null || true)"
    if [ -n "$pid" ] && kill "$pid" 2>/dev/null; then
        for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        kill -9 "$pid" 2>/dev/null || true
        log "slurmdbd stopped"
    fi
}

stop_controller() { terminate "slurmctld -f $conf" "slurmctld"; }

case "${1:-}" in
    install) install ;;
    stop-controller) stop_controller ;;
    stop-dbd) stop_dbd ;;
    start) start ;;
    stop) stop ;;
    status) SLURM_CONF="$conf" sinfo ;;
    env) printf 'export SLURM_CONF=%q\n' "$conf" ;;
    *) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
