"""`model.init_from=hf:DIR`: a run's decoder and prose tokenizer from a transformers checkpoint.

The checkpoint's config.json replaces the decoder keys of the model config before anything is
built, so the run's saved config describes the model it trains. The prose tokenizer keeps its ids
and the model's vocabulary; scifm's special tokens and domain vocabularies follow it with fresh
embedding rows. A directory that `scifm export hf` wrote also carries scifm's own part (`scifm/`:
tokenizer, encoder weights, run config), which is then taken as it is.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from tokenizers import Tokenizer
from torch import nn

from scifm.core.errors import ConfigError
from scifm.hf.architectures import model_config_from_hf
from scifm.hf.model_files import load_weights, read_hf_config
from scifm.hf.tokenizer_files import load_prose_tokenizer
from scifm.model.config import ModelConfig
from scifm.tokenizers import ScientificTokenizer

SCIFM_PART = "scifm"  # the subdirectory of an exported model with what transformers does not hold
ENCODERS_FILE = "encoders.safetensors"


def init_from_dir(cfg: ModelConfig) -> Path | None:
    if not cfg.init_from:
        return None
    path = Path(cfg.init_from.removeprefix("hf:")).expanduser()
    if not path.is_dir():
        raise ConfigError(f"model.init_from: {path} is not a directory (a local transformers model directory; "
                          "nothing is downloaded)")
    return path


def pretrained_model_config(cfg: ModelConfig) -> ModelConfig:
    """`cfg` with the decoder keys of its init_from checkpoint (unchanged without one)."""
    hf_dir = init_from_dir(cfg)
    if hf_dir is None:
        return cfg
    return model_config_from_hf(read_hf_config(hf_dir), cfg, f"model.init_from: {hf_dir}/config.json")


def exported_tokenizer(hf_dir: Path) -> ScientificTokenizer | None:
    """scifm's tokenizer saved beside an exported model, with its domain vocabularies; None if absent."""
    path = hf_dir / SCIFM_PART / "tokenizer"
    return ScientificTokenizer.load(path) if path.is_dir() else None


def pretrained_prose(hf_dir: Path) -> tuple[Tokenizer, int]:
    """(prose tokenizer, the model's vocabulary size) for ScientificTokenizer.train(pretrained=...)."""
    vocab = read_hf_config(hf_dir)["vocab_size"]
    return load_prose_tokenizer(hf_dir, vocab), vocab


@torch.no_grad()
def load_pretrained(model: nn.Module, hf_dir: Path) -> str:
    """Copies the checkpoint into `model` (built from pretrained_model_config); returns a log line."""
    arch = read_hf_config(hf_dir)["model_type"]
    counts = load_weights(model, hf_dir, arch)
    line = f"init_from: {hf_dir} ({arch}): {counts['copied']} tensors copied"
    if counts["skipped_mtp"]:
        line += f", {counts['skipped_mtp']} multi-token-prediction tensors skipped"
    return line + "; " + _load_encoders(model, hf_dir / SCIFM_PART / ENCODERS_FILE)


def _load_encoders(model: nn.Module, path: Path) -> str:
    if not path.is_file():
        return "encoders fresh"
    state = {k: v for k, v in model.state_dict().items() if k.startswith("encoders.")}
    with safe_open(str(path), "pt") as f:
        if set(f.keys()) != set(state) or any(f.get_slice(k).get_shape() != list(state[k].shape) for k in state):
            return f"encoders fresh ({path} holds encoders of another shape)"
        for name, param in state.items():
            param.copy_(f.get_tensor(name))
    return f"encoders from {path}"

