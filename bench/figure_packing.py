"""The figure encoder over a batch's figures packed several to a row (the collate's layout) against
one figure per row padded to the largest (the layout before), side by side in one run.

The figures are those of moe_1b's batches of the built-in corpus (rows of 4096, JSONL), at rank 0 of
--dp data-parallel ranks: figures smaller than moe_1b's 448-pixel side keep their size, so a batch
mixes 160 x 120 plots (80 patches) with larger images (up to 784). The encoder is moe_1b's figure
encoder (width 512, 8 layers, 64 slots). Each round runs forward + backward over every batch in
both layouts, in turn, the order flipped every other round, fp32, one thread; freed host memory
stays in the process, as the trainer keeps it on CPU. Prints the positions each layout runs over,
the medians, the spread (max / min over rounds) and packed / one per row, and checks that both
layouts give each figure the same output (to 1e-4: the same arithmetic over rows of another length).
  python bench/figure_packing.py [--rounds 5] [--dp 8] [--batches 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from scifm.config import compose_run_config
from scifm.core.host_memory import keep_freed_host_memory
from scifm.data.loader import PackedLoader
from scifm.data.streams import resolve_sources
from scifm.data.tokenizer_training import train_tokenizer
from scifm.model.encoders.figure import FigureEncoder


def one_per_row(packed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same figures, each alone in a row padded to the largest one's patch count."""
    figure_RC = packed["patch_figure"]
    n_figures, capacity = packed["figure_row"].shape[0], figure_RC.shape[1]
    out = {"patches": torch.zeros(n_figures, capacity, packed["patches"].shape[2], dtype=packed["patches"].dtype),
           "patch_pos": torch.zeros(n_figures, capacity, 2, dtype=packed["patch_pos"].dtype),
           "patch_figure": torch.full((n_figures, capacity), -1, dtype=figure_RC.dtype),
           "figure_row": torch.arange(n_figures)}
    for f in range(n_figures):
        mine = figure_RC == f
        n = int(mine.sum())
        out["patches"][f, :n], out["patch_pos"][f, :n] = packed["patches"][mine], packed["patch_pos"][mine]
        out["patch_figure"][f, :n] = f
    return out


def forward_backward(encoder: FigureEncoder, batch: dict[str, torch.Tensor]) -> tuple[float, torch.Tensor]:
    encoder.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    out = encoder(batch)
    out.square().mean().backward()
    return time.perf_counter() - t0, out.detach()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dp", type=int, default=8, help="data-parallel ranks: rank 0's rows are timed")
    parser.add_argument("--batches", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    keep_freed_host_memory()
    cfg = compose_run_config(["experiment=tiny", "model=moe_1b", "trainer.batch_size=8", "data.seq_len=4096",
                              "data.max_bad_fraction=1.0"])
    specs = resolve_sources(cfg.data)
    tokenizer = train_tokenizer(specs, cfg.data)
    loader = PackedLoader(cfg.data, specs, tokenizer, cfg.model.encoders, split="train", batch_size=8,
                          seed=cfg.trainer.seed, dp_rank=0, dp_size=args.dp)
    packed = []
    while len(packed) < args.batches:
        batch = loader.next_batch()
        if batch.slot_index["figure"].shape[0] > 0:  # a batch with figures of its own, not the placeholder
            packed.append(batch.items["figure"])
    layouts = {"packed": packed, "one per row": [one_per_row(b) for b in packed]}
    torch.manual_seed(0)
    encoder = FigureEncoder(cfg.model.encoders.figure, cfg.model.d_model)
    times = {name: [] for name in layouts}
    outputs = {}
    for r in range(args.rounds):
        for name in (list(layouts) if r % 2 == 0 else list(layouts)[::-1]):
            results = [forward_backward(encoder, b) for b in layouts[name]]
            times[name].append(sum(t for t, _ in results))
            outputs[name] = [out for _, out in results]
    for a, b in zip(outputs["packed"], outputs["one per row"]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    figures = sum(int(b["figure_row"].shape[0]) for b in packed)
    patches = sum(int((b["patch_figure"] >= 0).sum()) for b in packed)
    fig = cfg.model.encoders.figure
    print(f"moe_1b's figure encoder (width {fig.width}, {fig.layers} layers), forward + backward, fp32, "
          f"torch {torch.__version__}, 1 thread, {args.rounds} rounds; {args.batches} batches of rank 0 of "
          f"dp={args.dp}: {figures} figures, {patches:,} patches")
    for name, batches in layouts.items():
        positions = sum(b["patch_figure"].numel() for b in batches)
        print(f"  {name:12s} {positions:8,} positions  median {statistics.median(times[name]) * 1e3:9.1f} ms  "
              f"spread {max(times[name]) / min(times[name]):.2f}")
    ratios = [p / o for p, o in zip(times["packed"], times["one per row"])]
    print(f"  packed / one per row: {statistics.median(ratios):.2f} (rounds {min(ratios):.2f} to {max(ratios):.2f}); "
          "outputs equal to 1e-4")


if __name__ == "__main__":
    main()
