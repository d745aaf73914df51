"""One task of the eval array: `python -m scifm.launch.eval_task RUN_DIR SLOT STRIDE OVERRIDE...`
evaluates checkpoints SLOT, SLOT + STRIDE, ... of the run's complete checkpoints in
step order, listed now that training has finished (one of them unless pre-emption added some)."""

from __future__ import annotations

import sys
from pathlib import Path

from scifm.core.checkpoint_files import complete_checkpoints
from scifm.core.errors import ScifmError, exit_on_user_error
from scifm.eval.config import compose_eval_config
from scifm.eval.runner import run_eval
from scifm.launch.plan import hydra_quote
from scifm.launch.slurm import SlurmError


def main(argv: list[str]) -> None:
    run_dir, slot, stride, overrides = Path(argv[0]), int(argv[1]), int(argv[2]), argv[3:]
    found = complete_checkpoints(run_dir / "checkpoints")
    mine = found[slot::stride]
    if not mine:
        raise SlurmError(f"{run_dir}/checkpoints: no checkpoint number {slot} in step order "
                         f"(found {len(found)}, the config schedules {stride})")
    for ckpt in mine:
        print(f"scifm: evaluating {ckpt}", flush=True)
        run_eval(compose_eval_config([f"checkpoint={hydra_quote(str(ckpt))}", *overrides]))


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ScifmError as err:
        exit_on_user_error(err)
