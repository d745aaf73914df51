"""Typed FP8 settings (trainer.fp8.*): which backend, which scaling recipe, which layers."""

from __future__ import annotations

from dataclasses import dataclass, field

from scifm.core.checks import require

TE_RECIPES = ("delayed", "current", "blockwise", "mxfp8")
TORCHAO_RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")
DEFAULT_RECIPE = {"te": "delayed", "torchao": "tensorwise"}


@dataclass
class Fp8Config:
    """Read only when trainer.precision=fp8."""

    backend: str = "auto"  # te (Transformer Engine, CUDA) | torchao | auto (te where it imports on a GPU, else torchao)
    recipe: str = ""  # "" = the backend's default: te delayed, torchao tensorwise
    # fnmatch patterns over module names (as in model.named_modules()); a layer is FP8 when it
    # matches an include and no exclude. Linear layers and the routed experts are the candidates.
    include: list[str] = field(default_factory=lambda: ["*"])
    # router (its top-k choice is sensitive), output head, the figure encoder's pixel input layer;
    # embeddings and norms are not matmuls and always stay high precision
    exclude: list[str] = field(default_factory=lambda: ["*router.gate", "output", "encoders.figure.patch_embed"])

    def validate(self) -> None:
        require(self.backend in ("auto", "te", "torchao"), "trainer.fp8.backend",
                f"must be auto, te or torchao, got {self.backend!r}")
        known = {"te": TE_RECIPES, "torchao": TORCHAO_RECIPES}
        every = TE_RECIPES + TORCHAO_RECIPES
        require(self.recipe in ("",) + every, "trainer.fp8.recipe",
                f"must be one of {', '.join(every)} (or empty for the backend's default), got {self.recipe!r}")
        if self.backend != "auto" and self.recipe:
            other = "torchao" if self.backend == "te" else "te"
            require(self.recipe in known[self.backend], "trainer.fp8.recipe",
                    f"{self.recipe} is a {other} recipe, but trainer.fp8.backend={self.backend}; use one of "
                    f"{', '.join(known[self.backend])}, or trainer.fp8.backend={other}")
