"""A checkpoint of any layout as one model in one process, and its export to one safetensors file."""

from __future__ import annotations

from pathlib import Path

import safetensors.torch
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from scifm.config import RunConfig
from scifm.core.checkpoint_files import require_complete
from scifm.core.errors import CheckpointError
from scifm.model.multimodal import ScientificMoE, vocab_sizes_of
from scifm.tokenizers import ScientificTokenizer
from scifm.train.checkpoint import check_compatible, load_tokenizer
from scifm.train.sharded_state import load_model_weights


def saved_run_config(ckpt: Path) -> RunConfig:
    path = ckpt / "config.yaml"
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.load(path)))
    except (yaml.YAMLError, OmegaConfBaseException, UnicodeDecodeError) as err:
        detail = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"{path}: not a scifm run configuration ({detail}); the checkpoint is damaged") from None


def load_checkpoint_model(ckpt: Path) -> tuple[ScientificMoE, ScientificTokenizer, RunConfig]:
    """The whole model (unsharded, on the CPU) with the weights of `ckpt`, whatever layout saved it."""
    require_complete(ckpt)
    cfg = saved_run_config(ckpt)
    tokenizer = load_tokenizer(ckpt)
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
