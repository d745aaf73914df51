"""Slurm's commands (sbatch, scontrol) and the record of a run's jobs (RUN/slurm/jobs.json)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from scifm.core.errors import ScifmError


class SlurmError(ScifmError):
    """Slurm is missing here, or one of its commands failed."""


def require_command(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise SlurmError(f"{name} not found on PATH: run this on a Slurm login node "
                         f"(scifm submit --dry-run renders the script without Slurm)")
    return path


def _run(cmd: list[str]) -> str:
    proc = subprocess.run([require_command(cmd[0]), *cmd[1:]], capture_output=True, text=True)
    if proc.returncode != 0:
        message = " ".join(proc.stderr.split()) or f"exit code {proc.returncode}"
        raise SlurmError(f"{cmd[0]} failed: {message}")
    return proc.stdout


def sbatch(script: Path, *options: str) -> str:
    """Submits and returns the job id (`--parsable` prints `id` or `id;cluster`)."""
    return _run(["sbatch", "--parsable", *options, str(script)]).strip().split(";")[0]


def show_jobs(job_id: str) -> list[dict[str, str]] | None:
    """`scontrol show job` fields, one dict per job (array task); None once slurmctld has forgotten it."""
    proc = subprocess.run([require_command("scontrol"), "show", "job", "-o", job_id], capture_output=True, text=True)
    if proc.returncode != 0:
        if "Invalid job id" in proc.stderr:
            return None
        raise SlurmError(f"scontrol show job {job_id} failed: {' '.join(proc.stderr.split())}")
    return [dict(f.split("=", 1) for f in line.split() if "=" in f) for line in proc.stdout.splitlines() if line]


def jobs_file(root: Path) -> Path:
    return root / "slurm" / "jobs.json"


def record_job(root: Path, job_id: str, kind: str, script: Path) -> None:
    path = jobs_file(root)
    jobs = json.loads(path.read_text()) if path.exists() else []
    jobs.append({"job_id": job_id, "kind": kind, "script": str(script)})
    path.write_text(json.dumps(jobs, indent=2) + "\n")


def recorded_jobs(root: Path) -> list[dict]:
    path = jobs_file(root)
    if not path.exists():
        raise SlurmError(f"{root}: no {path.relative_to(root)}; give a directory that scifm submit wrote")
    return json.loads(path.read_text())
