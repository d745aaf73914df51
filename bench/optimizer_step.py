"""torch's AdamW step over a scifm model's parameters: the default (tensor by tensor on CPU), foreach
and fused implementations, alternated within each round so that load on the machine hits all three
alike. Prints medians, the spread (max / min over rounds) and each median over the default's.
With --meshes 2 the parameters are DTensors on two meshes, as FSDP2 with expert parallelism leaves them
(the experts on theirs, the rest on dp_shard's; torch's fake process group stands for the other rank,
replicated placements keep every tensor whole): the optimizer stepped them tensor by tensor (the
default) until the trainer asked torch whether its fused kernel takes several meshes at once.
Run: python bench/optimizer_step.py [--model tiny|moe_1b] [--rounds 7] [--meshes 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from scifm.config import compose_run_config
from scifm.model.multimodal import ScientificMoE

IMPLEMENTATIONS = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}
# vocabulary sizes of the kind a trained tokenizer gives; the optimizer only sees the tensor sizes
VOCAB = {"total": 4096, "text": 2048, "latex": 512, "protein": 64}


def on_two_meshes(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The model's parameters as replicated DTensors: the routed experts' on one mesh, the rest on another."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    mesh = init_device_mesh("cpu", (2, 1), mesh_dim_names=("dp_shard", "ep"))
    return [torch.nn.Parameter(DTensor.from_local(p.detach(), mesh["ep" if ".experts." in name else "dp_shard"],
                                                  [Replicate()], run_check=False))
            for name, p in model.named_parameters()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="a configs/model preset")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--meshes", type=int, choices=(1, 2), default=1)
    args = parser.parse_args()
    cfg = compose_run_config(["experiment=tiny", f"model={args.model}"])
    model = ScientificMoE(cfg.model, VOCAB)
    params = list(model.parameters()) if args.meshes == 1 else on_two_meshes(model)
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    optimizers = {name: torch.optim.AdamW(params, lr=1e-4, **kw) for name, kw in IMPLEMENTATIONS.items()}
    for opt in optimizers.values():  # the first step creates the moments: not timed
        opt.step()
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    for _ in range(args.rounds):
        for name, opt in optimizers.items():
            t0 = time.perf_counter()
            opt.step()
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["default"])
    print(f"model {args.model}: {sum(p.numel() for p in params) / 1e6:.1f}M parameters, {len(params)} tensors"
          f"{', DTensors on 2 meshes' if args.meshes == 2 else ''}, "
          f"{args.rounds} rounds, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name, t in times.items():
        median = statistics.median(t)
        print(f"  {name:8s} median {median * 1e3:8.1f} ms  spread {max(t) / min(t):5.2f}  / default {median / base:.3f}")


if __name__ == "__main__":
    main()
