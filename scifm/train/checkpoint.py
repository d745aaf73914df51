"""Checkpoints: everything a run needs to continue exactly, written atomically.

checkpoints/step_N/
  model/              weights as sharded safetensors, written by every rank (sharded_state.py)
  optimizer/          optimizer tensors, the same way
  train_state.pt      optimizer param groups, scheduler, RNG, trainer counters (weights_only=True)
  loader.json         data-loader state: mixture RNG, stream cursors, partly emitted document
  tokenizer/          the tokenizer the model was trained with
  config.yaml         the resolved run configuration
  skipped.json        skipped documents per source and reason
  meta.json           written last; a directory without it is incomplete and never loaded
The directory is assembled under a temporary name and renamed into place, so a run killed
while saving leaves the previous checkpoint as the latest complete one.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch

from scifm.core.checkpoint_files import META_FILE, latest_checkpoint, require_complete
from scifm.core.errors import CheckpointError
from scifm.parallel.distributed import DistContext
from scifm.train.sharded_state import save_sharded, saved_shapes

def save_checkpoint(
    root: Path,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    ctx: DistContext,
    train_state: dict,
    loader_state: dict,
    tokenizer,
    config_yaml: str,
    skipped: dict,
) -> None:
    """Collective: every rank writes its shards; rank 0 the rest, then renames the directory."""
    final = root / f"step_{step}"
    tmp = root / f".step_{step}.tmp"
    if ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    ctx.barrier()
    param_groups = save_sharded(tmp, model, optimizer, ctx.distributed)
    ctx.barrier()
    if ctx.is_main:
        torch.save(train_state | {"optimizer_param_groups": param_groups}, tmp / "train_state.pt")
        (tmp / "loader.json").write_text(json.dumps(loader_state))
        tokenizer.save(tmp / "tokenizer")
        (tmp / "config.yaml").write_text(config_yaml)
        (tmp / "skipped.json").write_text(json.dumps(skipped, indent=2) + "\n")
        (tmp / META_FILE).write_text(json.dumps({"step": step, "saved_at": time.time()}) + "\n")
        if final.exists():  # re-saving a step (e.g. the final one) replaces it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
    ctx.barrier()


def resolve_checkpoint(spec: str, run_dir: Path) -> Path:
    """`spec` is "latest" (newest complete checkpoint of run_dir) or a checkpoint directory."""
    if spec == "latest":
        found = latest_checkpoint(run_dir / "checkpoints")
        if found is None:
            raise CheckpointError(
                f"resume=latest: no complete checkpoint under {run_dir / 'checkpoints'}; "
                "pass the same hydra.run.dir as the run to resume, or drop resume"
            )
        return found
    return require_complete(Path(spec), f"resume={spec}")


def check_compatible(ckpt: Path, expected: dict[str, torch.Size]) -> None:
    """One line naming what differs when a checkpoint belongs to another model config."""
    saved = saved_shapes(ckpt)
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{ckpt}: checkpoint belongs to another model config "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    for name, shape in expected.items():
        if tuple(saved[name]) != tuple(shape):
            raise CheckpointError(
                f"{ckpt}: checkpoint belongs to another model config ({name} has shape "
                f"{tuple(saved[name])}, this model {tuple(shape)})"
            )


def load_train_state(ckpt: Path) -> tuple[dict, dict]:
    """(train_state, loader_state); the train state holds tensors and plain containers only."""
    state = torch.load(ckpt / "train_state.pt", weights_only=True)
    loader_state = json.loads((ckpt / "loader.json").read_text())
    return state, loader_state
