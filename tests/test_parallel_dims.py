"""Invalid layouts are rejected before any process group exists, each message naming the numbers."""

from __future__ import annotations

import pytest

from scifm.core.errors import ConfigError
from scifm.model.config import ModelConfig, MoEConfig
from scifm.parallel.dims import ParallelDims

TINY = ModelConfig(n_heads=4, n_kv_heads=2, ffn_hidden=384, n_layers=4, moe=MoEConfig(n_experts=8))
WIDE = ModelConfig(n_heads=16, n_kv_heads=16, d_model=256, ffn_hidden=512, n_layers=4, moe=MoEConfig(n_experts=8))


@pytest.mark.parametrize("model, dims, world, message", [
    (TINY, ParallelDims(dp_shard=2, tp=2), 2, r"pp=1 x dp_replicate=1 x dp_shard=2 x tp=2 = 4 processes, but the world has 2"),
    (TINY, ParallelDims(tp=4), 4, r"n_heads=4 and n_kv_heads=2 must both be divisible by tp=4"),
    (TINY, ParallelDims(dp_shard=3, ep=3), 3, r"n_experts=8 is not divisible by ep=3"),
    (WIDE, ParallelDims(dp_shard=4, tp=4, ep=2), 16, r"ep=2 borrows from dp_shard x tp, so it must be a multiple of tp=4"),
    (TINY, ParallelDims(dp_shard=2, tp=2, ep=8), 4, r"ep / tp must divide dp_shard=2"),
    (TINY, ParallelDims(pp=8), 8, r"pp=8 stages for only n_layers=4 layers"),
    (TINY, ParallelDims(dp_shard=0), 0, r"parallel\.dp_shard: must be >= 1, got 0"),
])
def test_bad_layouts_name_the_constraint(model, dims, world, message):
    with pytest.raises(ConfigError, match=message):
        dims.validate(model, world)


def test_vocabulary_padding_bounds_tp():
    wide = ModelConfig(n_heads=12, n_kv_heads=12, d_model=384, ffn_hidden=768, n_layers=4)
    with pytest.raises(ConfigError, match=r"tp=3 does not divide"):
        ParallelDims(tp=3).validate(wide, 3)


@pytest.mark.parametrize("dims", [
    ParallelDims(dp_shard=4), ParallelDims(dp_replicate=2, dp_shard=2), ParallelDims(dp_shard=2, tp=2, ep=4),
    ParallelDims(tp=2, ep=2), ParallelDims(pp=2, dp_shard=2, ep=2),
])
def test_good_layouts_pass_and_borrow_ep_from_dp_shard_and_tp(dims):
    dims.validate(TINY, dims.world_size)
    assert dims.dp_shard_in_ep * dims.tp == max(dims.ep, dims.tp) or dims.ep == 1
    assert dims.dp_shard_out * dims.dp_shard_in_ep == dims.dp_shard
