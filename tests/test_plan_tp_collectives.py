"""The planner's tensor-parallel collectives (time_model._tp_seconds) against those a tensor-parallel
model really issues: one process stands for rank 0 of a tp group on torch's fake process group
(collectives return at once, so the values are meaningless but every collective is issued with its
real shape), and scifm.parallel.comm_count records each one of a micro-batch's forward, loss and
backward. The bytes each rank moves and the ring's latency steps, summed over what was recorded,
must equal the planner's exactly, under sequence and loss parallelism on and off, with and without
shared experts, recomputation, and as pipeline stages."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.testing._internal.distributed.fake_pg import FakeStore

from scifm.config import compose_run_config
from scifm.model.config import ModelConfig, MoEConfig
from scifm.model.multimodal import ScientificMoE
from scifm.parallel.comm_count import CollectiveRecorder, ring_cost
from scifm.parallel.fsdp import apply_activation_checkpointing, recomputes
from scifm.parallel.pipeline import _gather_sequence_on_exit, model_part
from scifm.parallel.runner import loss_parallel_for
from scifm.parallel.tensor_parallel import apply_tensor_parallel
from scifm.plan.layouts import Layout
from scifm.plan.memory_model import LayoutSizes
from scifm.plan.time_model import _tp_seconds
from scifm.train.step import scaled_cross_entropy

B, S, VOCAB = 2, 16, 320


@pytest.fixture
def fake_group(request):
    """A mesh over rank 0 of a fake process group of `request.param` ranks."""
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=request.param)
    yield init_device_mesh("cpu", (request.param,), mesh_dim_names=("tp",))
    dist.destroy_process_group()


CASES = {  # name: (tp, shared experts, parallel overrides, pipeline (stages, this rank's stage) or None)
    "sp+lp": (2, 1, [], None),
    "no sp, no lp": (2, 1, ["parallel.sequence_parallel=false", "parallel.loss_parallel=false"], None),
    "sp, no lp": (2, 1, ["parallel.loss_parallel=false"], None),
    "tp=4 without shared experts": (4, 0, [], None),
    "full recompute": (2, 1, ["parallel.activation_checkpoint=full"], None),
    "no sp, full recompute": (2, 1, ["parallel.sequence_parallel=false", "parallel.activation_checkpoint=full"], None),
    "no sp, selective recompute": (2, 0, ["parallel.sequence_parallel=false",
                                          "parallel.activation_checkpoint=selective"], None),
    "first of 2 stages, recomputed": (2, 1, ["parallel.pp=2", "parallel.activation_checkpoint=full"], 0),
    "last of 2 stages": (2, 1, ["parallel.pp=2"], 1),
}


@pytest.mark.filterwarnings("ignore:Parallelize plan key")  # a stage lacks the embedding or the output layer
@pytest.mark.parametrize("case, fake_group", [(name, case[0]) for name, case in CASES.items()],
                         indirect=["fake_group"])
def test_planner_counts_the_collectives_a_tensor_parallel_model_issues(case, fake_group):
    tp, shared, overrides, stage = CASES[case]
    mesh = fake_group
    cfg = ModelConfig(d_model=64, n_layers=4, n_heads=4, n_kv_heads=4, ffn_hidden=96, n_dense_layers=1,
                      moe=MoEConfig(n_experts=4, top_k=2, expert_ffn=32, n_shared_experts=shared))
    run = compose_run_config(["experiment=tiny", "trainer.precision=fp32", f"trainer.batch_size={B}",
                              f"data.seq_len={S}", "trainer.grad_accum=1", f"parallel.tp={tp}", *overrides])
    run.model = cfg
    par = run.parallel
    model = ScientificMoE(cfg, {"total": VOCAB, "text": VOCAB, "latex": 64, "protein": 32})
    layer_ids = list(range(cfg.n_layers))
    first = last = True
    if stage is not None:  # the pipeline's two stages of two layers each, as build_pipeline makes them
        layer_ids = [2 * stage, 2 * stage + 1]
        first, last = stage == 0, stage == 1
        model = model_part(model, layer_ids, first, last)
        if not last and par.sequence_parallel:
            _gather_sequence_on_exit(model, mesh)
    apply_tensor_parallel(model, mesh, par.sequence_parallel, par.loss_parallel)
    if par.activation_checkpoint != "none":
        apply_activation_checkpointing(model, par.activation_checkpoint)

    x = torch.randint(0, VOCAB, (B, S)) if first else torch.randn(B, S, cfg.d_model, requires_grad=True)
    recorder = CollectiveRecorder()
    with recorder:
        out = model(x, torch.arange(S).expand(B, S), torch.zeros(B, S, dtype=torch.long))
        if last:
            with loss_parallel_for(out):
                scaled_cross_entropy(out, torch.randint(0, VOCAB, (B, S)), 1.0).backward()
        else:
            out.backward(torch.ones_like(out))

    s = LayoutSizes(run, Layout(par))
    recomputed = [recomputes(par.activation_checkpoint, k) for k in range(len(layer_ids))]
    stages = [stage] if stage is not None else [0]
    predicted = _tp_seconds(cfg, VOCAB, s, layer_ids, stages, recomputed, lambda moved, steps, span: (moved, steps))
    assert recorder.issued  # the model ran under tensor parallelism
    assert predicted == pytest.approx(ring_cost(recorder.issued, tp), rel=1e-12), recorder.issued
