"""The modality encoders' typed config (model.encoders.*): read by the data featurizers, which
size their inputs from it, and by the model's encoders, which are built from it."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from scifm.core.checks import require


@dataclass
class EncoderConfig:
    """One modality encoder: a small transformer (or message-passing net) of its own width."""

    width: int = 64
    layers: int = 2  # 0 = none: the resampler reads the (normed) input embeddings
    heads: int = 4
    slots: int = 8  # k embedding slots this modality fills in the decoder sequence
    max_len: int = 256  # longest input (residues, LaTeX tokens, table cells, patches, atoms)

    def validate(self, prefix: str) -> None:
        """`prefix`: this encoder's key path, e.g. model.encoders.latex."""
        for key in ("width", "heads", "slots", "max_len"):
            require(getattr(self, key) >= 1, f"{prefix}.{key}", f"must be >= 1, got {getattr(self, key)}")
        require(self.layers >= 0, f"{prefix}.layers", f"must be >= 0, got {self.layers}")
        require(self.width % self.heads == 0, f"{prefix}.width",
                f"width={self.width} is not divisible by heads={self.heads}")


@dataclass
class FigureEncoderConfig(EncoderConfig):
    patch_size: int = 8
    max_side: int = 64  # images are resized so the longer side is at most this many pixels, aspect kept
    # whether a smaller image is enlarged to max_side; off, it keeps its size in whole patches: enlarging
    # gives the encoder more patches and the data path more pixels to make, and no information
    upscale: bool = False

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        require(self.patch_size >= 1, f"{prefix}.patch_size", f"must be >= 1, got {self.patch_size}")
        # below one patch the image would be silently enlarged to a single patch
        require(self.max_side >= self.patch_size, f"{prefix}.max_side",
                f"must be >= patch_size={self.patch_size}, got {self.max_side}")


@dataclass
class EncodersConfig:
    latex: EncoderConfig = field(default_factory=EncoderConfig)
    molecule: EncoderConfig = field(default_factory=EncoderConfig)
    protein: EncoderConfig = field(default_factory=EncoderConfig)
    table: EncoderConfig = field(default_factory=EncoderConfig)
    figure: FigureEncoderConfig = field(default_factory=FigureEncoderConfig)

    def validate(self, prefix: str = "model.encoders") -> None:
        for f in fields(self):
            getattr(self, f.name).validate(f"{prefix}.{f.name}")
