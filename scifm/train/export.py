"""A checkpoint of any layout as one model in one process, and its exports: one safetensors file of
scifm's own names, or a transformers model directory (Qwen3-MoE / GLM-4.5-MoE) with scifm's
encoders, tokenizer and config beside it."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import safetensors.torch
import torch
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from scifm.config import RunConfig
from scifm.core.checkpoint_files import require_complete
from scifm.core.errors import CheckpointError, ConfigError, first_line
from scifm.hf.architectures import GLM4_MOE, architecture_for, hf_config
from scifm.hf.model_files import decoder_tensors, write_weights
from scifm.hf.pretrained import ENCODERS_FILE, SCIFM_PART
from scifm.hf.tokenizer_files import write_hf_tokenizer
from scifm.model.multimodal import ScientificMoE, vocab_sizes_of
from scifm.tokenizers import ScientificTokenizer
from scifm.train.checkpoint import check_compatible, load_tokenizer
from scifm.train.sharded_state import load_model_weights, saved_names


def _permissions_from_umask(path: Path) -> None:
    """mkdtemp makes 0700 directories and safetensors writes 0600 files; an export is for others to
    read (a serving account, a shared directory), so it gets the modes the user's umask gives."""
    umask = os.umask(0)
    os.umask(umask)
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


def saved_run_config(ckpt: Path) -> RunConfig:
    path = ckpt / "config.yaml"
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.load(path)))
    except (yaml.YAMLError, OmegaConfBaseException, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not a scifm run configuration ({first_line(err)}); the checkpoint is damaged") from None


def load_checkpoint_model(ckpt: Path) -> tuple[ScientificMoE, ScientificTokenizer, RunConfig]:
    """The whole model (unsharded, on the CPU) with the weights of `ckpt`, whatever layout saved it."""
    require_complete(ckpt)
    cfg = saved_run_config(ckpt)
    tokenizer = load_tokenizer(ckpt)
    model = ScientificMoE(cfg.model, vocab_sizes_of(tokenizer))
    check_compatible(ckpt, {k: v.shape for k, v in saved_names(model.state_dict()).items()})
    load_model_weights(ckpt, model)
    return model.eval(), tokenizer, cfg


def export_checkpoint(ckpt: Path, out: Path) -> Path:
    """Consolidates the sharded weights into the single-file safetensors format."""
    model, _, _ = load_checkpoint_model(ckpt)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    safetensors.torch.save_model(model, str(tmp))
    _permissions_from_umask(tmp)
    tmp.replace(out)
    return out


def export_hf(ckpt: Path, out: Path, dtype: torch.dtype = torch.float32,
              max_shard_bytes: int = 5 * 2**30) -> tuple[str, list[str]]:
    """Writes `out` as a transformers model directory; returns (architecture, notes for the user).

    The directory is assembled under a temporary name beside `out` and renamed into place."""
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out: {out} exists and is not empty; remove it or choose another directory")
    architecture_for(saved_run_config(require_complete(ckpt)).model, False)  # refuse before loading weights
    model, tokenizer, cfg = load_checkpoint_model(ckpt)
    expert_bias_used = any(float(b.abs().max()) > 0 for n, b in model.named_buffers() if n.endswith("expert_bias"))
    arch = architecture_for(cfg.model, expert_bias_used)
    notes = []
    if (cfg.model.moe.router_dtype == "fp32") != (arch == GLM4_MOE):
        notes.append(f"the router ran in {cfg.model.moe.router_dtype} here; {arch} routes in "
                     f"{'fp32' if arch == GLM4_MOE else 'the activations dtype'} (the same in fp32)")
    vocab = model.tok_embeddings.num_embeddings
    ids = {"bos": tokenizer.bos_id, "eos": tokenizer.eos_id, "pad": tokenizer.pad_id}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        config = hf_config(cfg.model, arch, vocab, ids) | {"dtype": str(dtype).removeprefix("torch.")}
        (tmp / "config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
        # ids past the tokenizer's pad the matrices (never targets); scifm never generates them
        generation = {"bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["pad"],
                      "suppress_tokens": list(range(tokenizer.vocab_size, vocab))}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=1), encoding="utf-8")
        write_weights(decoder_tensors(model), arch, tmp, max_shard_bytes, dtype)
        write_hf_tokenizer(tokenizer, tmp, cfg.model.max_seq_len)
        part = tmp / SCIFM_PART
        part.mkdir()
        encoders = {k: v.contiguous() for k, v in model.state_dict().items() if k.startswith("encoders.")}
        safetensors.torch.save_file(encoders, str(part / ENCODERS_FILE))
        tokenizer.save(part / "tokenizer")
        shutil.copyfile(ckpt / "config.yaml", part / "config.yaml")
        _permissions_from_umask(tmp)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return arch, notes
