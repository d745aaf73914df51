"""A checkpoint of any layout as one model in one process, and its export to one safetensors file."""

from __future__ import annotations

from pathlib import Path

import safetensors.torch
from omegaconf import OmegaConf

from scifm.config import RunConfig
from scifm.core.checkpoint_files import require_complete
from scifm.model.multimodal import ScientificMoE, vocab_sizes_of
from scifm.tokenizers import ScientificTokenizer
from scifm.train.checkpoint import check_compatible
from scifm.train.sharded_state import load_model_weights


def load_checkpoint_model(ckpt: Path) -> tuple[ScientificMoE, ScientificTokenizer, RunConfig]:
    """The whole model (unsharded, on the CPU) with the weights of `ckpt`, whatever layout saved it."""
    require_complete(ckpt, str(ckpt))
    cfg: RunConfig = OmegaConf.to_object(
        OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.load(ckpt / "config.yaml"))
    )
    tokenizer = ScientificTokenizer.load(ckpt / "tokenizer")
    model = ScientificMoE(cfg.model, vocab_sizes_of(tokenizer))
    check_compatible(ckpt, {k: v.shape for k, v in model.state_dict().items()})
    load_model_weights(ckpt, model)
    return model.eval(), tokenizer, cfg


def export_checkpoint(ckpt: Path, out: Path) -> Path:
    """Consolidates the sharded weights into the single-file safetensors format."""
    model, _, _ = load_checkpoint_model(ckpt)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    safetensors.torch.save_model(model, str(tmp))
    tmp.replace(out)
    return out
