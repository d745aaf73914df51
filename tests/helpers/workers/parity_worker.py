"""Parity of parallel layouts with one process, run under torchrun (gloo, CPU).

For each layout: the tiny multimodal model, the same seed (so the same initial weights) and the
same global batches, trained 3 optimizer steps by the trainer's own step functions; every rank
also trains the single-process reference in-process on the whole batch. Rank 0 writes the
largest loss and gradient differences per layout. Pipeline stages hold only their own layers'
gradients, so those are pooled over the ranks before comparing. Then each layout validates (a
forward-only pass), saves a sharded checkpoint, loads it whole into one process (reshard) and
resumes from it in a fresh copy of the layout (resume), as the trainer does; layouts named by
--same-placement (parameters placed as in another layout) skip that round trip.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from scifm.core.device import autocast_for
from scifm.data.loader import PackedLoader
from scifm.data.streams import resolve_sources
from scifm.model.init import init_parameters
from scifm.model.multimodal import ScientificMoE, vocab_sizes_of
from scifm.model.transformer import moe_layers
from scifm.parallel.dims import ParallelDims
from scifm.parallel.memory import memory_report
from scifm.parallel.distributed import DistContext, init_distributed
from scifm.parallel.parallelize import parallelize
from scifm.parallel.config import ParallelConfig
from scifm.tokenizers import ScientificTokenizer
from scifm.config import compose_run_config
from scifm.train.optim import build_optimizer, build_scheduler, saved_hyperparameters
from scifm.train.sharded_state import load_model_weights, load_sharded, save_sharded
from scifm.train.step import apply_update, scaled_cross_entropy, target_cross_entropy, train_step

STEPS = 3
WRAPPERS = re.compile(r"(_checkpoint_wrapped_module|_orig_mod|_fsdp_wrapped_module)\.")


def full_grads(model, ctx: DistContext) -> dict[str, torch.Tensor]:
    """Every parameter's full gradient; pipeline stages hold only theirs, so the ranks pool them."""
    out = {}
    for name, p in model.named_parameters():
        g = p.grad
        if g is not None:
            out[WRAPPERS.sub("", name)] = (g.full_tensor() if isinstance(g, DTensor) else g).detach().cpu().clone()
    if ctx.dims.pp > 1:
        parts = [None] * ctx.world_size
        dist.all_gather_object(parts, out)
        out = {name: g for part in parts for name, g in part.items()}
    return out


