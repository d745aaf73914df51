"""build_optimizer takes torch's fused AdamW wherever the parameters allow one call: plain tensors,
DTensors on one mesh, and DTensors on several meshes (FSDP2 with expert parallelism) where the
installed torch's DTensor runs the fused kernel across meshes; a mix of plain tensors and DTensors
(TP without FSDP) steps tensor by tensor. Rank 0 of torch's fake process group stands for a rank:
the optimizer's arithmetic is local, so its results are real."""

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


@pytest.fixture
def meshes():
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=4)
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp_shard", "ep"))
    yield mesh["dp_shard"], mesh["ep"]
    dist.destroy_process_group()


def module_of(params: list[torch.Tensor]) -> nn.Module:
    module = nn.Module()
    for i, p in enumerate(params):
        module.register_parameter(f"p{i}", nn.Parameter(p))
    return module


def on(mesh, local: torch.Tensor) -> DTensor:
    return DTensor.from_local(local.clone(), mesh, [Shard(0)], run_check=False)


def test_parameters_on_two_meshes_step_fused_and_as_tensor_by_tensor(meshes):
    torch.manual_seed(0)
    locals_ = [torch.randn(8, 4), torch.randn(8), torch.randn(4, 8, 8)]  # a matrix, a vector, stacked experts
    grads = [torch.randn_like(t) for t in locals_]
    sharded = module_of([on(meshes[0], locals_[0]), on(meshes[0], locals_[1]), on(meshes[1], locals_[2])])
    plain = module_of([t.clone() for t in locals_])
    fused, reference = build_optimizer(sharded, TrainerConfig()), build_optimizer(plain, TrainerConfig())
    assert fused.defaults["fused"]
    for group in reference.param_groups:  # the same groups and hyper-parameters, stepped tensor by tensor
        group["fused"], group["foreach"] = False, False
    for _ in range(3):
        for p, q, g in zip(sharded.parameters(), plain.parameters(), grads):
            p.grad = DTensor.from_local(g, p.device_mesh, p.placements, run_check=False)
            q.grad = g.clone()
        fused.step()
        reference.step()
    for p, q, before in zip(sharded.parameters(), plain.parameters(), locals_):
        assert not torch.equal(p.to_local(), before)  # every tensor moved, the experts' on their mesh too
        # one AdamW, two orders of its fp32 operations (the fused kernel and torch's loop): weights of
        # order 1 agree to a few units of fp32 rounding
        torch.testing.assert_close(p.to_local(), q.detach(), rtol=0, atol=1e-6)


def test_plain_and_dtensor_parameters_mixed_step_tensor_by_tensor(meshes):
    mixed = module_of([on(meshes[0], torch.randn(8, 4)), torch.randn(8)])
    assert not build_optimizer(mixed, TrainerConfig()).defaults["fused"]
    assert build_optimizer(module_of([torch.randn(8, 4), torch.randn(8)]), TrainerConfig()).defaults["fused"]


def test_a_torch_whose_fused_kernel_refuses_several_meshes_steps_tensor_by_tensor(meshes, monkeypatch):
    """As DTensor did before it could take a fused optimizer's tensors from several meshes: the
    probe's step raises, and the optimizer takes the loop."""
    def refuse(*args, **kwargs):
        raise RuntimeError("DTensor does not support cross-mesh operation on aten._fused_adamw_")

    monkeypatch.setattr(torch, "_fused_adamw_", refuse)
    two = module_of([on(meshes[0], torch.randn(8, 4)), on(meshes[1], torch.randn(4, 8, 8))])
    assert not build_optimizer(two, TrainerConfig()).defaults["fused"]
    assert build_optimizer(module_of([on(meshes[0], torch.randn(8, 4))]), TrainerConfig()).defaults["fused"]
