#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for trying the launcher and for the tests.
#
#   scripts/slurm_local.sh start    # munged + slurmctld + slurmd; prints the SLURM_CONF to export
#   scripts/slurm_local.sh status   # exit 0 and sinfo's view when it runs, exit 1 otherwise
#   scripts/slurm_local.sh stop     # cancels its jobs and stops the daemons it started
#
# Everything (config, munge key, state, spool, logs, pid files) lives under LINNAEUS_SLURM_DIR
# (default /tmp/linnaeus-slurm); nothing under /etc is read or changed. Needs the Debian packages
# slurm-wlm and munge (`apt-get install -y slurm-wlm munge`) and root, as the daemons run as root.
# Ports: LINNAEUS_SLURM_PORT for slurmctld (default 6817), the next one for slurmd.
set -euo pipefail

DIR="${LINNAEUS_SLURM_DIR:-/tmp/linnaeus-slurm}"
CTLD_PORT="${LINNAEUS_SLURM_PORT:-6817}"
SLURMD_PORT=$((CTLD_PORT + 1))
CONF="$DIR/slurm.conf"
MUNGE_SOCKET="$DIR/munge-socket/munge.socket.2"
export SLURM_CONF="$CONF"

die() {
  echo "slurm_local: $*" >&2
  exit 1
}

# pid from a pid file, printed only if that process is alive and runs the expected program
live_pid() {
  local file="$1" program="$2" pid
  [[ -s "$file" ]] || return 1
  pid="$(tr -dc '0-9' <"$file")"
  [[ -n "$pid" && -d "/proc/$pid" ]] || return 1
  [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$program" ]] || return 1
  echo "$pid"
}

is_running() {
  live_pid "$DIR/run/munged.pid" munged >/dev/null \
    && live_pid "$DIR/run/slurmctld.pid" slurmctld >/dev/null \
    && live_pid "$DIR/run/slurmd.pid" slurmd >/dev/null
}

show_logs() {
  local log
  for log in "$DIR"/log/*.log; do
    [[ -f "$log" ]] || continue
    echo "--- $log (last lines)" >&2
    tail -n 15 "$log" >&2
  done
}

write_config() {
  local node cpus mem_mb first_job_id
  node="$(hostname -s)"
  # job ids of a new cluster start where no earlier cluster's did (minutes since 1970): submitit
  # keeps results in <sweep dir>/.submitit/<job id>, which a reused id would mistake for its own
  [[ -s "$DIR/first_job_id" ]] || echo $(($(date +%s) / 60 % 50000000 + 1000)) >"$DIR/first_job_id"
  first_job_id="$(cat "$DIR/first_job_id")"
  cpus="$(nproc)"
  # a little under the physical memory: slurmd drains a node that reports less than configured
  mem_mb="$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)"
  cat >"$CONF" <<EOF
# Written by scripts/slurm_local.sh: a single-node cluster for local runs and tests.
ClusterName=linnaeus
SlurmctldHost=$node
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire also delays a requeued job (default 120 s); short is fine on one node
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
TmpFS=$DIR/tmp
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
# schedule every few seconds: a requeued job becomes eligible by time, which triggers no event
SchedulerParameters=sched_interval=5,bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
FirstJobId=$first_job_id
InactiveLimit=0
KillWait=30
MinJobAge=300
Waittime=0
SlurmctldTimeout=120
SlurmdTimeout=300
NodeName=$node CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
}

wait_for_node() {
  local node state i
  node="$(hostname -s)"
  for i in $(seq 1 60); do
    state="$(sinfo -h -N -n "$node" -o '%T' 2>/dev/null | head -n 1 || true)"
    case "$state" in
      idle* | mixed* | allocated*) return 0 ;;
      down* | drain*) scontrol update NodeName="$node" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    sleep 1
  done
  show_logs
  die "node $node did not become idle within 60 s (last state: ${state:-none})"
}

start() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
    || die "slurmctld, slurmd or munged not found; install them with: apt-get install -y slurm-wlm munge"
  [[ "$(id -u)" == 0 ]] || die "the daemons run as root (SlurmUser=root); run this as root"
  if is_running; then
    echo "slurm_local: already running in $DIR"
    echo "export SLURM_CONF=$CONF"
    return 0
  fi
  stop_daemons quiet  # leftovers of a half-started cluster
  mkdir -p "$DIR"/{munge,munge-socket,state,spool,tmp,run,log}
  # munged checks permissions: a private key folder, a socket folder every local user may enter
  chmod 755 "$DIR" "$DIR/munge-socket"
  chmod 700 "$DIR/munge"
  [[ -s "$DIR/munge/munge.key" ]] || mungekey -c -k "$DIR/munge/munge.key"
  chmod 600 "$DIR/munge/munge.key"
  write_config

  munged --socket="$MUNGE_SOCKET" --key-file="$DIR/munge/munge.key" --pid-file="$DIR/run/munged.pid" \
    --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed" \
    || { show_logs; die "munged did not start"; }
  slurmctld -f "$CONF" || { show_logs; die "slurmctld did not start"; }
  slurmd -f "$CONF" || { show_logs; die "slurmd did not start"; }
  wait_for_node
  cancel_jobs  # jobs recovered from the state of a cluster that was not stopped cleanly
  echo "slurm_local: running in $DIR (partition debug, node $(hostname -s), $(nproc) CPUs)"
  echo "export SLURM_CONF=$CONF"
}

# TERM, then KILL after 10 s, to exactly the pids recorded in our pid files
stop_daemons() {
  local quiet="${1:-}" name pid i
  for name in slurmd slurmctld munged; do
    if pid="$(live_pid "$DIR/run/$name.pid" "$name")"; then
      kill -TERM "$pid" 2>/dev/null || true
      for i in $(seq 1 50); do
        [[ -d "/proc/$pid" ]] || break
        sleep 0.2
      done
      [[ -d "/proc/$pid" ]] && kill -KILL "$pid" 2>/dev/null || true
      [[ -n "$quiet" ]] || echo "slurm_local: stopped $name ($pid)"
    fi
    rm -f "$DIR/run/$name.pid"
  done
}

# every job of this cluster (squeue and scancel reach our slurmctld through SLURM_CONF)
cancel_jobs() {
  local jobs i
  jobs="$(squeue -h -o '%i' 2>/dev/null || true)"
  [[ -n "$jobs" ]] || return 0
  # shellcheck disable=SC2086
  scancel $jobs 2>/dev/null || true
  for i in $(seq 1 30); do
    [[ -z "$(squeue -h -o '%i' 2>/dev/null || true)" ]] && return 0
    sleep 1
  done
}

stop() {
  if live_pid "$DIR/run/slurmctld.pid" slurmctld >/dev/null; then
    cancel_jobs
  fi
  stop_daemons
}

status() {
  if is_running; then
    echo "slurm_local: running in $DIR"
    echo "export SLURM_CONF=$CONF"
    sinfo
  else
    echo "slurm_local: not running (looked in $DIR)"
    return 1
  fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *)
    echo "usage: $0 start|stop|status   (state in \$LINNAEUS_SLURM_DIR, default /tmp/linnaeus-slurm)" >&2
    exit 2
    ;;
esac
