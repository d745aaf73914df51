"""The modality encoders' typed config (model.encoders.*): read by the data featurizers, which
size their inputs from it, and by the model's encoders, which are built from it."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EncoderConfig:
    """One modality encoder: a small transformer (or message-passing net) of its own width."""

    width: int = 64
    layers: int = 2
    heads: int = 4
    slots: int = 8  # k embedding slots this modality fills in the decoder sequence
    max_len: int = 256  # longest input (residues, LaTeX tokens, table cells, patches, atoms)


@dataclass
class FigureEncoderConfig(EncoderConfig):
    patch_size: int = 8
    max_side: int = 64  # images are resized so the longer side is this many pixels, aspect kept


@dataclass
class EncodersConfig:
    latex: EncoderConfig = field(default_factory=EncoderConfig)
    molecule: EncoderConfig = field(default_factory=EncoderConfig)
    protein: EncoderConfig = field(default_factory=EncoderConfig)
    table: EncoderConfig = field(default_factory=EncoderConfig)
    figure: FigureEncoderConfig = field(default_factory=FigureEncoderConfig)
