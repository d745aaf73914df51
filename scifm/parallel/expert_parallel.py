"""Expert parallelism: each rank of the ep group holds E / ep experts; tokens travel by all-to-all.

`apply_expert_parallel` swaps every MoE's `experts` (GroupedExperts) for an ExpertParallelExperts
that takes the same call (rows sorted by global expert, per-expert counts) and returns the expert
outputs in the same row order, so MoE's routing, capacity limit, weighting and combine run
unchanged on this rank's own tokens. Rank i of the ep group owns experts [i * E/ep, (i+1) * E/ep),
stored as DTensors Shard(0) on the ep mesh under the original names (`...moe.experts.w1`), so
checkpoints keep full-model names and FSDP2 can shard them further on another mesh dimension.

Dispatch per MoE forward: all-to-all of per-expert counts, all-to-all of the rows (uneven splits,
zeros allowed), regroup by local expert, SwiGLU, inverse all-to-all. Every rank issues the same
collectives whatever it routes or receives.

Capacity limits (capacity_factor > 0) are applied by MoE before dispatch, on this rank's tokens:
the same per-rank semantics as data parallelism without ep.

With tensor parallelism the ep group spans the tp ranks, which all hold the same tokens: each tp
rank dispatches a disjoint 1/tp of the assignments and the results are all-gathered over tp (whose
backward keeps this rank's rows: the upstream gradient is the same on every tp rank).

Gradients: a rank's expert gradient sums the contributions of every rank of its ep group, while
other parameters see only their own data-parallel rank's tokens. The expert weights' gradient is
scaled by tp / ep (= 1 / the dp ranks inside the ep group) in backward, so averaging expert
gradients over the data-parallel ranks that hold the same experts (dp_replicate x dp_shard_out;
none when ep / tp == dp_shard and dp_replicate == 1), as FSDP does by default, gives the same
result as averaging every other gradient over all dp ranks.

`plain=True` is for an engine that partitions and reduces the parameters itself (DeepSpeed's
ZeRO): the experts are this rank's block as plain tensors, and their gradient is left unscaled,
since such an engine divides every gradient, the experts' included, by the whole data-parallel
size and sums expert gradients over the ranks holding the same experts, which already gives the
single-process gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from scifm.core.errors import ConfigError
from scifm.model.moe import GroupedExperts, swiglu_experts
from scifm.model.transformer import moe_layers


def apply_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh, tp_mesh: DeviceMesh | None = None,
                          plain: bool = False) -> None:
    """Shard the experts of every MoE in `model` over the 1-D `ep_mesh` (the "ep" mesh dimension,
    which contains the tp ranks when `tp_mesh` is given); `plain`: see the module's docstring.

    Expects the full expert weights, identical on every rank; keeps this rank's block of them.
    """
    if ep_mesh.ndim != 1:
        raise ConfigError(f"parallel.ep: expert parallelism needs a 1-D mesh, got shape {tuple(ep_mesh.shape)}")
    for moe in moe_layers(model):
        if not isinstance(moe.experts, GroupedExperts):
            raise ConfigError(f"parallel.ep: experts already parallelised ({type(moe.experts).__name__})")
        if moe.n_experts % ep_mesh.size():
            raise ConfigError(
                f"parallel.ep: n_experts={moe.n_experts} is not divisible by ep={ep_mesh.size()}"
            )
        moe.experts = ExpertParallelExperts(moe.experts, ep_mesh, tp_mesh, plain)


class ExpertParallelExperts(nn.Module):
    """This rank's experts plus the all-to-all dispatch; called like GroupedExperts.

    Shape suffixes as in moe.py, plus R ep ranks, J local experts, N rows received.
    """

    def __init__(self, experts: GroupedExperts, ep_mesh: DeviceMesh, tp_mesh: DeviceMesh | None = None,
                 plain: bool = False):
        super().__init__()
        self.ep = ep_mesh.size()
        self.tp = tp_mesh.size() if tp_mesh is not None else 1
        self.tp_group = tp_mesh.get_group() if tp_mesh is not None else None
        self.tp_rank = tp_mesh.get_local_rank() if tp_mesh is not None else 0
        self.n_local = experts.w1.shape[0] // self.ep
        self.group = ep_mesh.get_group()
        self.use_grouped_mm = experts.use_grouped_mm
        self.expert_gemm = experts.expert_gemm  # set before sharding (FP8 converts first)
        self.grad_scale = 1.0 if plain else self.tp / self.ep
        for name in ("w1", "w3", "w2"):
            # src_data_rank=None: every rank holds the same full weights, so take the block, no scatter
            block = distribute_tensor(getattr(experts, name).detach(), ep_mesh, [Shard(0)], src_data_rank=None)
            setattr(self, name, nn.Parameter(block.to_local() if plain else block))

    def forward(self, x_AD: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        """x_AD sorted by global expert; tokens_per_expert_E[e] rows for expert e (zeros allowed)."""
        if self.tp == 1:
            return self._dispatch(x_AD, tokens_per_expert_E)
        bounds = [r * x_AD.shape[0] // self.tp for r in range(self.tp + 1)]
        lo, hi = bounds[self.tp_rank], bounds[self.tp_rank + 1]
        # this tp rank's rows [lo, hi) are still sorted by expert; count them per expert
        end_E = tokens_per_expert_E.cumsum(0)
        start_E = end_E - tokens_per_expert_E
        mine_E = (end_E.clamp(max=hi) - start_E.clamp(min=lo)).clamp(min=0)
        y_MD = self._dispatch(_SliceRows.apply(x_AD, bounds, self.tp_rank, self.tp_group), mine_E)
        return _GatherRows.apply(y_MD, bounds, self.tp_rank, self.tp_group)

    def _dispatch(self, x_AD: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        send_RJ = tokens_per_expert_E.view(self.ep, self.n_local)
        recv_RJ = funcol.all_to_all_single(send_RJ.flatten(), None, None, self.group).view(self.ep, self.n_local)
        send_splits = send_RJ.sum(dim=1).tolist()
        recv_splits = recv_RJ.sum(dim=1).tolist()

        x_ND = funcol.all_to_all_single(x_AD.contiguous(), recv_splits, send_splits, self.group)
        order_N = _expert_major_order(recv_RJ, sum(recv_splits))
        w1, w3, w2 = (_ScaleGrad.apply(w.to_local() if isinstance(w, DTensor) else w, self.grad_scale)
                      for w in (self.w1, self.w3, self.w2))
        y_ND = swiglu_experts(x_ND[order_N], recv_RJ.sum(dim=0), w1, w3, w2, self.use_grouped_mm,
                              self.expert_gemm)
        y_ND = torch.empty_like(y_ND).index_copy(0, order_N, y_ND)  # back to arrival order
        return funcol.all_to_all_single(y_ND, send_splits, recv_splits, self.group)


def _expert_major_order(recv_RJ: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Indices that reorder received rows from (source rank, local expert) to (local expert, source rank)."""
    start_RJ = (recv_RJ.flatten().cumsum(0) - recv_RJ.flatten()).view_as(recv_RJ)
    count_JR, start_JR = recv_RJ.t().flatten(), start_RJ.t().flatten()
    seg_start_N = torch.repeat_interleave(start_JR, count_JR, output_size=n_rows)
    seg_first_N = torch.repeat_interleave(count_JR.cumsum(0) - count_JR, count_JR, output_size=n_rows)
    return seg_start_N + torch.arange(n_rows, device=recv_RJ.device) - seg_first_N


