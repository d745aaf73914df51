"""One training step of scifm's model with attention over blocks of queries (model.attention_query_block,
default 256: each block's SDPA call gets only the keys up to its last query) against one SDPA call over
all keys (attention_query_block=0), same weights, alternated within each round (in flipped order every
other round) so that load on the machine hits both alike. Training masks are document-causal, and
SDPA's masked CPU kernels visit every key, so the blocks skip work the mask would throw away. Prints
the two models' largest logit difference first, then per precision the medians, spreads (max / min
over rounds) and blocks / one call, for the whole step (what a run pays) and for the first block's
attention layer alone (forward + backward on the same input: the gain without the rest of the step's
noise).
Run: python bench/attention_blocks.py [--shape small|big] [--precisions fp32 bf16] [--rounds 5] [--batch 4]
     [--seq 512]
"""

from __future__ import annotations

import copy
import statistics
import time

import torch

from scifm.core.host_memory import keep_freed_host_memory
from scifm.model.attention import document_causal_mask
from scifm.model.layers import rope_cos_sin
from scifm.model.multimodal import ScientificMoE
from text_step import TextBatch, autocast_of, build_model, model_config, scifm_step, step_arguments


def attention_layer_pass(model: ScientificMoE, batch: TextBatch, precision: str):
    """A callable running forward + backward of the model's first attention layer on a fixed input."""
    cfg, (B, S) = model.cfg, batch.input_ids.shape
    attention = model.layers["0"].attention
    x_BSD = torch.randn(B, S, cfg.d_model, generator=torch.Generator().manual_seed(2), requires_grad=True)
    cos, sin = rope_cos_sin(batch.model_kwargs()["positions_BS"], cfg.dim_per_head, cfg.rope_theta)
    mask_B1SS = document_causal_mask(batch.model_kwargs()["doc_ids_BS"])

    def run() -> None:
        with autocast_of(precision):
            out_BSD = attention(x_BSD, cos, sin, mask_B1SS)
        out_BSD.float().square().mean().backward()
    return run


def main() -> None:
    parser = step_arguments(__doc__.splitlines()[0], rounds=5)
    args = parser.parse_args()
    keep_freed_host_memory()  # as the trainer does on CPU
    cfg = model_config(args.shape, args.seq)
    blocks = build_model(cfg)
    one_call = copy.deepcopy(blocks)
    for block in one_call.layers.values():
        block.attention.query_block = 0
    batch = TextBatch.random(args.batch, args.seq)
    with torch.no_grad():
        logits = [m(batch.input_ids, **batch.model_kwargs()) for m in (blocks, one_call)]
    print(f"shape {args.shape}: d_model {cfg.d_model}, {cfg.n_layers} layers, {cfg.n_heads} heads, "
          f"batch {args.batch} x {args.seq}, query block {cfg.attention_query_block}; {args.rounds} rounds, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"largest fp32 logit difference {(logits[0] - logits[1]).abs().max().item():.1e}")
    steps = {(p, part, name): make(m, batch, p) for p in args.precisions
             for part, make in (("step", scifm_step), ("attention layer", attention_layer_pass))
             for name, m in (("blocks", blocks), ("one call", one_call))}
    for step in [*steps.values()] * 2:  # warm-up: kernel probes, allocator, optimizer state (a first
        step()                           # timed step after a single warm-up one still ran up to 1.4x slower)
    times: dict[tuple, list[float]] = {v: [] for v in steps}
    order = list(steps.items())
    for r in range(args.rounds):  # the order flips every round: neither variant always follows the other
        for variant, step in order if r % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            step()
            times[variant].append(time.perf_counter() - t0)
    for p, part in dict.fromkeys((p, part) for p, part, _ in steps):
        med = {name: statistics.median(times[p, part, name]) for name in ("blocks", "one call")}
        spreads = ", ".join(f"{name} {max(times[p, part, name]) / min(times[p, part, name]):.2f}" for name in med)
        print(f"{p} {part}: with blocks {med['blocks'] * 1e3:.0f} ms, one call {med['one call'] * 1e3:.0f} ms "
              f"(spreads {spreads}); blocks / one call = {med['blocks'] / med['one call']:.2f}")


if __name__ == "__main__":
    main()
