#!/usr/bin/env bash
# Start a one-machine Slurm (controller + compute node on localhost) to try
# `mmbalance grid GRID --launcher slurm` and to run tests/test_slurm_real.py.
#
# Debian/Ubuntu: apt-get install -y slurmctld slurmd slurm-client munge
# Run as root (it starts munged, slurmctld and slurmd in the background). It
# writes a minimal slurm.conf for this host into $SLURM_CONF_DIR (default
# /etc/slurm) unless one is already there; pass --force to overwrite it (running
# daemons then reread it). SLURM_ENFORCE_PART_LIMITS=NO makes an oversized job pend
# (reason PartitionConfig) instead of being refused.
# Stop everything with:  benchmarks/slurm/start-single-node.sh --stop
set -euo pipefail

CONF_DIR=${SLURM_CONF_DIR:-/etc/slurm}
STATE=${SLURM_STATE_DIR:-/var/spool/slurm}
LOGS=${SLURM_LOG_DIR:-/var/log/slurm}

if [[ "${1:-}" == "--stop" ]]; then
  for d in slurmd slurmctld munged; do
    pidfile=$(case $d in munged) echo /run/munge/munged.pid;; *) echo /run/$d.pid;; esac)
    [[ -f $pidfile ]] && kill "$(cat "$pidfile")" 2>/dev/null && echo "stopped $d"
  done
  exit 0
fi

host=$(hostname -s)
cpus=$(nproc)
# memory Slurm may hand out: what slurmd measures, less 1 GB for the system
mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
mem=$(( mem > 2048 ? mem - 1024 : mem ))

mkdir -p "$CONF_DIR" "$STATE/ctld" "$STATE/d" "$LOGS" /run/munge /var/lib/munge /var/log/munge
if [[ ! -f $CONF_DIR/slurm.conf || "${1:-}" == "--force" ]]; then
  cat > "$CONF_DIR/slurm.conf" <<CONF
# single-node Slurm written by mmbalance benchmarks/slurm/start-single-node.sh
ClusterName=mmbalance-local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
MpiDefault=none
# ALL: a job asking more than the partition allows is refused at submission;
# NO: it is queued and pends forever with reason PartitionConfig (grid --status says so)
EnforcePartLimits=${SLURM_ENFORCE_PART_LIMITS:-ALL}
# scancel / scontrol requeue: SIGTERM, then SIGKILL after KillWait seconds
KillWait=30
JobRequeue=1
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
# a job that names no --mem gets this much per CPU (not the whole node)
DefMemPerCPU=1024
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
  echo "wrote $CONF_DIR/slurm.conf ($cpus CPUs, $mem MB on $host)"
  pgrep -x slurmctld >/dev/null && scontrol reconfigure
fi

# munge: one key shared by every daemon (made once)
[[ -s /etc/munge/munge.key ]] || (command -v mungekey >/dev/null && mungekey -c -k /etc/munge/munge.key) \
  || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
chmod 0400 /etc/munge/munge.key
pgrep -x munged >/dev/null || su -s /bin/sh munge -c "munged" 2>/dev/null || munged --force
sleep 1
pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd
for _ in $(seq 30); do
  if sinfo -h -o %T 2>/dev/null | grep -q idle; then
    sinfo
    exit 0
  fi
  sleep 1
done
scontrol update nodename="$host" state=resume 2>/dev/null || true
sinfo
echo "slurmd did not report idle; see $LOGS/slurmctld.log and $LOGS/slurmd.log" >&2
exit 1
