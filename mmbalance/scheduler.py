"""What the scheduler says about submitted cells: job states, pending reasons, refusals.

A grid's cells run as Slurm jobs (or as submitit local jobs); the records folder knows only
what a cell has written so far. Before a cell is submitted again, and for ``grid --status``,
the scheduler is asked whether the job recorded for it is still queued or running:

- Slurm: ``squeue`` for live and recently ended jobs (state and pending reason), then
  ``sacct`` for older ones where accounting is enabled (TIMEOUT, OUT_OF_MEMORY, ...). Their
  output is read with submitit's own parser of Slurm job ids (arrays like ``12_[0-3%4]``).
- submitit's local executor: the job id is the pid of its controller process, alive or not.

When sbatch refuses a submission, :func:`refusal_message` turns its error text into one
sentence naming the resource, what was asked and the node's limit (read with ``sinfo``).
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmbalance.errors import MMBalanceError

#: Slurm states of a job that has not ended (it may still run the cell)
ACTIVE = frozenset({"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING",
                    "COMPLETING", "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "PREEMPTED"})
GONE = "GONE"  # the scheduler no longer knows the job (finished and purged, or never existed)

#: pending reasons a user can act on, and what to do
REASONS = {
    "PartitionConfig": "it asks more than the partition allows, so it can never start; scancel it and "
                       "resubmit with fewer resources (--cpus-per-task, --mem-gb, --gpus-per-task)",
    "PartitionTimeLimit": "its time limit exceeds the partition's, so it can never start; scancel it and "
                          "resubmit with a smaller --time-min",
    "PartitionNodeLimit": "it asks more nodes than the partition allows; scancel it and resubmit",
    "ReqNodeNotAvail": "the nodes it needs are down or reserved",
    "Resources": "waiting for free resources",
    "Priority": "waiting for higher-priority jobs",
    "Dependency": "waiting for another job",
    "JobHeldUser": "held by its user (scontrol release)",
    "JobHeldAdmin": "held by an administrator",
    "BeginTime": "waiting for its begin time (a requeued job waits a little before it restarts)",
}


@dataclass(frozen=True)
class JobState:
    state: str  # a Slurm state (PENDING, RUNNING, TIMEOUT, ...), RUNNING/FINISHED locally, or GONE
    reason: str = ""  # Slurm's pending reason ("None" dropped)

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    def describe(self) -> str:
        """'PENDING, reason PartitionConfig: it asks more than ...' or 'RUNNING'."""
        if not self.reason:
            return self.state
        why = REASONS.get(self.reason)
        return f"{self.state}, reason {self.reason}" + (f": {why}" if why else "")


class SchedulerError(MMBalanceError):
    """The scheduler could not be asked (its commands fail): submitting again could duplicate."""


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except FileNotFoundError as exc:
        raise SchedulerError(f"'{cmd[0]}' is not on PATH, so Slurm cannot be asked about the jobs "
                             f"submitted before. Run this on a machine of the cluster.") from exc
    except subprocess.TimeoutExpired as exc:
        raise SchedulerError(f"'{' '.join(cmd[:2])} ...' did not answer in 60 s; is the Slurm controller up?") from exc


def _parse(header: str, text: str) -> dict[str, dict[str, str]]:
    """Rows keyed by job id ('12_3'), arrays expanded, through submitit's parser."""
    from submitit.slurm.slurm import SlurmInfoWatcher

    return SlurmInfoWatcher().read_info(header + "\n" + text)


def slurm_states(job_ids: Iterable[str]) -> dict[str, JobState]:
    """States of Slurm jobs ('12' or array tasks '12_3'): squeue for live ones, sacct for ended
    ones (when accounting is on); a job neither knows is GONE. Raises SchedulerError when
    squeue itself fails (the controller is down): nothing can be said then."""
    ids = sorted(set(job_ids))
    if not ids:
        return {}
    mains = sorted({i.split("_")[0] for i in ids})
    # -t all: a job that ended minutes ago (MinJobAge) still shows, with its final state
    out = _run(["squeue", "-h", "--array", "-t", "all", "-j", ",".join(mains), "-o", "%i|%T|%r"])
    if out.returncode != 0 and "Invalid job id" not in out.stderr:
        raise SchedulerError(f"squeue failed: {out.stderr.strip() or out.stdout.strip()}. Is the Slurm "
                             f"controller up (sinfo)?")
    info = _parse("JobID|State|Reason", out.stdout if out.returncode == 0 else "")
    missing = [i for i in ids if i not in info]
    if missing:
        acct = _run(["sacct", "-n", "-P", "-X", "-j", ",".join(sorted({i.split("_")[0] for i in missing})),
                     "-o", "JobID,State,Reason"])
        if acct.returncode == 0:  # no accounting (a small cluster): the records tell the rest
            ended = _parse("JobID|State|Reason", acct.stdout)
            info.update({i: ended[i] for i in missing if i in ended})
    states = {}
    for i in ids:
        row = info.get(i)
        if row is None:
            states[i] = JobState(GONE)
            continue
        state = (row.get("State") or "UNKNOWN").split()[0].upper()  # "CANCELLED by 0" -> CANCELLED
        reason = row.get("Reason", "")
        states[i] = JobState(state, "" if reason in ("None", "(null)") else reason)
    return states


