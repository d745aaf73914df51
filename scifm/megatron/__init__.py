"""Megatron-Core interop: scifm's decoder as a Megatron GPTModel (local layer spec), config and weights
both ways. megatron-core is imported inside the functions that need it, so scifm imports without it."""
