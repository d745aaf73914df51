"""The training loss's chunked cross-entropy (scifm/model/cross_entropy.py) against torch's
(`F.cross_entropy(logits.float(), reduction="sum")`, which the trainer used before), forward +
backward on the same logits, alternated within each round (the order flipped every other round).
Prints per dtype and shape the medians, spreads (max / min over rounds), chunked / torch's time,
the bytes each keeps between forward and backward (counted with saved_tensors_hooks), the peak each
allocates above the logits in forward + backward (torch's profiler, as memory.json's step peak; a
pass of its own, untimed) and the largest gradient difference.
Run: python bench/cross_entropy.py [--rounds 7] [--shapes 2048x8192 4096x32768]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from scifm.model.cross_entropy import ChunkedCrossEntropy
from scifm.parallel.memory import step_peak_bytes

IGNORE = -100


def torchs(logits_NV: torch.Tensor, labels_N: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits_NV.float(), labels_N, ignore_index=IGNORE, reduction="sum") * 0.5


def chunked(logits_NV: torch.Tensor, labels_N: torch.Tensor) -> torch.Tensor:
    return ChunkedCrossEntropy.apply(logits_NV, labels_N, 0.5, IGNORE)


def run(loss_fn, base_NV: torch.Tensor, labels_N: torch.Tensor) -> tuple[float, int, torch.Tensor]:
    """Seconds of forward + backward, bytes saved for backward, the gradient."""
    logits_NV = base_NV.clone().requires_grad_()
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(logits_NV, labels_N)
    loss.backward()
    return time.perf_counter() - t0, sum(saved.values()), logits_NV.grad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--shapes", nargs="+", default=["2048x8192", "4096x32768"], help="tokens x vocabulary")
    args = parser.parse_args()
    print(f"{args.rounds} rounds, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for shape in args.shapes:
        n, v = map(int, shape.split("x"))
        g = torch.Generator().manual_seed(0)
        labels_N = torch.randint(0, v, (n,), generator=g)
        labels_N[::9] = IGNORE
        for dtype in (torch.float32, torch.bfloat16):
            base_NV = (3 * torch.randn(n, v, generator=g)).to(dtype)
            fns = {"chunked": chunked, "torch": torchs}
            results = {name: run(fn, base_NV, labels_N) for name, fn in fns.items()}  # warm-up
            peak = {}
            for name, fn in fns.items():
                with step_peak_bytes(torch.device("cpu")) as measured:
                    run(fn, base_NV, labels_N)
                peak[name] = (measured["step_peak_bytes"] - base_NV.nbytes) / 2**20  # less the logits' clone
            times: dict[str, list[float]] = {name: [] for name in fns}
            order = list(fns.items())
            for r in range(args.rounds):
                for name, fn in order if r % 2 == 0 else order[::-1]:
                    times[name].append(run(fn, base_NV, labels_N)[0])
            ours, theirs = statistics.median(times["chunked"]), statistics.median(times["torch"])
            spread = {name: max(t) / min(t) for name, t in times.items()}
            kept = {name: r[1] / 2**20 for name, r in results.items()}
            diff = (results["chunked"][2].float() - results["torch"][2].float()).abs().max().item()
            print(f"{n} x {v} {str(dtype).removeprefix('torch.')}: chunked {ours * 1e3:.1f} ms, torch's "
                  f"{theirs * 1e3:.1f} ms (spreads {spread['chunked']:.2f}, {spread['torch']:.2f}); chunked / "
                  f"torch's = {ours / theirs:.2f}; kept for backward {kept['chunked']:.0f} MiB against "
                  f"{kept['torch']:.0f}, peak {peak['chunked']:.0f} MiB against {peak['torch']:.0f}; "
                  f"largest gradient difference {diff:.1e}")

if __name__ == "__main__":
    main()
