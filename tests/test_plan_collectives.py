"""The planner's communication (time_model._tp_seconds, _ep_seconds and _dp_seconds) against the
collectives a sharded model really issues: one process stands for rank 0 of its groups on torch's
fake process group (collectives return at once, so the values are meaningless but every collective is
issued with its real shapes), and scifm.parallel.comm_count records each one of the micro-batches'
forward, loss and backward. The bytes each rank moves and the rings' latency steps, summed over what
was recorded, must equal the planner's exactly: tensor parallelism with sequence and loss parallelism
on and off, with and without shared experts, recomputation, and as pipeline stages; FSDP2, HSDP and
expert parallelism as training applies them, with fp32 and bf16 weights, micro-batches,
recomputation, and under tensor parallelism. And what clipping and the optimizer step issue under
tensor parallelism: each partial gradient reduced once."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.testing._internal.distributed.fake_pg import FakeStore

from scifm.config import compose_run_config
from scifm.model.config import ModelConfig, MoEConfig
from scifm.model.multimodal import ScientificMoE
from scifm.parallel.comm_count import CollectiveRecorder, ring_cost
from scifm.parallel.distributed import init_distributed
from scifm.parallel.fsdp import apply_activation_checkpointing, recomputes
from scifm.parallel.grad_norm import clip_grad_norm
from scifm.parallel.parallelize import _parallelize_module
from scifm.parallel.pipeline import _gather_sequence_on_exit, model_part
from scifm.parallel.runner import loss_parallel_for
from scifm.parallel.tensor_parallel import apply_tensor_parallel
from scifm.plan.layouts import Layout
from scifm.plan.memory_model import LayoutSizes
from scifm.plan.shapes import model_shapes
from scifm.plan.time_model import _dp_seconds, _ep_seconds, _tp_seconds, stats_all_reduces
from scifm.train.optim import build_optimizer
from scifm.train.step import scaled_cross_entropy

B, S, VOCAB = 2, 16, 320  # B rows per micro-batch on each data-parallel rank
SIZES = {"total": VOCAB, "text": VOCAB, "latex": 64, "protein": 32}


def cost(moved: float, steps: int, span: int) -> np.ndarray:
    """The planner's `seconds` callback, returning what it is given: its sums are the planner's totals."""
    return np.array([moved, steps], dtype=float)


@pytest.fixture
def fake_world(request):
    """Rank 0 of a fake process group of `request.param` ranks."""
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=request.param)
    yield
    dist.destroy_process_group()


def setup(shared: int, overrides: list[str]):
    run = compose_run_config(["experiment=tiny", "trainer.precision=fp32", f"data.seq_len={S}", *overrides])
    cfg = ModelConfig(d_model=64, n_layers=4, n_heads=4, n_kv_heads=4, ffn_hidden=96, n_dense_layers=1,
                      moe=MoEConfig(n_experts=4, top_k=2, expert_ffn=32, n_shared_experts=shared),
                      qk_norm=run.model.qk_norm)
    run.model = cfg
    dp = run.parallel.dp_replicate * run.parallel.dp_shard
    run.trainer.batch_size = B * dp
    return cfg, run, LayoutSizes(run, Layout(run.parallel))


def record(model: nn.Module, microbatches: int, first: bool, last: bool, d_model: int,
           recorder_type=CollectiveRecorder) -> list:
    """What one rank issues over a step's micro-batches: forward, loss (on the last stage) and backward."""
    recorder = recorder_type()
    with recorder:
        for _ in range(microbatches):
            x = torch.randint(0, VOCAB, (B, S)) if first else torch.randn(B, S, d_model, requires_grad=True)
            out = model(x, torch.arange(S).expand(B, S), torch.zeros(B, S, dtype=torch.long))
            if last:
                with loss_parallel_for(out):
                    scaled_cross_entropy(out, torch.randint(0, VOCAB, (B, S)), 1.0).backward()
            else:
                out.backward(torch.ones_like(out))
    assert recorder.issued  # the model ran sharded
    return recorder.issued


