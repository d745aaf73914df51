"""Checkpoints: everything a run needs to continue exactly, written atomically.

checkpoints/step_N/
  model.safetensors   weights (safetensors: loading never runs pickled code)
  train_state.pt      optimizer, scheduler, RNG and trainer counters (loaded with weights_only=True)
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
import re
import shutil
import time
from pathlib import Path

import safetensors.torch
import torch

from scifm.errors import CheckpointError

STEP_DIR = re.compile(r"^step_(\d+)$")


def save_checkpoint(
    root: Path,
    step: int,
    *,
    model_state: dict[str, torch.Tensor],
    train_state: dict,
    loader_state: dict,
    tokenizer,
    config_yaml: str,
    skipped: dict,
) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step}"
    tmp = root / f".step_{step}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    # full (unsharded) tensors under full-model names: any layout can load them
    safetensors.torch.save_file({k: v.contiguous() for k, v in model_state.items()}, str(tmp / "model.safetensors"))
    torch.save(train_state, tmp / "train_state.pt")
    (tmp / "loader.json").write_text(json.dumps(loader_state))
    tokenizer.save(tmp / "tokenizer")
    (tmp / "config.yaml").write_text(config_yaml)
    (tmp / "skipped.json").write_text(json.dumps(skipped, indent=2) + "\n")
    (tmp / "meta.json").write_text(json.dumps({"step": step, "saved_at": time.time()}) + "\n")
    if final.exists():  # re-saving a step (e.g. the final one) replaces it whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def latest_checkpoint(root: Path) -> Path | None:
    steps = [
        (int(m.group(1)), p)
        for p in root.glob("step_*")
        if (m := STEP_DIR.match(p.name)) and (p / "meta.json").is_file()
    ]
    return max(steps)[1] if steps else None


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
    path = Path(spec)
    if not (path / "meta.json").is_file():
        raise CheckpointError(f"resume={spec}: not a complete scifm checkpoint directory (no meta.json)")
    return path


def load_model_state(ckpt: Path) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load_file(str(ckpt / "model.safetensors"))
    except (OSError, safetensors.SafetensorError) as err:
        raise CheckpointError(f"{ckpt}: cannot read model.safetensors ({err})") from None


def check_compatible(state: dict[str, torch.Tensor], expected: dict[str, torch.Size], ckpt: Path) -> None:
    """One line naming what differs when a checkpoint belongs to another model config."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{ckpt}: checkpoint belongs to another model config "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    for name, shape in expected.items():
        if state[name].shape != shape:
            raise CheckpointError(
                f"{ckpt}: checkpoint belongs to another model config ({name} has shape "
                f"{tuple(state[name].shape)}, this model {tuple(shape)})"
            )


def load_train_state(ckpt: Path) -> tuple[dict, dict]:
    """(train_state, loader_state); the train state holds tensors and plain containers only."""
    state = torch.load(ckpt / "train_state.pt", weights_only=True)
    loader_state = json.loads((ckpt / "loader.json").read_text())
    return state, loader_state
