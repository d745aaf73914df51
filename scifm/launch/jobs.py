"""`scifm jobs RUN_DIR ...`: the state of the jobs `scifm submit` recorded for a run (or sweep),
as slurmctld reports them (`scontrol show job`: pending, running, and finished ones until
MinJobAge expires)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from scifm.launch.slurm import recorded_jobs, show_jobs

COLUMNS = ("job", "kind", "state", "elapsed", "restarts", "nodes/reason", "log")


def first_task(job: dict[str, str]) -> int:
    """An array task's id; a pending array's record has a range such as [2-9%4]."""
    return int(re.match(r"\D*(\d+)", job.get("ArrayTaskId", "0")).group(1))


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
            where = job.get("NodeList") if job.get("JobState") == "RUNNING" else job.get("Reason", "")
            rows.append((name, rec["kind"], job.get("JobState", "?"), job.get("RunTime", "-"),
                         job.get("Restarts", "0"), where or "-", job.get("StdOut", "-")))
    return rows


def jobs_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="scifm jobs", description="state of the Slurm jobs of runs")
    parser.add_argument("run_dirs", nargs="+", type=Path, help="run or sweep directories scifm submit wrote")
    args = parser.parse_args(argv)
    rows = [COLUMNS] + [row for root in args.run_dirs for row in job_rows(root)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS) - 1)]
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)) + "  " + row[-1])
