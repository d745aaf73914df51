"""scifm: training stack for scientific multimodal mixture-of-experts foundation models."""

__version__ = "0.1.0"
