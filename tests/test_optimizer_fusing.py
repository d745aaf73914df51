"""build_optimizer steps with torch's fused AdamW under every layout: where parameters sit on several
meshes (FSDP2 with expert parallelism) or mix plain tensors and DTensors (TP without FSDP), each step
makes one fused call per group and mesh, and the result is torch's AdamW. Rank 0 of torch's fake
process group stands for a rank: the optimizer's arithmetic is local, so its results are real."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard
from torch.testing._internal.distributed.fake_pg import FakeStore

from scifm.config import TrainerConfig
from scifm.train.optim import build_optimizer

# a matrix, a vector, stacked experts; the mesh of each ("dp_shard", "ep" or None for a plain tensor)
SHAPES = [(8, 4), (8,), (4, 8, 8)]
LAYOUTS = {"FSDP2 with expert parallelism": ["dp_shard", "dp_shard", "ep"],
           "TP without FSDP": ["dp_shard", None, None]}


@pytest.fixture
def meshes():
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=4)
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp_shard", "ep"))
    yield {"dp_shard": mesh["dp_shard"], "ep": mesh["ep"], None: None}
    dist.destroy_process_group()


def module_of(params: list[torch.Tensor]) -> nn.Module:
    module = nn.Module()
    for i, p in enumerate(params):
        module.register_parameter(f"p{i}", nn.Parameter(p))
    return module


def placed(local: torch.Tensor, mesh) -> torch.Tensor:
    return local.clone() if mesh is None else DTensor.from_local(local.clone(), mesh, [Shard(0)], run_check=False)


def local_of(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_each_step_is_fused_per_mesh_and_equals_torchs_loop(layout, meshes, monkeypatch):
    torch.manual_seed(0)
    locals_ = [torch.randn(shape) for shape in SHAPES]
    grads = [torch.randn_like(t) for t in locals_]
    placed_model = module_of([placed(t, meshes[m]) for t, m in zip(locals_, LAYOUTS[layout])])
    plain = module_of([t.clone() for t in locals_])
    fused, reference = build_optimizer(placed_model, TrainerConfig()), build_optimizer(plain, TrainerConfig())
    for group in reference.param_groups:  # the same groups and hyper-parameters, stepped tensor by tensor
        group["fused"], group["foreach"] = False, False
    built = [list(g["params"]) for g in fused.param_groups]

    calls = []  # the meshes of each fused call's parameters
    real = torch._fused_adamw_

    def recorded(params, *args, **kwargs):
        calls.append({p.device_mesh if isinstance(p, DTensor) else None for p in params})
        return real(params, *args, **kwargs)

    monkeypatch.setattr(torch, "_fused_adamw_", recorded)
    for _ in range(3):
        for p, q, g in zip(placed_model.parameters(), plain.parameters(), grads):
            p.grad = placed(g, p.device_mesh if isinstance(p, DTensor) else None)
            q.grad = g.clone()
        fused.step()
        reference.step()
    # the matrices' group and the vectors' group, each split by mesh: one kind of tensor in every call,
    # 3 calls a step in both layouts (matrices on two meshes or kinds, vectors on one)
    assert all(len(c) == 1 for c in calls) and len(calls) == 3 * 3, calls
    assert [list(g["params"]) for g in fused.param_groups] == built  # the groups are put back after each step
    for p, q, before in zip(placed_model.parameters(), plain.parameters(), locals_):
        assert not torch.equal(local_of(p), before)  # every tensor moved
        # one AdamW, two orders of its fp32 operations (the fused kernel and torch's loop): weights of
        # order 1 agree to a few units of fp32 rounding
        torch.testing.assert_close(local_of(p).detach(), q.detach(), rtol=0, atol=1e-6)


def test_parameters_of_one_kind_step_as_torch_builds_them(meshes):
    """Plain tensors only, or DTensors on one mesh: one fused call per group, no hooks."""
    for params in ([torch.randn(8, 4), torch.randn(8)],
                   [placed(torch.randn(8, 4), meshes["dp_shard"]), placed(torch.randn(8), meshes["dp_shard"])]):
        optimizer = build_optimizer(module_of(params), TrainerConfig())
        assert optimizer.defaults["fused"] and not optimizer._optimizer_step_pre_hooks


def test_a_step_that_raised_leaves_the_next_one_the_built_groups(meshes, monkeypatch):
    """torch runs no post-hook after a step that raised; the next step starts from the built groups
    again, so a checkpoint or the schedule never sees the split ones after it."""
    params = [placed(torch.randn(8, 4), meshes["dp_shard"]), placed(torch.randn(4, 8, 8), meshes["ep"])]
    model = module_of(params)
    optimizer = build_optimizer(model, TrainerConfig())
    built = [list(g["params"]) for g in optimizer.param_groups]
    for p in model.parameters():
        p.grad = placed(torch.randn(p.to_local().shape), p.device_mesh)
    real = torch._fused_adamw_

    def failing(*args, **kwargs):
        raise RuntimeError("injected")

    monkeypatch.setattr(torch, "_fused_adamw_", failing)
    with pytest.raises(RuntimeError, match="injected"):
        optimizer.step()
    monkeypatch.setattr(torch, "_fused_adamw_", real)
    optimizer.step()
    assert [list(g["params"]) for g in optimizer.param_groups] == built
    assert len(optimizer.param_groups) == 2
