"""A transformers model directory: config.json and safetensors shards with their index.

Writing streams shard by shard: tensors are renamed and split (experts) for one shard at a time,
so beside the model itself at most one shard's converted copies exist. Reading copies tensor by
tensor from memory-mapped files into the model's parameters.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from scifm.core.errors import ConfigError
from scifm.core.progress import Progress
from scifm.hf.weight_names import from_hf, hf_names, is_decoder, to_hf

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def read_hf_config(hf_dir: Path) -> dict:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise ConfigError(f"model.init_from: {path} not found; point to a transformers model directory "
                          "(save_pretrained writes config.json)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"model.init_from: {path} is not JSON ({err})") from None


def decoder_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters and persistent buffers a transformers decoder holds, by scifm name."""
    state = model.state_dict()
    if model.cfg.tie_embeddings:
        state.pop("output.weight")  # transformers ties lm_head to embed_tokens itself
    return {name: t for name, t in state.items() if is_decoder(name)}


def _export_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    # the routing bias stays fp32, as transformers keeps it: rounding it would change expert choices
    return torch.float32 if name.endswith("expert_bias") else dtype


def plan_shards(tensors: dict[str, torch.Tensor], max_shard_bytes: int, dtype: torch.dtype) -> list[list[str]]:
    """scifm names grouped into shards of at most max_shard_bytes (a bigger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * torch.finfo(_export_dtype(name, dtype)).bits // 8
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def write_weights(tensors: dict[str, torch.Tensor], arch: str, out: Path, max_shard_bytes: int,
                  dtype: torch.dtype) -> int:
    """Writes model-0000i-of-0000n.safetensors and the index into `out`; returns the total bytes."""
    shards = plan_shards(tensors, max_shard_bytes, dtype)
    weight_map: dict[str, str] = {}
    total = 0
    progress = Progress("export", len(tensors), "tensors")
    for i, names in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        part = {}
        for name in names:
            for hf_name, t in to_hf(name, tensors[name].detach(), arch):
                part[hf_name] = t.to(_export_dtype(name, dtype)).contiguous()
                weight_map[hf_name] = file
                total += part[hf_name].numel() * part[hf_name].element_size()
        save_file(part, str(out / file), metadata={"format": "pt"})
        del part  # one shard's converted copies at a time
        progress(len(names))  # counted once written: writing is most of a shard's time
    progress.finish()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX).write_text(json.dumps(index, indent=1), encoding="utf-8")
    return total


def _tensor_files(hf_dir: Path) -> dict[str, Path]:
    if (hf_dir / INDEX).is_file():
        weight_map = json.loads((hf_dir / INDEX).read_text(encoding="utf-8"))["weight_map"]
        return {name: hf_dir / file for name, file in weight_map.items()}
    if (hf_dir / SINGLE).is_file():
        with safe_open(str(hf_dir / SINGLE), "pt") as f:
            return {name: hf_dir / SINGLE for name in f.keys()}
    raise ConfigError(f"model.init_from: {hf_dir} has neither {INDEX} nor {SINGLE}; only safetensors "
                      "checkpoints are read (never pickled .bin files)")


def _shape(path: Path, name: str) -> list[int]:
    with safe_open(str(path), "pt") as f:
        return f.get_slice(name).get_shape()


@torch.no_grad()
def load_weights(model: nn.Module, hf_dir: Path, arch: str) -> dict[str, int]:
    """Copies the checkpoint into the model's decoder. Embedding and output rows past the checkpoint's
    vocabulary (scifm's special and domain tokens) keep their fresh values. Returns counts:
    copied tensors, and skipped ones (multi-token prediction layers, which scifm does not train)."""
    files = _tensor_files(hf_dir)
    handles: dict[Path, object] = {}

    def read(hf_name: str) -> torch.Tensor:
        if hf_name not in files:
            raise ConfigError(f"model.init_from: {hf_dir} lacks tensor {hf_name}")
        path = files[hf_name]
        if path not in handles:
            handles[path] = safe_open(str(path), "pt")
        return handles[path].get_tensor(hf_name)

    used: set[str] = set()
    targets = decoder_tensors(model)
    for name, param in targets.items():
        names = hf_names(name, param.shape, arch)
        if not names:
            continue  # kept at its initial value (Qwen3-MoE has no expert bias: zero)
        value = from_hf(name, param.shape, arch, read)
        used.update(names)
        rows_fit = value.shape[0] <= param.shape[0] and value.shape[1:] == param.shape[1:]
        if name in ("tok_embeddings.weight", "output.weight") and rows_fit:
            param[: value.shape[0]].copy_(value)  # pretrained rows; scifm's own tokens follow
        elif value.shape != param.shape:
            raise ConfigError(f"model.init_from: {hf_dir} tensor for {name} has shape {tuple(value.shape)}, "
                              f"the model needs {tuple(param.shape)}")
        else:
            param.copy_(value)
    n_layers = model.cfg.n_layers
    extra = sorted(set(files) - used)
    mtp = [n for n in extra if n.startswith("model.layers.") and int(n.split(".")[2]) >= n_layers]
    # GLM-4.5 with n_shared_experts=0 still saves its shared expert, with zero-width matrices
    unknown = [n for n in extra if n not in mtp and 0 not in _shape(files[n], n)]
    if unknown:
        raise ConfigError(f"model.init_from: {hf_dir} has {len(unknown)} tensors scifm's decoder lacks, "
                          f"e.g. {unknown[0]}")
    return {"copied": len(used), "skipped_mtp": len(mtp)}
