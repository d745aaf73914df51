"""Model and optimizer tensors saved by every rank as sharded safetensors (torch.distributed.checkpoint).

Each rank writes the shards it holds, under full-model names, through DCP's safetensors storage:
no rank ever gathers the whole model, and loading reads safetensors headers and tensors only
(plain DCP would unpickle a metadata file). Loading fills the current layout's shards from
whatever layout saved them, so a run saved under fsdp=4 resumes under tp=2, pp=2 or one process.
Optimizer param groups (hyper-parameters, no tensors) travel in train_state.pt instead.
"""

from __future__ import annotations

import contextlib
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

from scifm.core.errors import CheckpointError

MODEL_DIR = "model"
OPTIMIZER_DIR = "optimizer"


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


def saved_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A model state as a checkpoint holds it: tied aliases left out."""
    aliases = tied_aliases(state)
    return {name: t for name, t in state.items() if name not in aliases}


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
        states = (saved_names(_plain_values(get_model_state_dict(model))),
                  _plain_values(_flat_optimizer_tensors(optim_state)), optim_state["param_groups"])
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
    """Collective (or one process): fills this rank's shards of the model weights."""
    model_state = _plain_values(get_model_state_dict(model))
    aliases = tied_aliases(model_state)
    saved = {name: t for name, t in model_state.items() if name not in aliases}
    with _quiet_single_process():
        dcp.load(saved, storage_reader=HuggingFaceStorageReader(str(directory / MODEL_DIR)))
    set_model_state_dict(model, saved | {alias: saved[name] for alias, name in aliases.items()})


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
