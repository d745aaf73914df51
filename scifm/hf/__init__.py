"""Hugging Face interop: scifm's decoder as a transformers Qwen3-MoE or GLM-4.5-MoE model, both ways."""
