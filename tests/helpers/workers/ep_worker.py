"""Parity of data and expert parallelism with one process, run under torchrun (gloo, CPU).

Each case builds a small MoE stack with name-seeded weights and runs a few SGD steps twice on every
rank: the reference on the whole global batch in-process, and the parallel model (global router
statistics, expert parallelism when ep > 1) on this rank's rows, with the trainer's loss scaling and
an emulated FSDP gradient reduction. With a capacity limit (applied per rank) the reference is data
parallelism without ep instead. Rank 0 writes per case the largest differences found on any rank;
a ratio <= 1 means every compared value is within ATOL + RTOL * |reference|.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed.tensor import DTensor

from scifm.core.errors import ConfigError
from scifm.model.config import ModelConfig, MoEConfig
from scifm.model.init import init_parameters
from scifm.model.layers import rope_cos_sin
from scifm.model.transformer import TransformerBlock, moe_layers
from scifm.parallel.dims import ParallelDims
from scifm.parallel.expert_parallel import apply_expert_parallel
from scifm.parallel.router_stats import apply_global_router_stats

RTOL, ATOL = 1e-5, 1e-6
B, S, STEPS, LR = 8, 6, 3, 0.1


@dataclass(frozen=True)
class Case:
    name: str
    dp_shard: int
    ep: int
    score_func: str
    n_shared: int
    dp_replicate: int = 1
    grad_accum: int = 1
    n_unused: int = 0  # experts [0, n_unused) are never chosen: ep rank 0 receives no rows
    capacity_factor: float = 0.0


CASES = {
    2: [
        Case("dp2_ep1_softmax_shared_accum2", 2, 1, "softmax", 1, grad_accum=2),
        Case("dp2_ep2_sigmoid", 2, 2, "sigmoid", 0),
        Case("dp2_ep2_softmax_shared_zero", 2, 2, "softmax", 1, n_unused=4),
        Case("dp2_ep2_capacity_vs_dp2", 2, 2, "softmax", 0, capacity_factor=0.75),
    ],
    4: [
        Case("dp4_ep4_sigmoid_shared_zero", 4, 4, "sigmoid", 1, n_unused=2),
        Case("dp4_ep2_softmax_accum2", 4, 2, "softmax", 0, grad_accum=2),
        Case("rep2_dp2_ep2_sigmoid_shared", 2, 2, "sigmoid", 1, dp_replicate=2),
    ],
}


class Stack(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.layers = nn.ModuleList(TransformerBlock(cfg, i) for i in range(cfg.n_layers))

    def forward(self, h_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            h_BSD = layer(h_BSD, cos, sin, None)
        return h_BSD


class SplitRecorder:
    """Wraps funcol.all_to_all_single to count the splits of the row exchanges (counts pass None)."""

    def __init__(self) -> None:
        self.real = funcol.all_to_all_single
        self.reset()

    def reset(self) -> None:
        self.zero_splits, self.min_rows_received = 0, 1 << 30

    def __call__(self, x, output_split_sizes, input_split_sizes, group, tag=""):
        if output_split_sizes is not None:
            self.zero_splits += output_split_sizes.count(0) + input_split_sizes.count(0)
            self.min_rows_received = min(self.min_rows_received, sum(output_split_sizes))
        return self.real(x, output_split_sizes, input_split_sizes, group, tag)


class Diffs:
    def __init__(self) -> None:
        self.max_abs: dict[str, float] = {}
        self.ratio: dict[str, float] = {}

    def add(self, kind: str, got: torch.Tensor, ref: torch.Tensor) -> None:
        got, ref = got.detach().double(), ref.detach().double()
        assert got.shape == ref.shape, (kind, got.shape, ref.shape)
        err = (got - ref).abs()
        ratio = err / (ATOL + RTOL * ref.abs())
        self.max_abs[kind] = max(self.max_abs.get(kind, 0.0), float(err.max()) if err.numel() else 0.0)
        self.ratio[kind] = max(self.ratio.get(kind, 0.0), float(ratio.max()) if err.numel() else 0.0)

    def max_over_ranks(self) -> tuple[dict[str, float], dict[str, float]]:
        values = torch.tensor([*self.max_abs.values(), *self.ratio.values()], dtype=torch.float64)
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
        n = len(self.max_abs)
        return dict(zip(self.max_abs, values[:n].tolist())), dict(zip(self.ratio, values[n:].tolist()))


def model_config(case: Case, n_experts: int = 8) -> ModelConfig:
    moe = MoEConfig(n_experts=n_experts, top_k=2, expert_ffn=32, n_shared_experts=case.n_shared,
                    score_func=case.score_func, route_scale=2.0 if case.score_func == "sigmoid" else 1.0,
                    aux_loss_coef=0.1, z_loss_coef=0.01, bias_update_rate=0.01,
                    capacity_factor=case.capacity_factor)
    return ModelConfig(d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_hidden=64, n_dense_layers=1, moe=moe)


def build(case: Case, cfg: ModelConfig) -> Stack:
    model = Stack(cfg)
    init_parameters(model, seed=7, std=0.05, n_layers=cfg.n_layers)
    for moe in moe_layers(model):
        moe.aux_grad_scale = 1.0 / case.grad_accum
        moe.router.expert_bias[: case.n_unused] = -10.0
    return model


def average_grads(model: nn.Module, dp_group: dist.ProcessGroup, expert_group: dist.ProcessGroup) -> None:
    """What FSDP's reduction does: mean over the ranks that hold a copy of each parameter."""
    for name, p in model.named_parameters():
        is_expert = ".experts." in name  # routed experts; shared experts are "shared_experts."
        grad = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
        group = expert_group if is_expert else dp_group
        dist.all_reduce(grad, group=group)
        grad.div_(dist.get_world_size(group))


