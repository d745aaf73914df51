"""Model and optimizer tensors saved by every rank as sharded safetensors (torch.distributed.checkpoint).

Each rank writes the shards it holds, under full-model names, through DCP's safetensors storage:
no rank ever gathers the whole model, and loading reads safetensors headers and tensors only
(plain DCP would unpickle a metadata file). Loading fills the current layout's shards from
whatever layout saved them, so a run saved under fsdp=4 resumes under tp=2, pp=2 or one process.
Optimizer param groups (hyper-parameters, no tensors) travel in train_state.pt instead.

A module's extra state (torch's get_extra_state: Transformer Engine's FP8 scales and amax histories)
is not a weight: it is per rank (each rank's amaxes come from its own rows), sized by what it
pickles, and means nothing to a model without that module. So the weights leave it out, and each
rank writes its own to extra_state/rank{R}.pt, which a resume in the same layout reads back.
"""

from __future__ import annotations

import contextlib
import pickle
import sys
import warnings
from concurrent.futures import Future
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.state_dict import (
    _init_optim_state,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from scifm.core.errors import CheckpointError, first_line

MODEL_DIR = "model"
OPTIMIZER_DIR = "optimizer"
EXTRA_STATE_DIR = "extra_state"
EXTRA_STATE_SUFFIX = "._extra_state"  # torch's state-dict key for a module's get_extra_state()


def _flat_optimizer_tensors(optim_state: dict) -> dict[str, torch.Tensor]:
    # one flat key per tensor: safetensors stores named tensors, not nested dicts
    return {f"{fqn}::{name}": t for fqn, state in optim_state["state"].items() for name, t in state.items()}


@contextlib.contextmanager
def _quiet_single_process():
    # DCP warns that it "assumes" a single process when no process group exists: that is the intent
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def plain(t: torch.Tensor) -> torch.Tensor:
    """`t` without a tensor subclass that wraps one plain tensor (torchao's weights that FSDP
    all-gathers in float8 hold their high-precision values so), as a view of the same memory, inside
    a DTensor too: checkpoints hold plain tensors, and loading into the view fills the parameter."""
    if isinstance(t, DTensor):
        inner = plain(t._local_tensor)
        return t if inner is t._local_tensor else DTensor.from_local(
            inner, t.device_mesh, t.placements, run_check=False, shape=t.shape, stride=t.stride())
    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        if len(names) == 1:
            return plain(getattr(t, names[0]))
    return t


def _plain_values(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: plain(t) for name, t in state.items()}


def tied_aliases(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """{name: the earlier name holding the same tensor}: tied weights (model.tie_embeddings) are one
    tensor under two names, which safetensors refuses to write twice; the first name is the one saved."""
    first: dict[tuple, str] = {}
    aliases = {}
    for name, t in state.items():
        local = t._local_tensor if isinstance(t, DTensor) else t
        if local.numel() == 0:
            continue
        key = (local.untyped_storage().data_ptr(), local.storage_offset(), tuple(local.shape))
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
    return aliases


def extra_states(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The modules' extra states in a model state dict (none unless a module keeps one)."""
    return {name: t for name, t in state.items() if name.endswith(EXTRA_STATE_SUFFIX)}


def _weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t for name, t in state.items() if not name.endswith(EXTRA_STATE_SUFFIX)}


def saved_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A model state as a checkpoint's weights hold it: tied aliases and extra states left out."""
    weights = _weights(state)
    aliases = tied_aliases(weights)
    return {name: t for name, t in weights.items() if name not in aliases}


def _rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _extra_state_file(directory: Path, rank: int) -> Path:
    return directory / EXTRA_STATE_DIR / f"rank{rank}.pt"


def async_save_groups(distributed: bool) -> dict[str, dist.ProcessGroup | None]:
    """Collective: one gloo group per directory that save_sharded writes in the background. Each
    async save runs its collectives on its own thread; two saves sharing a group interleave them in
    a different order on different ranks and deadlock (measured with pipeline stages)."""
    return {sub: dist.new_group(backend="gloo") if distributed else None for sub in (MODEL_DIR, OPTIMIZER_DIR)}


def save_sharded(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, distributed: bool,
                 async_groups: dict[str, dist.ProcessGroup | None] | None = None,
                 states: tuple[dict, dict, list] | None = None) -> tuple[list, list[Future]]:
    """Collective: every rank calls it, with the model's parameters sharded (the runner reshards
    after forward-only passes). Returns the optimizer param groups (for train_state.pt) and, with
    `async_groups` (from async_save_groups), the futures of the writes: the tensors are copied to
    CPU memory before this returns (training may change them at once), and written by background
    threads whose collectives run on those groups, never interleaved with training's."""
    if states is None:
        optim_state = get_optimizer_state_dict(model, optimizer)
        full_state = _plain_values(get_model_state_dict(model))
        extras = extra_states(full_state)
        if extras:  # small, and already on the CPU (Transformer Engine copies its state there)
            path = _extra_state_file(directory, _rank_and_world()[0])
            path.parent.mkdir(exist_ok=True)
            torch.save(extras, path)
        states = (saved_names(full_state), _plain_values(_flat_optimizer_tensors(optim_state)),
                  optim_state["param_groups"])
    model_state, optim_flat, param_groups = states
    futures = []
    with _quiet_single_process():
        for state, sub in ((model_state, MODEL_DIR), (optim_flat, OPTIMIZER_DIR)):
            writer = HuggingFaceStorageWriter(str(directory / sub), save_distributed=distributed)
            if async_groups is not None:
                futures.append(dcp.async_save(state, storage_writer=writer, process_group=async_groups[sub],
                                              no_dist=not distributed))
            else:
                dcp.save(state, storage_writer=writer)
    return param_groups, futures


def saved_shapes(directory: Path) -> dict[str, torch.Size]:
    """Full-model names and shapes of the saved weights, read from the safetensors headers."""
    try:
        metadata = HuggingFaceStorageReader(str(directory / MODEL_DIR)).read_metadata()
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"{directory}: cannot read the model weights ({err})") from None
    return {fqn: meta.size for fqn, meta in metadata.state_dict_metadata.items()}


def read_full_tensors(directory: Path, sub: str, names: list[str]) -> dict[str, torch.Tensor]:
    """Collective (every rank the same `names`): the whole saved tensors, on every rank, for
    engines that scatter them into their own partitions. `sub`: MODEL_DIR or OPTIMIZER_DIR."""
    reader = HuggingFaceStorageReader(str(directory / sub))
    saved = reader.read_metadata().state_dict_metadata
    state = {n: torch.empty(saved[n].size, dtype=saved[n].properties.dtype) for n in names}
    with _quiet_single_process():
        dcp.load(state, storage_reader=HuggingFaceStorageReader(str(directory / sub)))
    return state


def load_model_weights(directory: Path, model: torch.nn.Module) -> None:
    """Collective (or one process): fills this rank's shards of the model weights, and its modules'
    extra states where it has such modules (a te run's resume; eval and export build models without)."""
    model_state = _plain_values(get_model_state_dict(model))
    saved = saved_names(model_state)
    aliases = tied_aliases(_weights(model_state))
    with _quiet_single_process():
        dcp.load(saved, storage_reader=HuggingFaceStorageReader(str(directory / MODEL_DIR)))
    extras = extra_states(model_state)
    if extras:
        extras = _saved_extra_states(directory, extras)  # or its own, which loading back changes nothing in
    set_model_state_dict(model, saved | {alias: saved[name] for alias, name in aliases.items()} | extras)


def _saved_extra_states(directory: Path, current: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This rank's saved extra states, if the checkpoint was written by the same layout (the same
    ranks, each holding the same modules); else `current`, and rank 0 says that the FP8 scaling
    state starts anew (a layout change moves FP8 roundings anyway)."""
    rank, world = _rank_and_world()
    files = sorted((directory / EXTRA_STATE_DIR).glob("rank*.pt"))
    path = _extra_state_file(directory, rank)
    saved = {}
    if len(files) == world and path.is_file():
        try:
            saved = torch.load(path, weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
            raise CheckpointError(f"{path}: unreadable ({first_line(err)}); the checkpoint is damaged") from None
        if not isinstance(saved, dict):
            raise CheckpointError(f"{path}: not a dict of module extra states; the checkpoint is damaged")
    if saved.keys() == current.keys():
        return saved
    if rank == 0:
        why = "has none" if not files else f"was written by {len(files)} ranks holding other modules"
        print(f"warning: {directory}: the checkpoint {why} of this run's module extra state (FP8 scales and "
              "amax histories): it starts anew, so the steps after resume are not bit-exact", file=sys.stderr,
              flush=True)
    return current


def load_sharded(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 hyperparameters: list[dict]) -> None:
    """Collective: fills this rank's shards of the model and of the optimizer state; the param
    groups' `hyperparameters` (optim.saved_hyperparameters) replace the current ones."""
    load_model_weights(directory, model)
    _init_optim_state(optimizer)  # AdamW creates its state lazily; loading needs the tensors to fill
    optim_state = get_optimizer_state_dict(model, optimizer)
    flat = _plain_values(_flat_optimizer_tensors(optim_state))
    with _quiet_single_process():
        dcp.load(flat, storage_reader=HuggingFaceStorageReader(str(directory / OPTIMIZER_DIR)))
    for key, t in flat.items():
        fqn, name = key.split("::")
        optim_state["state"][fqn][name] = t
    # hyper-parameters from the checkpoint, parameter lists from this rank's (pipeline) stages
    optim_state["param_groups"] = [current | saved for current, saved in zip(optim_state["param_groups"], hyperparameters)]
    set_optimizer_state_dict(model, optimizer, optim_state)