TP_CASES = {  # name: (tp, shared experts, parallel overrides, this rank's stage of 2 or None)
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
@pytest.mark.parametrize("case, fake_world", [(name, case[0]) for name, case in TP_CASES.items()],
                         indirect=["fake_world"])
def test_planner_counts_the_collectives_a_tensor_parallel_model_issues(case, fake_world):
    tp, shared, overrides, stage = TP_CASES[case]
    cfg, run, s = setup(shared, [f"parallel.tp={tp}", *overrides])
    par = run.parallel
    mesh = init_device_mesh("cpu", (tp,), mesh_dim_names=("tp",))
    model = ScientificMoE(cfg, SIZES)
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

    issued = record(model, 1, first, last, cfg.d_model)
    recomputed = [recomputes(par.activation_checkpoint, k) for k in range(len(layer_ids))]
    predicted = _tp_seconds(cfg, VOCAB, s, layer_ids, [stage or 0], recomputed, cost)
    assert tuple(predicted) == pytest.approx(ring_cost(issued), rel=1e-12), issued


LAYOUT_CASES = {  # name: (world, parallel overrides, micro-batches)
    "dp_shard=2": (2, ["parallel.dp_shard=2"], 1),
    "dp_shard=4, bf16 weights, 2 micro-batches": (4, ["parallel.dp_shard=4", "parallel.mixed_precision=bf16"], 2),
    "dp_replicate=2 dp_shard=2": (4, ["parallel.dp_replicate=2", "parallel.dp_shard=2"], 1),
    "dp_shard=2, full recompute": (2, ["parallel.dp_shard=2", "parallel.activation_checkpoint=full"], 1),
    "dp_shard=2 tp=2": (4, ["parallel.dp_shard=2", "parallel.tp=2"], 1),
    "dp_shard=2 tp=2, q/k norms, bf16 weights": (4, ["parallel.dp_shard=2", "parallel.tp=2", "model.qk_norm=true",
                                                    "parallel.mixed_precision=bf16"], 1),
    "dp_shard=2 tp=2 without sp": (4, ["parallel.dp_shard=2", "parallel.tp=2", "parallel.sequence_parallel=false"], 1),
    "dp_shard=2 ep=2": (2, ["parallel.dp_shard=2", "parallel.ep=2"], 1),
    "dp_shard=2 ep=2, full recompute, 2 micro-batches": (2, ["parallel.dp_shard=2", "parallel.ep=2",
                                                            "parallel.activation_checkpoint=full"], 2),
    "tp=2 ep=2 (ep spans tp)": (2, ["parallel.tp=2", "parallel.ep=2"], 1),
    "dp_shard=4 ep=2 (experts sharded over the other 2)": (4, ["parallel.dp_shard=4", "parallel.ep=2"], 1),
}


class MirroredAllToAll(CollectiveRecorder):
    """The recorder, with every rank routing as this one: an all-to-all hands back what it was given
    (the fake group leaves its output unwritten, which would give the dispatch garbage counts)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if func is torch.ops._c10d_functional.all_to_all_single.default:
            out.copy_(args[0])
        return out


@pytest.mark.parametrize("case, fake_world", [(name, case[0]) for name, case in LAYOUT_CASES.items()],
                         indirect=["fake_world"])
def test_planner_counts_the_collectives_of_fsdp_and_expert_parallelism(case, fake_world, monkeypatch):
    """The layout applied as training applies it (parallelize's TP, routing statistics, EP, recompute,
    FSDP2: each block a unit, under ep each block's experts one more, the root gathered once a micro-
    batch). The encoders are left out of the model and of its shapes here (the recorded batches carry
    no items, which would leave them unrun). The routing statistics' all-reduces over the dp ranks are
    checked apart: their count and size against the planner's (whose latency for them is a tree's, not
    the ring that ring_cost sums)."""
    world, overrides, microbatches = LAYOUT_CASES[case]
    cfg, run, s = setup(1, [*overrides, f"trainer.grad_accum={microbatches}"])
    par = run.parallel
    monkeypatch.setenv("WORLD_SIZE", str(world))
    ctx = init_distributed(par, cfg, torch.device("cpu"))
    model = ScientificMoE(cfg, SIZES)
    model.encoders = nn.ModuleDict()
    _parallelize_module(model, ctx, par)

    layer_ids = list(range(cfg.n_layers))
    moe = [i >= cfg.n_dense_layers for i in layer_ids]
    recomputed = [recomputes(par.activation_checkpoint, k) for k in layer_ids]
    count, size = stats_all_reduces(cfg, moe, recomputed)
    statistics = ("all_reduce", size, ctx.dims.dp_size)
    recorded = record(model, microbatches, True, True, cfg.d_model, MirroredAllToAll)
    assert recorded.count(statistics) == (microbatches * count if ctx.dims.dp_size > 1 else 0)
    issued = [c for c in recorded if c != statistics]
    shapes = model_shapes(cfg, SIZES)
    shapes = dataclasses.replace(shapes, front=shapes.front[:1], n_encoders=0)
    predicted = _dp_seconds(shapes, s, layer_ids, sum(moe), True, True, cost)
    if par.tp > 1:
        predicted = predicted + microbatches * _tp_seconds(cfg, VOCAB, s, layer_ids, [0], recomputed, cost)
    if par.ep > 1:
        predicted = predicted + microbatches * _ep_seconds(cfg, s, moe, recomputed, cost)
    assert tuple(predicted) == pytest.approx(ring_cost(issued), rel=1e-12), issued


@pytest.mark.parametrize("fake_world", [2], indirect=True)
def test_clipping_reduces_each_partial_gradient_once_and_the_optimizer_none(fake_world):
    """Under sequence parallelism the norms' weights get partial gradients over the tp ranks. Summed once
    when the gradient norm is taken, in place of the gradient; left partial, the norm reduced each again
    and AdamW three times more (38 all-reduces a step for the tiny model's 9 norms instead of 9)."""
    cfg, run, s = setup(1, ["parallel.tp=2"])
    model = ScientificMoE(cfg, SIZES)
    apply_tensor_parallel(model, init_device_mesh("cpu", (2,), mesh_dim_names=("tp",)), True, True)
    optimizer = build_optimizer(model, run.trainer)
    record(model, 1, True, True, cfg.d_model)
    clipping, stepping = CollectiveRecorder(), CollectiveRecorder()
    with clipping:
        clip_grad_norm(list(model.parameters()), 1.0)
    with stepping:
        optimizer.step()
    n_norms = 2 * cfg.n_layers + 1
    assert clipping.issued[:n_norms] == [("all_reduce", cfg.d_model * 4, 2)] * n_norms
    # then the squared norms of the two groups of tp-sharded gradients (dim 0 and dim 1), summed over tp
    assert [kind for kind, _, _ in clipping.issued[n_norms:]] == ["all_reduce"] * 2
    assert stepping.issued == []