def run_case(case: Case) -> dict:
    dims = ParallelDims(dp_replicate=case.dp_replicate, dp_shard=case.dp_shard, ep=case.ep)
    mesh = dims.build_mesh("cpu")
    dp_group, dp_rank, dp = mesh["dp"].get_group(), mesh["dp"].get_local_rank(), dims.dp_size
    cfg = model_config(case)
    ref, par = build(case, cfg), build(case, cfg)
    # a capacity limit applies to each rank's tokens, so compare with data parallelism without ep
    ref_is_dp = case.capacity_factor > 0
    apply_global_router_stats(par, dp_group)
    if ref_is_dp:
        apply_global_router_stats(ref, dp_group)
    expert_slice, expert_group = slice(None), dp_group
    if case.ep > 1:
        apply_expert_parallel(par, mesh["ep"])
        n_local = cfg.moe.n_experts // case.ep
        ep_rank = mesh["ep"].get_local_rank()
        expert_slice = slice(ep_rank * n_local, (ep_rank + 1) * n_local)
        # ranks that hold the same experts: the dp ranks outside the ep group
        expert_group = mesh["dp_replicate", "dp_shard_out"]._flatten("expert_dp").get_group()

    gen = torch.Generator().manual_seed(11)
    micro_x = [torch.randn(B, S, cfg.d_model, generator=gen) for _ in range(case.grad_accum)]
    proj_D = torch.randn(cfg.d_model, generator=gen)
    cos, sin = rope_cos_sin(torch.arange(S).expand(B, S), cfg.dim_per_head, cfg.rope_theta)
    rows = slice(dp_rank * B // dp, (dp_rank + 1) * B // dp)
    ref_rows = rows if ref_is_dp else slice(None)
    n_global = case.grad_accum * B * S

    opt_ref = torch.optim.SGD(ref.parameters(), lr=LR)
    opt_par = torch.optim.SGD(par.parameters(), lr=LR)
    choices: list[list[torch.Tensor]] = []
    hooks = [m.router.register_forward_hook(lambda _m, _i, out: choices[-1].append(out[1])) for m in moe_layers(ref)]
    diffs = Diffs()
    for _ in range(STEPS):
        choices.append([])
        loss_ref, loss_par = torch.zeros(()), torch.zeros(())
        for x_BSD in micro_x:
            # the trainer's convention: gradients are averaged over dp ranks, so the local sum is scaled by dp
            y_ref = ref(x_BSD[ref_rows], cos[ref_rows], sin[ref_rows])
            loss = (y_ref * proj_D).sum() / n_global * (dp if ref_is_dp else 1)
            loss.backward()
            loss_ref += loss.detach() / (dp if ref_is_dp else 1)

            y_par = par(x_BSD[rows], cos[rows], sin[rows])
            loss = (y_par * proj_D).sum() / n_global * dp
            loss.backward()
            loss_par += loss.detach() / dp
            if ref_is_dp:
                diffs.add("output", y_par, y_ref)
            else:
                gathered = [torch.empty_like(y_par) for _ in range(dp)]
                dist.all_gather(gathered, y_par.detach().contiguous(), group=dp_group)
                diffs.add("output", torch.cat(gathered), y_ref)
        dist.all_reduce(loss_par, group=dp_group)
        if ref_is_dp:
            dist.all_reduce(loss_ref, group=dp_group)
        diffs.add("loss", loss_par, loss_ref)
        for m_par, m_ref in zip(moe_layers(par), moe_layers(ref)):
            for key in ("tokens_per_expert", "dropped_tokens", "load_balance_loss", "z_loss"):
                diffs.add("router_stats", m_par.last_stats[key], m_ref.last_stats[key])

        average_grads(par, dp_group, expert_group)
        if ref_is_dp:
            average_grads(ref, dp_group, dp_group)
        ref_params = dict(ref.named_parameters())
        for name, p in par.named_parameters():
            is_expert = ".experts." in name
            grad = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
            ref_grad = ref_params[name].grad[expert_slice] if is_expert else ref_params[name].grad
            diffs.add("expert_grad" if is_expert else "grad", grad, ref_grad)
        for opt, model in ((opt_ref, ref), (opt_par, par)):
            opt.step()
            opt.zero_grad(set_to_none=True)
            for moe in moe_layers(model):
                moe.update_bias(moe.pop_tokens_per_expert())
        for m_par, m_ref in zip(moe_layers(par), moe_layers(ref)):
            diffs.add("expert_bias", m_par.router.expert_bias, m_ref.router.expert_bias)
    for h in hooks:
        h.remove()

    max_abs, ratio = diffs.max_over_ranks()
    return {
        "worst_ratio": max(ratio.values()),
        "ratio": ratio,
        "max_abs": max_abs,
        # top-k choices (on this rank's reference tokens) changed by the optimizer and bias steps
        "assignments_rerouted": sum(int((a != b).sum()) for a, b in zip(choices[0], choices[-1])),
        "dropped_tokens": sum(float(m.last_stats["dropped_tokens"]) for m in moe_layers(par)),
    }


def rejections(world: int) -> dict[str, str]:
    """apply_expert_parallel's errors: experts not divisible by ep, a mesh that is not 1-D."""
    mesh = ParallelDims(dp_shard=world, ep=world).build_mesh("cpu")
    found = {}
    for name, n_experts, ep_mesh in (
        ("experts_not_divisible", 2 * world + 1, mesh["ep"]),
        ("mesh_not_1d", 8, mesh["dp_shard_out", "dp_shard_in_ep"]),
    ):
        model = Stack(model_config(CASES[world][0], n_experts))
        try:
            apply_expert_parallel(model, ep_mesh)
            found[name] = ""
        except ConfigError as err:
            found[name] = str(err)
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    recorder = SplitRecorder()
    funcol.all_to_all_single = recorder
    results: dict[str, dict] = {}
    for case in CASES[dist.get_world_size()]:
        recorder.reset()
        results[case.name] = run_case(case)
        seen = torch.tensor([recorder.zero_splits, -recorder.min_rows_received])
        dist.all_reduce(seen, op=dist.ReduceOp.MAX)
        if case.ep > 1:
            results[case.name].update(zero_splits=int(seen[0]), min_rows_received=-int(seen[1]))
    results["rejections"] = rejections(dist.get_world_size())
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # gloo can crash at interpreter shutdown (pytorch issue 190489)


if __name__ == "__main__":
    main()
