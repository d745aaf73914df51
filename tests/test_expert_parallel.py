"""Expert parallelism and global router statistics: multi-process parity with one process, validation."""

from __future__ import annotations

import pytest
import torch
from tests.helpers.torchrun import run_torchrun

from scifm.model.config import MoEConfig
from scifm.model.moe import MoE
from scifm.parallel.expert_parallel import (
    _expert_major_order,
)


@pytest.mark.parametrize("nproc", [2, 4])
def test_parallel_moe_matches_single_process(nproc: int, tmp_path) -> None:
    """ep_worker.py: outputs, loss, router stats, every gradient and the balancing bias over 3 SGD
    steps; cases with ep = 1 (router stats only), ep = dp and ep < dp, some with a whole ep rank
    receiving no rows."""
    results = run_torchrun("ep_worker.py", nproc, tmp_path)
    rejections = results.pop("rejections")
    assert "not divisible by ep" in rejections["experts_not_divisible"]
    assert "1-D mesh" in rejections["mesh_not_1d"]
    for name, r in results.items():
        assert r["worst_ratio"] <= 1.0, (name, r)
        assert r["assignments_rerouted"] > 0, name  # the steps changed the routing
        if "_zero" in name:  # the exchange ran with zero splits and a rank that received nothing
            assert r["zero_splits"] > 0 and r["min_rows_received"] == 0, (name, r)
        if "capacity" in name:
            assert r["dropped_tokens"] > 0, (name, r)
    assert sum("expert_grad" in r["max_abs"] and "min_rows_received" in r for r in results.values()) >= 2


def test_received_rows_regrouped_by_local_expert() -> None:
    # 3 source ranks x 2 local experts: rank0 -> e1 rows 0,1; rank1 -> e0 row 2; rank2 -> e0 rows 3,4, e1 row 5
    recv_RJ = torch.tensor([[0, 2], [1, 0], [2, 1]])
    assert _expert_major_order(recv_RJ, 6).tolist() == [2, 3, 4, 0, 1, 5]
    assert _expert_major_order(torch.tensor([[1, 2], [2, 1]]), 6).tolist() == [0, 3, 4, 1, 2, 5]
    assert _expert_major_order(torch.zeros(2, 4, dtype=torch.long), 0).numel() == 0


def test_statistics_summed_over_two_halves_give_the_whole_batch_losses() -> None:
    """What apply_global_router_stats relies on: MoE's losses and counts depend on its batch only
    through the sums that reduce_stats sees."""
    torch.manual_seed(0)
    moe = MoE(8, MoEConfig(n_experts=4, top_k=2, expert_ffn=8, aux_loss_coef=0.3, z_loss_coef=0.2))
    x_BSD = torch.randn(4, 3, 8)
    moe(x_BSD)
    whole = dict(moe.last_stats)
    seen: list[torch.Tensor] = []
    moe.reduce_stats = lambda stat: seen.append(stat.detach()) or stat
    moe(x_BSD[2:])
    half = dict(moe.last_stats)
    moe.reduce_stats = lambda stat: stat + seen[0]
    moe(x_BSD[:2])
    for key in ("tokens_per_expert", "load_balance_loss", "z_loss"):
        torch.testing.assert_close(moe.last_stats[key], whole[key])
    assert not torch.equal(half["load_balance_loss"], whole["load_balance_loss"])
