"""One training process of a Slurm job: `srun python -m scifm.launch.train_task RUN_DIR OVERRIDE...`.

torch.distributed's env:// variables come from SLURM_* (MASTER_ADDR/PORT from the batch script);
a run directory that already holds a checkpoint means the job was requeued, so it resumes
from the latest one. Then `scifm train` runs in this process, with the overrides as given.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

from scifm.launch.plan import hydra_quote
from scifm.core.checkpoint_files import latest_checkpoint


def torch_env(slurm: Mapping[str, str]) -> dict[str, str]:
    """Every task sees all GPUs of its node (the job asks --gpus-per-node, not per task), so the
    trainer's cuda.set_device(LOCAL_RANK) gives each its own."""
    return {"RANK": slurm["SLURM_PROCID"], "WORLD_SIZE": slurm["SLURM_NTASKS"], "LOCAL_RANK": slurm["SLURM_LOCALID"]}


def main(argv: list[str]) -> None:
    run_dir, overrides = Path(argv[0]), argv[1:]
    os.environ.update(torch_env(os.environ))
    extra = [f"hydra.run.dir={hydra_quote(str(run_dir))}"]
    latest = latest_checkpoint(run_dir / "checkpoints")
    if latest is not None:
        extra.append("resume=latest")
    if os.environ["RANK"] == "0":
        restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
        print(f"scifm: SLURM_RESTART_COUNT={restarts}; "
              + (f"resuming from {latest}" if latest else "starting from scratch"), flush=True)
    from scifm.train.entry import hydra_train

    sys.argv = ["scifm train", *overrides, *extra]  # Hydra reads its overrides from sys.argv
    hydra_train()


if __name__ == "__main__":
    main(sys.argv[1:])
