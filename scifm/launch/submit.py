"""`scifm submit [--dry-run] [--eval-after] [-m] KEY=VALUE ...`: the config that runs locally,
as a Slurm job. The scripts are written to RUN/slurm/ (for a sweep, SWEEP_DIR/slurm/) and the
job ids recorded in jobs.json there, which `scifm jobs` reads."""

from __future__ import annotations

import argparse
from pathlib import Path

from scifm.launch.plan import make_plan
from scifm.launch.render import eval_script, train_script
from scifm.launch.slurm import record_job, require_command, sbatch


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scifm submit", description="submit training (and evaluation) to Slurm")
    parser.add_argument("--dry-run", action="store_true", help="render and print the scripts; submit nothing")
    parser.add_argument("--eval-after", action="store_true",
                        help="queue an eval array over the run's checkpoints, after the training succeeds")
    parser.add_argument("--eval-override", action="append", default=[], metavar="KEY=VALUE",
                        help="an override for the eval jobs (repeatable), e.g. eval.max_items=200")
    parser.add_argument("-m", "--multirun", action="store_true",
                        help="a Hydra sweep (a=1,2 b=x,y): one array task per point")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for scifm train")
    return parser.parse_intermixed_args(argv)


def eval_dependency(train_id: str) -> list[str]:
    """sbatch options of the eval array: it starts once the training job succeeded, and Slurm
    cancels it once the training job failed or was cancelled (else it stays pending for ever)."""
    return [f"--dependency=afterok:{train_id}", "--kill-on-invalid-dep=yes"]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def submit_main(argv: list[str]) -> None:
    args = parse_args(argv)
    if not args.dry_run:
        require_command("sbatch")
    plan = make_plan(args.overrides, args.multirun)
    slurm_dir = plan.root / "slurm"
    scripts = [("train", write(slurm_dir / "train.sbatch", train_script(plan)))]
    if args.eval_after:
        scripts.append(("eval", write(slurm_dir / "eval.sbatch", eval_script(plan, args.eval_override))))
    c = plan.cluster
    shape = f"{c.nodes} node(s) x {c.tasks_per_node} task(s)" + (f", {c.gpus_per_node} GPU(s) per node"
                                                                 if c.gpus_per_node else "")
    if args.dry_run:
        for kind, script in scripts:
            print(f"# ---- {script} ----\n{script.read_text()}")
        then = (f"; the eval array would be queued with {' '.join(eval_dependency('<training job>'))}"
                if args.eval_after else "")
        print(f"# dry run: {len(plan.points)} run(s) of {shape}; nothing submitted{then}")
        return
    train_id = sbatch(scripts[0][1])
    record_job(plan.root, train_id, "train", scripts[0][1])
    logs = slurm_dir / (f"train-{train_id}_<task>.out" if plan.multirun else f"train-{train_id}.out")
    print(f"submitted training job {train_id} ({len(plan.points)} run(s) of {shape}); "
          f"run directory {plan.root}; log {logs}")
    if args.eval_after:
        eval_id = sbatch(scripts[1][1], *eval_dependency(train_id))
        record_job(plan.root, eval_id, "eval", scripts[1][1])
        print(f"submitted eval array {eval_id} after job {train_id}; reports in RUN/eval/step_N/; "
              f"logs {slurm_dir / f'eval-{eval_id}_<task>.out'}")
    print(f"status: scifm jobs {plan.root}")