def local_states(job_ids: Iterable[str]) -> dict[str, JobState]:
    """submitit local jobs: RUNNING while the controller process (the job id is its pid) lives."""
    states = {}
    for i in set(job_ids):
        try:
            cmdline = Path(f"/proc/{int(i)}/cmdline").read_bytes()
        except (OSError, ValueError):
            states[i] = JobState(GONE)
            continue
        states[i] = JobState("RUNNING" if b"submitit.local._local" in cmdline else GONE)
    return states


def job_states(launcher: str, job_ids: Iterable[str]) -> dict[str, JobState]:
    return slurm_states(job_ids) if launcher == "slurm" else local_states(job_ids)


# ---- refusals ---------------------------------------------------------------------------------
def node_limits(partition: str | None) -> dict[str, Any]:
    """The largest node of ``partition`` (default: the default partition), from sinfo: CPUs,
    memory (MB), GPUs, and the partition's time limit. Empty where sinfo cannot tell."""
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%P|%c|%m|%G|%l"], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return {}
    rows = [line.split("|") for line in out.stdout.splitlines() if line.count("|") == 4]
    if not rows:
        return {}
    default = next((r[0].rstrip("*") for r in rows if r[0].endswith("*")), rows[0][0].rstrip("*"))
    name = partition or default
    mine = [r for r in rows if r[0].rstrip("*") == name]
    if not mine:
        return {"partition": name, "partitions": sorted({r[0].rstrip("*") for r in rows})}

    def num(text: str) -> int:
        m = re.match(r"\d+", text)
        return int(m.group()) if m else 0

    gpus = [sum(num(g.split(":")[-1].split("(")[0]) for g in r[3].split(",") if g.startswith("gpu"))
            for r in mine]
    return {"partition": name, "cpus": max(num(r[1]) for r in mine), "mem_mb": max(num(r[2]) for r in mine),
            "gpus": max(gpus), "time": mine[0][4]}


def refusal_message(error: str, resources: Mapping[str, Any]) -> str:
    """sbatch's refusal in one line: the resource, what was asked (and its option), the
    node's or partition's limit (from sinfo). ``resources``: the grid's Slurm resources."""
    text = " ".join(line.strip() for line in error.splitlines() if line.strip())
    lowered = text.lower()
    limits = node_limits(resources.get("partition"))
    nodes = f"partition {limits['partition']}'s nodes" if limits.get("partition") else "the nodes"
    first = next((line.split("error:", 1)[1].strip() for line in error.splitlines() if "error:" in line), text)

    def refused(asked: str, option: str, limit: str) -> str:
        return f"sbatch refused: {asked} ({option}), but {limit}."

    cpus, mem = resources.get("cpus_per_task"), resources.get("mem_gb")
    too_many_cpus = bool(cpus and limits.get("cpus") and int(cpus) > limits["cpus"])
    too_much_mem = bool(mem and limits.get("mem_mb") and int(mem) * 1024 > limits["mem_mb"])
    generic = "node configuration" in lowered
    if "invalid partition" in lowered:
        known = limits.get("partitions") or []
        return (f"sbatch refused: no partition '{resources.get('partition')}' (--partition)"
                + (f"; there are {', '.join(known)}." if known else "."))
    if "processors" in lowered or "cpu count" in lowered or (generic and too_many_cpus and not too_much_mem):
        have = f"{nodes} have {limits['cpus']}" if limits.get("cpus") else "no node has that many"
        return refused(f"{cpus or 1} CPUs per task", "--cpus-per-task", have)
    if "memory" in lowered or (generic and too_much_mem):
        have = f"{nodes} have {limits['mem_mb'] / 1024:.0f} GB" if limits.get("mem_mb") else "no node has that much"
        return refused(f"{mem} GB memory per task", "--mem-gb", have)
    if "gres" in lowered or "generic resource" in lowered:
        return refused(f"{resources.get('gpus_per_task')} GPUs per task", "--gpus-per-task",
                       f"{nodes} have {limits.get('gpus', 0)}")
    if "time limit" in lowered or "--time" in lowered:
        part = f"partition {limits['partition']}" if limits.get("partition") else "the partition"
        return refused(f"{resources.get('time_min') or 24 * 60} min", "--time-min",
                       f"{part} allows {limits.get('time') or 'less'}")
    return f"sbatch refused: {first}."