def full_params(model, ctx: DistContext) -> dict[str, torch.Tensor]:
    """Every parameter's full value, pooled over pipeline ranks like full_grads."""
    out = {WRAPPERS.sub("", name): (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu().clone()
           for name, p in model.named_parameters()}
    if ctx.dims.pp > 1:
        parts = [None] * ctx.world_size
        dist.all_gather_object(parts, out)
        out = {name: t for part in parts for name, t in part.items()}
    return out


@dataclass
class Training:
    runner: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    moes: list


def build(cfg, ctx: DistContext, tokenizer) -> Training:
    tc = cfg.trainer
    model = ScientificMoE(cfg.model, vocab_sizes_of(tokenizer))
    init_parameters(model, tc.seed, cfg.model.init_std, cfg.model.n_layers)
    # the reference: one process, no layout options at all
    layout = cfg.parallel if ctx.distributed else ParallelConfig()
    runner = parallelize(model, ctx, layout, scaled_cross_entropy, autocast_for("fp32", ctx.device))
    optimizer, moes = build_optimizer(runner.model, tc), moe_layers(runner.model)
    for m in moes:
        m.aux_grad_scale = 1.0 / tc.grad_accum
    return Training(runner, optimizer, build_scheduler(optimizer, tc), moes)


def run(cfg, ctx: DistContext, tokenizer, specs) -> tuple[list[float], list[float], dict, dict, Training, PackedLoader]:
    tc = cfg.trainer
    t = build(cfg, ctx, tokenizer)
    model = t.runner.model
    loader = PackedLoader(cfg.data, specs, tokenizer, cfg.model.encoders, split="train", seed=tc.seed,
                          batch_size=tc.batch_size, dp_rank=ctx.dp_rank, dp_size=ctx.dims.dp_size)
    losses, norms, grads = [], [], {}
    for step in range(STEPS):
        micro = [loader.next_batch() for _ in range(tc.grad_accum)]
        loss, norm = train_step(t.runner, micro, ctx, tc.grad_clip)
        losses.append(loss)
        norms.append(norm)
        if step == 0:
            grads = full_grads(model, ctx)
            grad_bytes = memory_report(model, t.optimizer)["grad_bytes"]
        apply_update(t.optimizer, t.scheduler, t.moes)
        if step == 0:  # optimizer state exists only after the first update
            memory = memory_report(model, t.optimizer) | {"grad_bytes": grad_bytes}
    return losses, norms, grads, memory, t, loader


def save_resume_reshard(cfg, ctx: DistContext, tokenizer, trained: Training, loader: PackedLoader,
                        ckpt_dir: Path) -> dict:
    """After validation (a forward-only pass), the layout saves; the checkpoint loads whole into one
    process with this layout's exact weights (reshard), and a fresh copy of the layout resumed from
    it takes the next step exactly as the original does (resume)."""
    model = trained.runner.model
    model.eval()
    trained.runner.target_losses(loader.next_batch(), target_cross_entropy)
    model.train()
    param_groups, _ = save_sharded(ckpt_dir, model, trained.optimizer, ctx.distributed)
    whole = ScientificMoE(cfg.model, vocab_sizes_of(tokenizer))
    load_model_weights(ckpt_dir, whole)
    saved = whole.state_dict()
    reshard_diff = max(float((saved[k] - v).abs().max()) for k, v in full_params(model, ctx).items())
    resumed = build(cfg, ctx, tokenizer)
    load_sharded(ckpt_dir, resumed.runner.model, resumed.optimizer, saved_hyperparameters(param_groups))
    resumed.scheduler.load_state_dict(trained.scheduler.state_dict())
    micro = [loader.next_batch() for _ in range(cfg.trainer.grad_accum)]
    continued = train_step(trained.runner, micro, ctx, cfg.trainer.grad_clip)
    again = train_step(resumed.runner, micro, ctx, cfg.trainer.grad_clip)
    return {"reshard_max_diff": reshard_diff, "continued": continued, "resumed": again}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--layouts", required=True, help="json list of override lists")
    ap.add_argument("--corpus-docs", default="150")
    ap.add_argument("--same-placement", default="[]", help="json list of layouts that skip the checkpoint round trip")
    args = ap.parse_args()
    torch.set_num_threads(1)
    tokenizer = ScientificTokenizer.load(args.tokenizer)
    results = {}
    references = {}  # single-process runs, by the layout's overrides outside parallel.*
    for overrides in json.loads(args.layouts):
        name = " ".join(overrides)
        cfg = compose_run_config([
            "experiment=tiny", f"data.corpus_dir={args.corpus}", f"data.corpus_max_docs_per_source={args.corpus_docs}",
            "data.seq_len=64", "trainer.batch_size=4", "trainer.grad_accum=2", "trainer.warmup_steps=1",
            "trainer.lr=1e-3", "model.moe.bias_update_rate=0.001", *overrides,
        ])
        cfg.validate()
        specs = resolve_sources(cfg.data)
        ctx = init_distributed(cfg.parallel, cfg.model, torch.device("cpu"))
        single = DistContext(ParallelDims(), 0, 1, torch.device("cpu"), None)
        key = tuple(o for o in overrides if not o.startswith("parallel."))
        if key not in references:
            references[key] = run(cfg, single, tokenizer, specs)[:4]
        ref_losses, ref_norms, ref_grads, ref_memory = references[key]
        losses, norms, grads, memory, trained, loader = run(cfg, ctx, tokenizer, specs)
        checkpoint = None if name in json.loads(args.same_placement) else save_resume_reshard(
            cfg, ctx, tokenizer, trained, loader, Path(args.out).parent / f"ckpt-{len(results)}")
        assert ref_grads.keys() == grads.keys(), sorted(set(ref_grads) ^ set(grads))[:5]
        grad_rel = max(
            float((grads[k] - ref_grads[k]).abs().max() / (ref_grads[k].abs().max() + 1e-12))
            for k in ref_grads if ref_grads[k].abs().max() > 0
        )
        grad_abs = max(float((grads[k] - ref_grads[k]).abs().max()) for k in ref_grads)
        # parameters whose single-process gradient is exactly zero (e.g. an encoder fed only a
        # placeholder item, an expert no token chose): the layout's must be zero too
        zero_grad_max = max([float(grads[k].abs().max()) for k in ref_grads if ref_grads[k].abs().max() == 0],
                            default=0.0)
        n_zero_grads = sum(1 for k in ref_grads if ref_grads[k].abs().max() == 0)
        # the whole gradient's relative L2 error: the bf16 layouts' measure (their parameters keep
        # 8 significant bits, so single entries can be far off while the direction holds)
        diff_sq = sum(float(((grads[k] - ref_grads[k]) ** 2).sum()) for k in ref_grads)
        grad_l2_rel = (diff_sq / max(sum(float((g ** 2).sum()) for g in ref_grads.values()), 1e-30)) ** 0.5
        worst = sorted(((float((grads[k] - ref_grads[k]).abs().max() / (ref_grads[k].abs().max() + 1e-12)), k)
                        for k in ref_grads if ref_grads[k].abs().max() > 0), reverse=True)[:3]
        results[name] = {
            "worst_grads": worst,
            "losses": losses, "ref_losses": ref_losses, "grad_norms": norms, "ref_grad_norms": ref_norms,
            "loss_rel": max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses)),
            "grad_rel": grad_rel,
            # this rank's bytes over the single process's, per kind
            "checkpoint": checkpoint,
            "zero_grad_max": zero_grad_max, "n_zero_grads": n_zero_grads, "grad_l2_rel": grad_l2_rel,
            "memory_ratio": {k: memory[k] / ref_memory[k] for k in memory if ref_memory[k]}, "grad_abs": grad_abs, "n_grads": len(grads),
        }
        dist.barrier()
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


if __name__ == "__main__":
    main()
