"""slurm/*.sbatch filled in from a Plan.

What the user typed reaches bash single-quoted (shlex.quote), so no value is ever expanded or
executed by a shell; values on #SBATCH lines, which sbatch reads itself, must be single words.
cluster.setup is the exception by design: it is shell code (module load, activate a venv).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from scifm.config import ClusterConfig
from scifm.core.errors import ConfigError
from scifm.launch.plan import Plan, checkpoint_steps
from scifm.train.preemption import REQUEUE_EXIT_CODE

TEMPLATES = Path(__file__).parent / "slurm"
PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def fill(template: str, values: dict[str, object]) -> str:
    """One pass: text that a value brings in is never scanned for placeholders."""
    return PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), (TEMPLATES / template).read_text())


def sbatch_word(key: str, value: str) -> str:
    if not value or re.search(r"\s", value):
        raise ConfigError(f"{key}: {value!r} cannot go on an #SBATCH line (empty or has whitespace)")
    return value


def log_pattern(root: Path, pattern: str) -> str:
    """--output value ROOT/slurm/PATTERN: '%' in ROOT is literal ('%%'), in PATTERN sbatch's (%j)."""
    return sbatch_word("run directory", str(root / "slurm")).replace("%", "%%") + "/" + pattern


def bash_array(words: list[str]) -> str:
    return " ".join(shlex.quote(w) for w in words)


def sbatch_lines(cluster: ClusterConfig, gpus_per_node: int, array: str = "") -> str:
    opts = [f"--array={array}"] if array else []
    for key in ("partition", "account", "mem"):
        if getattr(cluster, key):
            opts.append(f"--{key}={sbatch_word(f'cluster.{key}', getattr(cluster, key))}")
    if gpus_per_node:
        opts.append(f"--gpus-per-node={gpus_per_node}")
    opts += [sbatch_word("cluster.sbatch_args", a) for a in cluster.sbatch_args]
    return "\n".join(f"#SBATCH {o}" for o in opts)


def job_values(cluster: ClusterConfig) -> dict[str, object]:
    """What the training and eval scripts share: set-up, environment, srun options, time limit."""
    # threads per task = its cores, as torchrun sets OMP_NUM_THREADS; cluster.env may override
    env = {"OMP_NUM_THREADS": str(cluster.cpus_per_task)} | cluster.env
    for name in env:
        if not ENV_NAME.match(name):
            raise ConfigError(f"cluster.env: {name!r} is not an environment variable name")
    srun = [f"--cpus-per-task={cluster.cpus_per_task}"]  # srun does not inherit it from sbatch (22.05+)
    if cluster.container_image:
        srun += [f"--container-image={cluster.container_image}", f"--container-workdir={Path.cwd()}"]
        if cluster.container_mounts:
            srun.append(f"--container-mounts={cluster.container_mounts}")
    return {
        "setup": "\n".join(cluster.setup) or "# (none)",
        "exports": "\n".join(f"export {k}={shlex.quote(v)}" for k, v in env.items()),
        "srun_args": bash_array(srun),
        "python": shlex.quote(cluster.python),
        "cpus_per_task": cluster.cpus_per_task,
        "time": sbatch_word("cluster.time", cluster.time),
    }


def job_name(plan: Plan, kind: str) -> str:
    return f"scifm-{kind}-" + re.sub(r"[^A-Za-z0-9._-]", "_", plan.root.name)


def train_script(plan: Plan) -> str:
    c = plan.cluster
    points = "\n".join(
        f"  {i})\n    RUN_DIR={shlex.quote(str(p.run_dir))}\n    OVERRIDES=({bash_array(p.overrides)})\n    ;;"
        for i, p in enumerate(plan.points)
    )
    return fill("train.sbatch", job_values(c) | {
        "job_name": job_name(plan, "train"),
        "nodes": c.nodes,
        "tasks_per_node": c.tasks_per_node,
        "log": log_pattern(plan.root, "train-%A_%a.out" if plan.multirun else "train-%j.out"),
        "signal_seconds": c.signal_seconds,
        "sbatch_lines": sbatch_lines(c, c.gpus_per_node, f"0-{len(plan.points) - 1}" if plan.multirun else ""),
        "points": points,
        "requeue_exit_code": REQUEUE_EXIT_CODE,
        "max_restarts": c.max_restarts,
    })


def eval_script(plan: Plan, eval_overrides: list[str]) -> str:
    """One array task per checkpoint each run schedules (see slurm/eval.sbatch for the slots)."""
    tasks = []
    for p in plan.points:
        stride = len(checkpoint_steps(p.cfg.trainer))
        tasks += [(p.run_dir, slot, stride) for slot in range(stride)]
    cases = "\n".join(f"  {i}) TASK=({shlex.quote(str(run))} {slot} {stride}) ;;"
                      for i, (run, slot, stride) in enumerate(tasks))
    c = plan.cluster
    return fill("eval.sbatch", job_values(c) | {
        "job_name": job_name(plan, "eval"),
        "log": log_pattern(plan.root, "eval-%A_%a.out"),
        "last_task": len(tasks) - 1,
        "sbatch_lines": sbatch_lines(c, min(c.gpus_per_node, 1)),
        "tasks": cases,
        "eval_overrides": bash_array(eval_overrides),
    })
