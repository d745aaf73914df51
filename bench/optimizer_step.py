"""torch's AdamW step over a scifm model's parameters, alternated within each round so that load on the
machine hits every variant alike: the default (tensor by tensor on CPU), foreach, fused (one call per
group), and scifm's (build_optimizer: fused, one call per group and mesh where the parameters sit on
several). Prints medians, the spread (max / min over rounds) and each median over the default's.
--placement: `plain` tensors; `two-meshes`, replicated DTensors with the routed experts on one mesh and
the rest on another, as FSDP2 with expert parallelism leaves them; `mixed`, the decoder blocks' matrices
but the experts' and routers' as DTensors on one mesh and the rest plain, as TP without FSDP leaves them
(torch's fake process group stands for the other rank; replicated placements keep every tensor whole).
A variant torch refuses for a placement is named and left out.
Run: python bench/optimizer_step.py [--model tiny|moe_1b] [--rounds 7] [--placement plain|two-meshes|mixed]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from scifm.config import TrainerConfig, compose_run_config
from scifm.model.multimodal import ScientificMoE
from scifm.train.optim import build_optimizer

TORCH_VARIANTS = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}
# vocabulary sizes of the kind a trained tokenizer gives; the optimizer only sees the tensor sizes
VOCAB = {"total": 4096, "text": 2048, "latex": 512, "protein": 64}


def placed(model: torch.nn.Module, placement: str) -> list[torch.nn.Parameter]:
    if placement == "plain":
        return list(model.parameters())
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    mesh = init_device_mesh("cpu", (2, 1), mesh_dim_names=("dp_shard", "ep"))

    def mesh_of(name: str, p: torch.Tensor):
        if placement == "two-meshes":
            return mesh["ep" if ".experts." in name else "dp_shard"]
        sharded = name.startswith("layers.") and p.ndim >= 2 and ".experts." not in name and ".router." not in name
        return mesh["dp_shard"] if sharded else None

    out = []
    for name, p in model.named_parameters():
        on = mesh_of(name, p)
        out.append(torch.nn.Parameter(p.detach() if on is None else
                                      DTensor.from_local(p.detach(), on, [Replicate()], run_check=False)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="a configs/model preset")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--placement", choices=("plain", "two-meshes", "mixed"), default="plain")
    args = parser.parse_args()
    cfg = compose_run_config(["experiment=tiny", f"model={args.model}"])
    params = placed(ScientificMoE(cfg.model, VOCAB), args.placement)
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    holder = torch.nn.Module()
    for i, p in enumerate(params):
        holder.register_parameter(f"p{i}", p)
    optimizers = {name: torch.optim.AdamW(params, lr=1e-4, **kw) for name, kw in TORCH_VARIANTS.items()}
    optimizers["scifm"] = build_optimizer(holder, TrainerConfig())
    refused = []
    for name, opt in list(optimizers.items()):  # the first step creates the moments: not timed
        try:
            opt.step()
        except RuntimeError as err:
            refused.append(f"{name} ({str(err).splitlines()[0][:90]})")
            del optimizers[name]
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    for _ in range(args.rounds):
        for name, opt in optimizers.items():
            t0 = time.perf_counter()
            opt.step()
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["default"])
    print(f"model {args.model}: {sum(p.numel() for p in params) / 1e6:.1f}M parameters, {len(params)} tensors "
          f"({args.placement}), {args.rounds} rounds, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name, t in times.items():
        median = statistics.median(t)
        print(f"  {name:8s} median {median * 1e3:8.1f} ms  spread {max(t) / min(t):5.2f}  / default {median / base:.3f}")
    for line in refused:
        print(f"  refused by torch: {line}")


if __name__ == "__main__":
    main()