def _all_gather_rows(rows_MD: torch.Tensor, bounds: list[int], group) -> torch.Tensor:
    """Each tp rank's rows [bounds[r], bounds[r + 1]) (uneven sizes) gathered into the full [A, D]."""
    sizes = [b - a for a, b in zip(bounds, bounds[1:])]
    padded_MD = rows_MD.new_zeros(max(sizes), rows_MD.shape[1])
    padded_MD[: rows_MD.shape[0]] = rows_MD
    gathered = [torch.empty_like(padded_MD) for _ in sizes]
    dist.all_gather(gathered, padded_MD, group=group)
    return torch.cat([g[:n] for g, n in zip(gathered, sizes)])


class _GatherRows(torch.autograd.Function):
    """Forward gathers every tp rank's result rows; backward keeps this rank's rows, since every
    tp rank holds the same upstream gradient."""

    @staticmethod
    def forward(ctx, y_MD: torch.Tensor, bounds: list[int], rank: int, group) -> torch.Tensor:
        ctx.lo, ctx.hi = bounds[rank], bounds[rank + 1]
        return _all_gather_rows(y_MD, bounds, group)

    @staticmethod
    def backward(ctx, grad_AD: torch.Tensor):
        return grad_AD[ctx.lo : ctx.hi], None, None, None


class _SliceRows(torch.autograd.Function):
    """Forward takes this tp rank's rows of the (replicated) input; backward gathers every rank's
    row gradients, so the input's gradient is whole and the same on every tp rank."""

    @staticmethod
    def forward(ctx, x_AD: torch.Tensor, bounds: list[int], rank: int, group) -> torch.Tensor:
        ctx.bounds, ctx.group = bounds, group
        return x_AD[bounds[rank] : bounds[rank + 1]]

    @staticmethod
    def backward(ctx, grad_MD: torch.Tensor):
        return _all_gather_rows(grad_MD.contiguous(), ctx.bounds, ctx.group), None, None, None


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by `scale` (ExpertParallelExperts.grad_scale)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None
