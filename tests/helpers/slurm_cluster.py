"""A real Slurm on this machine for the slurm tests: slurmctld and two slurmd (node1, node2) on
127.0.0.1, Debian's slurm-wlm and munge, installed with apt-get when missing.

Everything it writes lives in one directory (slurm.conf, state, per-node spool, logs) except
/run/munge, which munged insists on. It stops exactly the daemons it started, by PID; a munged
that was already running is used and left alone.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

CTLD_PORT = 6817
NODES = {"node1": 6818, "node2": 6819}
MUNGE_SOCKET = Path("/run/munge/munge.socket.2")


class Unavailable(Exception):
    """Slurm cannot run here; the message is the tests' skip reason."""


def install() -> None:
    """apt-get install slurm-wlm and munge when their daemons are missing."""
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    if os.geteuid() != 0:
        raise Unavailable("slurm-wlm is not installed and installing it needs root")
    if not shutil.which("apt-get"):
        raise Unavailable("slurm-wlm is not installed and there is no apt-get to install it")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", "slurm-wlm", "munge"]
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise Unavailable(f"apt-get install slurm-wlm munge failed: {proc.stderr.strip()[-300:]}")


def slurm_conf(root: Path, host: str) -> str:
    nodes = "\n".join(
        f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs=2 State=UNKNOWN"
        for name, port in NODES.items()
    )
    return f"""\
ClusterName=scifmtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={CTLD_PORT}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# a requeued job may start again once its credential expired: seconds, not the default 120
AuthInfo=cred_expire=10
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/builtin
# try pending jobs every 2 s (default 60): a requeued job starts as soon as it is eligible
SchedulerParameters=sched_interval=2
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MailProg=/bin/true
ReturnToService=2
KillWait=10
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
{nodes}
PartitionName=debug Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class SlurmCluster:
    root: Path
    env: dict[str, str] = field(default_factory=dict)  # SLURM_CONF for every Slurm command
    procs: list[subprocess.Popen] = field(default_factory=list)

    def start(self) -> None:
        install()
        if os.geteuid() != 0:
            raise Unavailable("the local Slurm runs its daemons and jobs as root")
        for d in ("state", *(f"spool/{n}" for n in NODES)):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        conf = self.root / "slurm.conf"
        conf.write_text(slurm_conf(self.root, socket.gethostname()))
        self.env = dict(os.environ, SLURM_CONF=str(conf))
        self._start_munge()
        self._spawn(["slurmctld", "-D", "-f", str(conf)], "slurmctld.out")
        for name in NODES:
            self._spawn(["slurmd", "-D", "-N", name, "-f", str(conf)], f"slurmd-{name}.out")
        self._wait_idle()

    def _start_munge(self) -> None:
        if MUNGE_SOCKET.exists() and subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
            return  # a munged is already serving
        run = MUNGE_SOCKET.parent
        run.mkdir(parents=True, exist_ok=True)
        shutil.chown(run, "munge", "munge")
        if not Path("/etc/munge/munge.key").exists():
            subprocess.run(["runuser", "-u", "munge", "--", "mungekey", "--create"], check=True)
        self._spawn(["munged", "-F", "--force"], "munged.out", user="munge")
        self._wait(lambda: subprocess.run(["munge", "-n"], capture_output=True).returncode == 0, "munged", 20)

    def _spawn(self, cmd: list[str], log: str, user: str | None = None) -> None:
        with open(self.root / log, "w") as out:
            self.procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env, user=user,
                                               group=user, start_new_session=True))

    def _wait(self, ready, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    raise Unavailable(f"{p.args[0]} exited with {p.returncode}: {self.logs()}")
            if ready():
                return
            time.sleep(0.3)
        raise Unavailable(f"{what} did not come up within {timeout:.0f} s: {self.logs()}")

    def _wait_idle(self) -> None:
        def idle() -> bool:
            out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout.split()
            return out.count("idle") == len(NODES)
        self._wait(idle, "two idle slurmd nodes", 60)

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr}")
        return proc

    def logs(self) -> str:
        logs = sorted(p for p in self.root.glob("*.out") if p.stat().st_size)
        return " | ".join(f"{p.name}: {p.read_text()[-600:]}" for p in logs)

    def stop(self) -> None:
        """Cancels the jobs left in this cluster, then SIGTERM to each daemon this fixture started
        (slurmd first, munged last) and SIGKILL to any that does not exit."""
        if self.procs and self.env:
            left = self.run("squeue", "-h", "-o", "%A", check=False).stdout.split()
            for job in set(left):
                self.run("scancel", job, check=False)
            deadline = time.monotonic() + 30
            while left and time.monotonic() < deadline and self.run("squeue", "-h", check=False).stdout.strip():
                time.sleep(0.5)
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self.procs.clear()

    def wait_gone(self, job_id: str, timeout: float = 240) -> None:
        """Until `squeue` no longer lists the job (all array tasks), polling every 0.5 s."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.run("squeue", "-h", "-j", job_id, "-o", "%i", check=False).stdout.strip():
                return
            time.sleep(0.5)
        raise AssertionError(f"job {job_id} still queued after {timeout} s: {self.job(job_id)}")

    def job(self, job_id: str) -> list[dict[str, str]]:
        """`scontrol show job` as key/value dicts, one per job (array task)."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return [dict(kv.split("=", 1) for kv in line.split() if "=" in kv) for line in out.splitlines() if line]
