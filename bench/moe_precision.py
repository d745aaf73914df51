"""The MoE layer's forward+backward in fp32, under bf16 autocast (fp32 weights, as
trainer.precision=bf16 runs it) and with bf16 weights, alternated within each round so that load on
the machine hits all three alike. Prints medians, the spread (max / min over rounds) and each median
over fp32's and over bf16 weights'.
Run: python bench/moe_precision.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from contextlib import nullcontext

import torch

from scifm.model.config import MoEConfig
from scifm.model.moe import MoE

D_MODEL, TOKENS = 512, 2048
CFG = MoEConfig(n_experts=16, top_k=2, expert_ffn=256)


def step_time(moe: MoE, x_BSD: torch.Tensor, autocast: bool) -> float:
    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else nullcontext()
    t0 = time.perf_counter()
    with context:
        y_BSD = moe(x_BSD)
    y_BSD.float().square().mean().backward()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    moe = MoE(D_MODEL, CFG)
    x_BSD = torch.randn(1, TOKENS, D_MODEL, requires_grad=True)
    bf16_moe = copy.deepcopy(moe).to(torch.bfloat16)
    variants = {  # name: (module, input, autocast)
        "fp32": (moe, x_BSD, False),
        "autocast": (moe, x_BSD, True),
        "bf16 weights": (bf16_moe, x_BSD.detach().bfloat16().requires_grad_(), False),
    }
    for module, x, autocast in variants.values():  # warm-up: kernel probes, allocator
        step_time(module, x, autocast)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, (module, x, autocast) in variants.items():
            module.zero_grad(set_to_none=True)
            times[name].append(step_time(module, x, autocast))
    medians = {name: statistics.median(t) for name, t in times.items()}
    print(f"MoE d_model {D_MODEL}, {CFG.n_experts} experts top-{CFG.top_k}, expert_ffn {CFG.expert_ffn}, "
          f"{TOKENS} tokens, forward+backward, "
          f"{args.rounds} rounds, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name, t in times.items():
        print(f"  {name:12s} median {medians[name] * 1e3:7.1f} ms  spread {max(t) / min(t):5.2f}  "
              f"/ fp32 {medians[name] / medians['fp32']:.2f}  / bf16 weights {medians[name] / medians['bf16 weights']:.2f}")


if __name__ == "__main__":
    main()
