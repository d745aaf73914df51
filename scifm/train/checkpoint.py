"""Checkpoints: everything a run needs to continue exactly, written atomically.

checkpoints/step_N/
  model/              weights as sharded safetensors, written by every rank (sharded_state.py)
  optimizer/          optimizer tensors, the same way
  train_state.pt      optimizer param groups, scheduler, RNG, trainer counters (weights_only=True)
  loader.json         data-loader state: mixture RNG, stream cursors, partly emitted document
  tokenizer/          the tokenizer the model was trained with
  config.yaml         the resolved run configuration
  skipped.json        skipped documents per source and reason
  extra_state/        each rank's module extra state, where a module keeps one (sharded_state.py)
  meta.json           written last: step, time, and every other file with its size; a directory
                      whose meta.json or any listed file is missing or short is never loaded
The directory is assembled under a temporary name and renamed into place, so a run killed
while saving leaves the previous checkpoint as the latest complete one. Every file is checked
before any of it is used (scifm.core.checkpoint_files, load_train_state).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.checkpoint.api import CheckpointException

from scifm.core.checkpoint_files import (
    META_FILE,
    complete_checkpoints,
    file_sizes,
    in_use,
    latest_checkpoint,
    require_complete,
    step_of,
)
from scifm.core.errors import CheckpointError, first_line
from scifm.parallel.distributed import DistContext
from scifm.tokenizers import ScientificTokenizer
from scifm.train.sharded_state import save_sharded, saved_shapes

TRAIN_STATE_FILE = "train_state.pt"
LOADER_FILE = "loader.json"
TOKENIZER_DIR = "tokenizer"


@dataclass
class PendingCheckpoint:
    """A checkpoint whose shards may still be in flight: complete, and named step_N, once finished."""

    root: Path
    step: int
    tmp: Path
    ctx: DistContext
    futures: list[Future]

    @property
    def final(self) -> Path:
        return self.root / f"step_{self.step}"

    def finish(self) -> None:
        """Collective: waits for this rank's shard writes; then rank 0 writes meta.json (the list of
        every file and its size) and renames the directory into place. A step saved again replaces
        the old directory only once the new one is whole: the old one is first renamed out of the
        step_N name, so a kill at any point leaves a complete step_N or none."""
        try:
            for future in self.futures:
                future.result()
            self.ctx.barrier()
            if self.ctx.is_main:
                meta = {"step": self.step, "saved_at": time.time(), "files": file_sizes(self.tmp)}
                (self.tmp / META_FILE).write_text(json.dumps(meta) + "\n")
                _replace_dir(self.tmp, self.final)
        except (OSError, CheckpointException) as err:
            self.fail(err)
        self.ctx.barrier()

    def fail(self, err: BaseException) -> None:
        """A full disk, a quota, a file-size limit: the latest complete checkpoint stays as it was."""
        shutil.rmtree(self.tmp, ignore_errors=True)
        raise CheckpointError(f"{self.final}: could not be written ({_io_error(err)}); the latest complete "
                              f"checkpoint is still {latest_checkpoint(self.root)}") from None


def start_checkpoint(
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
    async_groups: dict[str, torch.distributed.ProcessGroup | None] | None = None,
    states: tuple[dict, dict, list] | None = None,
) -> PendingCheckpoint:
    """Collective: every rank starts writing its shards (in the background with `async_groups`,
    after copying them to CPU memory) into .step_N.tmp; rank 0 writes the other files at once."""
    tmp = root / f".step_{step}.tmp"
    if ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    ctx.barrier()
    pending = PendingCheckpoint(root, step, tmp, ctx, [])
    try:
        param_groups, pending.futures = save_sharded(tmp, model, optimizer, ctx.distributed, async_groups, states)
        if ctx.is_main:
            torch.save(train_state | {"optimizer_param_groups": param_groups}, tmp / TRAIN_STATE_FILE)
            (tmp / LOADER_FILE).write_text(json.dumps(loader_state))
            tokenizer.save(tmp / TOKENIZER_DIR)
            (tmp / "config.yaml").write_text(config_yaml)
            (tmp / "skipped.json").write_text(json.dumps(skipped, indent=2) + "\n")
    except (OSError, CheckpointException) as err:
        pending.fail(err)
    return pending


def prune_checkpoints(root: Path, keep_last: int, keep_every: int, protect: Path | None) -> list[Path]:
    """Deletes the complete checkpoints older than the newest `keep_last` (0 keeps all), except every
    step that is a multiple of `keep_every`, `protect` (the one the run resumed from) and any that an
    evaluation is reading (scifm.core.checkpoint_files.marked_in_use). Returns the deleted ones."""
    if keep_last <= 0:
        return []
    deleted = []
    for ckpt in complete_checkpoints(root)[:-keep_last]:
        keep = (keep_every and step_of(ckpt) % keep_every == 0) or in_use(ckpt) or \
            (protect is not None and ckpt.resolve() == protect.resolve())
        if not keep:
            # out of the step_N name first: a kill while deleting leaves nothing resume could pick
            doomed = ckpt.with_name(f".{ckpt.name}.deleting")
            os.replace(ckpt, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
            deleted.append(ckpt)
    return deleted


def _replace_dir(new: Path, final: Path) -> None:
    old = final.with_name(f".{final.name}.old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(new, final)
    shutil.rmtree(old, ignore_errors=True)


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
    return require_complete(Path(spec))


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


# what train_state.pt must hold, and the type of each
TRAIN_STATE_TYPES = {"scheduler": dict, "torch_rng": torch.Tensor, "step": int, "tokens_seen": int,
                     "unigram_counts": torch.Tensor, "optimizer_param_groups": list}


def load_train_state(ckpt: Path) -> tuple[dict, dict]:
    """(train_state, loader_state), each checked before any of it is used; a damaged or foreign
    file is one CheckpointError naming it. The train state is read with weights_only: tensors and
    plain containers, never code."""
    path = ckpt / TRAIN_STATE_FILE
    try:
        state = torch.load(path, weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{path}: holds objects other than tensors and plain containers, which a scifm "
                              "train state never does; it was not loaded (do not load it by other means)") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable ({first_line(err)}); the checkpoint is damaged") from None
    wrong = [k for k, t in TRAIN_STATE_TYPES.items() if not isinstance(state, dict) or not isinstance(state.get(k), t)]
    if wrong:
        raise CheckpointError(f"{path}: {', '.join(wrong)} missing or of the wrong type; the checkpoint is damaged")
    path = ckpt / LOADER_FILE
    try:
        loader_state = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err}); the checkpoint is damaged") from None
    if not isinstance(loader_state, dict):
        raise CheckpointError(f"{path}: not a data-loader state; the checkpoint is damaged")
    return state, loader_state


def load_tokenizer(ckpt: Path) -> ScientificTokenizer:
    """The checkpoint's tokenizer; a damaged one is one CheckpointError naming it."""
    try:
        return ScientificTokenizer.load(ckpt / TOKENIZER_DIR)
    except Exception as err:  # the tokenizers library raises bare Exceptions for damaged files
        raise CheckpointError(f"{ckpt / TOKENIZER_DIR}: unreadable ({first_line(err)}); the checkpoint is "
                              "damaged") from None


def _io_error(err: BaseException) -> str:
    """The OSError behind a failed save; DCP wraps each rank's in a CheckpointException."""
    if isinstance(err, CheckpointException):
        err = next((f[0] if isinstance(f, tuple) else f for f in err.failures.values()), err)
    return first_line(err)

