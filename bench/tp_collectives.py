"""The tensor-parallel collectives of one micro-batch (forward, loss, backward), recorded as the model
issues them, beside what `scifm plan` predicts for the same layout.

One process stands for rank 0 of a tp group on torch's fake process group (every collective returns
at once with its real shape), so any tp fits on one CPU. Prints, per phase and kind, the count, the
megabytes each rank moves through a ring (an all-reduce passes its bytes twice) and the latency
steps; then the totals next to the planner's.
Run: python bench/tp_collectives.py [--tp N] [CONFIG OVERRIDES ...]
     e.g. python bench/tp_collectives.py --tp 4 model=moe_1b data.seq_len=1024 trainer.batch_size=1
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.testing._internal.distributed.fake_pg import FakeStore

from scifm.config import compose_run_config
from scifm.model.multimodal import ScientificMoE
from scifm.parallel.comm_count import CollectiveRecorder, ring_cost
from scifm.parallel.fsdp import apply_activation_checkpointing, recomputes
from scifm.parallel.runner import loss_parallel_for
from scifm.parallel.tensor_parallel import apply_tensor_parallel
from scifm.plan.layouts import Layout
from scifm.plan.memory_model import LayoutSizes
from scifm.plan.time_model import _tp_seconds
from scifm.train.step import scaled_cross_entropy

VOCAB = 32000  # the planner's vocabulary where no tokenizer is given


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=2)
    args, overrides = parser.parse_known_args()
    run = compose_run_config(["experiment=tiny", "trainer.precision=fp32", *overrides, f"parallel.tp={args.tp}",
                              "trainer.grad_accum=1"])
    cfg, par = run.model, run.parallel
    rows, seq = run.trainer.batch_size, run.data.seq_len
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=args.tp)
    mesh = init_device_mesh("cpu", (args.tp,), mesh_dim_names=("tp",))
    torch.manual_seed(0)
    model = ScientificMoE(cfg, {"total": VOCAB, "text": VOCAB, "latex": 64, "protein": 32})
    apply_tensor_parallel(model, mesh, par.sequence_parallel, par.loss_parallel)
    if par.activation_checkpoint != "none":
        apply_activation_checkpointing(model, par.activation_checkpoint)

    recorder = CollectiveRecorder()
    phases = {}
    with recorder:
        logits = model(torch.randint(0, VOCAB, (rows, seq)), torch.arange(seq).expand(rows, seq),
                       torch.zeros(rows, seq, dtype=torch.long))
        phases["forward"] = len(recorder.issued)
        with loss_parallel_for(logits):
            loss = scaled_cross_entropy(logits, torch.randint(0, VOCAB, (rows, seq)), 1.0)
            phases["loss"] = len(recorder.issued)
            loss.backward()
        phases["backward"] = len(recorder.issued)

    print(f"tp={args.tp} sequence_parallel={par.sequence_parallel} loss_parallel={par.loss_parallel} "
          f"activation_checkpoint={par.activation_checkpoint}: {rows} rows x {seq} tokens, d_model {cfg.d_model}, "
          f"{cfg.n_layers} blocks ({cfg.n_dense_layers} dense), {cfg.moe.n_shared_experts} shared experts, fp32")
    print(f"{'phase':9} {'collective':15} {'count':>6} {'MB moved':>10} {'steps':>6}")
    start = 0
    for phase, end in phases.items():
        issued = recorder.issued[start:end]
        for kind, count in sorted(Counter(k for k, _, _ in issued).items()):
            moved, steps = ring_cost([c for c in issued if c[0] == kind])
            print(f"{phase:9} {kind:15} {count:6} {moved / 1e6:10.3f} {steps:6}")
        start = end
    moved, steps = ring_cost(recorder.issued)
    s = LayoutSizes(run, Layout(par))
    recomputed = [recomputes(par.activation_checkpoint, k) for k in range(cfg.n_layers)]
    want_moved, want_steps = _tp_seconds(cfg, VOCAB, s, list(range(cfg.n_layers)), [0], recomputed,
                                         lambda moved, steps, span: (moved, steps))
    print(f"recorded: {len(recorder.issued)} collectives, {moved / 1e6:.3f} MB moved per rank, {steps} latency steps; "
          f"planner: {want_moved / 1e6:.3f} MB, {want_steps} steps")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
