"""slurm/*.sbatch filled in from a Plan.

What the user typed reaches bash single-quoted (shlex.quote), so no value is ever expanded or
executed by a shell (cluster.python is a command: split into words as a shell would, then each
word quoted); values on #SBATCH lines, which sbatch reads itself, must be single words.
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


def sbatch_lines(options: list[tuple[str, str, object]], args_key: str, args: list[str]) -> str:
    """#SBATCH --OPTION=VALUE for each (config key, OPTION, VALUE) that is set ("" and 0 leave the
    site's default), then the config's own sbatch arguments as typed."""
    opts = [f"--{opt}={sbatch_word(key, str(value))}" for key, opt, value in options if value]
    opts += [sbatch_word(args_key, a) for a in args]
    return "\n".join(f"#SBATCH {o}" for o in opts)


def array_range(tasks: int, parallelism: int) -> str:
    """--array value: tasks 0..tasks-1, at most `parallelism` of them running at once (0: no limit)."""
    return f"0-{tasks - 1}" + (f"%{parallelism}" if parallelism else "")


def job_values(cluster: ClusterConfig, cpus_per_task: int) -> dict[str, object]:
    """What the training and eval scripts share: set-up, environment, srun options, interpreter."""
    # threads per task = its cores, as torchrun sets OMP_NUM_THREADS; cluster.env may override
    env = {"OMP_NUM_THREADS": str(cpus_per_task)} | cluster.env
    for name in env:
        if not ENV_NAME.match(name):
            raise ConfigError(f"cluster.env: {name!r} is not an environment variable name")
    srun = [f"--cpus-per-task={cpus_per_task}"]  # srun does not inherit it from sbatch (22.05+)
    if cluster.container_image:
        srun += [f"--container-image={cluster.container_image}", f"--container-workdir={Path.cwd()}"]
        if cluster.container_mounts:
            srun.append(f"--container-mounts={cluster.container_mounts}")
    return {
        "setup": "\n".join(cluster.setup) or "# (none)",
        "exports": "\n".join(f"export {k}={shlex.quote(v)}" for k, v in env.items()),
        "srun_args": bash_array(srun),
        "python": bash_array(cluster.python_words),
        "cpus_per_task": cpus_per_task,
    }


def job_name(plan: Plan, kind: str) -> str:
    return f"scifm-{kind}-" + re.sub(r"[^A-Za-z0-9._-]", "_", plan.root.name)


def train_script(plan: Plan) -> str:
    c = plan.cluster
    points = "\n".join(
        f"  {i})\n    RUN_DIR={shlex.quote(str(p.run_dir))}\n    OVERRIDES=({bash_array(p.overrides)})\n    ;;"
        for i, p in enumerate(plan.points)
    )
    array = array_range(len(plan.points), c.array_parallelism) if plan.multirun else ""
    return fill("train.sbatch", job_values(c, c.cpus_per_task) | {
        "job_name": job_name(plan, "train"),
        "nodes": c.nodes,
        "tasks_per_node": c.tasks_per_node,
        "time": sbatch_word("cluster.time", c.time),
        "log": log_pattern(plan.root, "train-%A_%a.out" if plan.multirun else "train-%j.out"),
        "signal_seconds": c.signal_seconds,
        "sbatch_lines": sbatch_lines([("cluster.array_parallelism", "array", array),
                                      ("cluster.partition", "partition", c.partition),
                                      ("cluster.account", "account", c.account),
                                      ("cluster.mem", "mem", c.mem),
                                      ("cluster.gpus_per_node", "gpus-per-node", c.gpus_per_node)],
                                     "cluster.sbatch_args", c.sbatch_args),
        "points": points,
        "requeue_exit_code": REQUEUE_EXIT_CODE,
        "max_restarts": c.max_restarts,
    })


def eval_script(plan: Plan, eval_overrides: list[str]) -> str:
    """One array task per checkpoint each run schedules (see slurm/eval.sbatch for the slots), with
    the resources of cluster.eval (unset ones: see EvalJobConfig)."""
    tasks = []
    for p in plan.points:
        stride = len(checkpoint_steps(p.cfg.trainer))
        tasks += [(p.run_dir, slot, stride) for slot in range(stride)]
    cases = "\n".join(f"  {i}) TASK=({shlex.quote(str(run))} {slot} {stride}) ;;"
                      for i, (run, slot, stride) in enumerate(tasks))
    c, e = plan.cluster, plan.cluster.eval
    gpus = int(c.gpus_per_node > 0) if e.gpus is None else e.gpus
    cpus = c.cpus_per_task if e.cpus_per_task is None else e.cpus_per_task
    partition = (("cluster.eval.partition", "partition", e.partition) if e.partition
                 else ("cluster.partition", "partition", c.partition))
    return fill("eval.sbatch", job_values(c, cpus) | {
        "job_name": job_name(plan, "eval"),
        "time": sbatch_word("cluster.eval.time", e.time),
        "log": log_pattern(plan.root, "eval-%A_%a.out"),
        "array": array_range(len(tasks), e.parallelism),
        "sbatch_lines": sbatch_lines([partition,
                                      ("cluster.account", "account", c.account),
                                      ("cluster.eval.mem", "mem", e.mem),
                                      ("cluster.eval.gpus", "gpus-per-node", gpus)],
                                     "cluster.eval.sbatch_args", e.sbatch_args),
        "tasks": cases,
        "eval_overrides": bash_array(eval_overrides),
    })
