"""`scifm jobs RUN_DIR ...`: the state of the jobs `scifm submit` recorded for a run (or sweep),
as slurmctld reports them (`scontrol show job`: pending, running, and finished ones until
MinJobAge expires)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from scifm.launch.slurm import recorded_jobs, show_jobs

COLUMNS = ("job", "kind", "state", "elapsed", "restarts", "nodes/reason", "log")
PENDING_TASKS = "4294967294"  # what scontrol writes for %a in the log path of a pending array


def first_task(job: dict[str, str]) -> int:
    """An array task's id; a pending array's record has a range such as [2-9%4]."""
    return int(re.match(r"\D*(\d+)", job.get("ArrayTaskId", "0")).group(1))


def exit_text(code: str) -> str:
    """scontrol's ExitCode STATUS:SIGNAL in words; "" for 0:0."""
    status, signal = code.split(":")
    return f"signal {signal}" if signal != "0" else f"exit code {status}" if status != "0" else ""


def why_cancelled(job: dict[str, str]) -> str:
    """An eval array Slurm cancelled (--kill-on-invalid-dep) because its training job did not succeed."""
    after = re.search(r"afterok:(\d+)", job.get("Dependency", ""))
    if after is None:
        return f"cancelled: its dependency ({job.get('Dependency')}) can never be satisfied"
    train_id = after.group(1)
    # a sweep's other tasks may still be running or pending
    failed = [t for t in show_jobs(train_id) or [] if t.get("JobState") not in ("COMPLETED", "RUNNING", "PENDING")]
    if not failed:  # slurmctld has forgotten the training job
        return f"cancelled: training job {train_id} did not succeed"
    t = min(failed, key=first_task)
    name = f"{train_id}_{t['ArrayTaskId']}" if t.get("ArrayTaskId") else train_id
    how = exit_text(t.get("ExitCode", "0:0"))
    return f"cancelled: training job {name} {t['JobState'].lower()}" + (f" ({how})" if how else "")


def where_or_why(job: dict[str, str]) -> str:
    """Nodes while running, the reason while pending; after the end, what ended it."""
    state = job.get("JobState")
    if state == "RUNNING":
        return job.get("NodeList", "-")
    if state == "PENDING":
        return job.get("Reason", "-")
    if job.get("Reason") == "DependencyNeverSatisfied":
        return why_cancelled(job)
    return exit_text(job.get("ExitCode", "0:0")) or "-"  # a finished job's Reason is stale


def log_of(job: dict[str, str]) -> str:
    """A pending job's log-to-be (a pending array's as the pattern ..._%a.out); after that, the log
    if the job wrote one (a job cancelled while pending never did)."""
    out = job.get("StdOut", "-")
    if job.get("JobState") == "PENDING":
        return re.sub(rf"_{PENDING_TASKS}(?=[^/]*$)", "_%a", out)
    return out if Path(out).is_file() else "-"


def job_rows(root: Path) -> list[tuple[str, ...]]:
    rows = []
    for rec in recorded_jobs(root):
        found = show_jobs(rec["job_id"])
        if found is None:
            rows.append((rec["job_id"], rec["kind"], "FINISHED?", "-", "-", "no longer known to slurmctld", "-"))
            continue
        for job in sorted(found, key=first_task):
            task = job.get("ArrayTaskId")
            name = f"{job['ArrayJobId']}_{task}" if task else job["JobId"]
            # only a job that started has a BatchHost; for one cancelled while pending, scontrol's
            # RunTime is 0 or counted from 1970
            elapsed = job.get("RunTime", "-") if job.get("BatchHost") else "-"
            rows.append((name, rec["kind"], job.get("JobState", "?"), elapsed, job.get("Restarts", "0"),
                         where_or_why(job), log_of(job)))
    return rows


def jobs_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="scifm jobs", description="state of the Slurm jobs of runs")
    parser.add_argument("run_dirs", nargs="+", type=Path, help="run or sweep directories scifm submit wrote")
    args = parser.parse_args(argv)
    rows = [COLUMNS] + [row for root in args.run_dirs for row in job_rows(root)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS) - 1)]
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)) + "  " + row[-1])
