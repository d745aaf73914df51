"""The training loop: data -> model -> LM loss + MoE aux -> AdamW -> metrics and checkpoints.

One process or many (torchrun): rank 0 alone logs and writes; every rank holds the same global
batch stream and keeps its data-parallel rows; checkpoints hold full tensors under full-model
names, so a run saved under one layout resumes under another.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from scifm.config import RunConfig
from scifm.data.loader import PackedLoader
from scifm.data.packing import IGNORE_INDEX
from scifm.data.sources import resolve_sources
from scifm.data.tokenizer_training import train_tokenizer
from scifm.errors import ConfigError
from scifm.model.init import init_parameters
from scifm.model.multimodal import ScientificMoE, vocab_sizes_of
from scifm.model.transformer import count_params, moe_layers
from scifm.parallel.distributed import DistContext, init_distributed, shutdown
from scifm.parallel.memory import memory_report
from scifm.parallel.parallelize import parallelize
from scifm.parallel.pipeline import MicroBatches, PipelinedModel
from scifm.tokenizers import ScientificTokenizer
from scifm.train.checkpoint import (
    check_compatible,
    latest_checkpoint,
    load_train_state,
    resolve_checkpoint,
    save_checkpoint,
)
from scifm.train.metrics import MetricsLogger
from scifm.train.preemption import REQUEUE_EXIT_CODE, Preempted, PreemptionWatch, exit_for_requeue
from scifm.train.sharded_state import load_sharded
from scifm.train.optim import build_optimizer, build_scheduler
from scifm.train.step import Evaluation, apply_update, autocast_for, evaluate, scaled_cross_entropy, train_step

def check_device(name: str) -> None:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device: cuda was asked for but no CUDA device is available")


def write_memory_report(path: Path, report: dict, ctx: DistContext) -> None:
    """Rank 0 writes every rank's parameter, gradient and optimizer-state bytes."""
    reports = [report]
    if ctx.distributed:
        reports = [None] * ctx.world_size
        torch.distributed.all_gather_object(reports, report)
    if ctx.is_main:
        path.write_text(json.dumps({f"rank{r}": rep for r, rep in enumerate(reports)}, indent=2) + "\n")


def run_tokenizer(cfg: RunConfig, specs, ckpt: Path | None, run_dir: Path, ctx: DistContext) -> ScientificTokenizer:
    """From the checkpoint when resuming; else trained once by rank 0 and loaded by the others."""
    if ckpt is not None:
        return ScientificTokenizer.load(ckpt / "tokenizer")
    if ctx.is_main:
        train_tokenizer(specs, cfg.data).save(run_dir / "tokenizer")
    ctx.barrier()
    return ScientificTokenizer.load(run_dir / "tokenizer")


def train(cfg: RunConfig, run_dir: Path) -> dict:
    t_start = time.perf_counter()
    cfg.validate()
    tc = cfg.trainer
    check_device(tc.device)
    watch = PreemptionWatch()
    ctx = init_distributed(cfg.parallel, cfg.model, tc.device)
    run_dir = ctx.same_path_everywhere(run_dir)
    try:
        return _train(cfg, run_dir, ctx, t_start, watch)
    except Preempted:
        pass  # checkpointed; the process leaves below with the code the Slurm job requeues on
    finally:
        watch.restore()
        shutdown(ctx)
    exit_for_requeue()


def _train(cfg: RunConfig, run_dir: Path, ctx: DistContext, t_start: float, watch: PreemptionWatch) -> dict:
    tc = cfg.trainer
    config_yaml = OmegaConf.to_yaml(OmegaConf.structured(cfg))
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(config_yaml)
    autocast = autocast_for(tc.precision, ctx.device)
    torch.manual_seed(tc.seed)

    specs = resolve_sources(cfg.data)
    ckpt = resolve_checkpoint(cfg.resume, run_dir) if cfg.resume else None
    tokenizer = run_tokenizer(cfg, specs, ckpt, run_dir, ctx)

    model = ScientificMoE(cfg.model, vocab_sizes_of(tokenizer))
    init_parameters(model, tc.seed, cfg.model.init_std, cfg.model.n_layers)
    total_params, active_params = count_params(model, cfg.model)
    full_shapes = {k: v.shape for k, v in model.state_dict().items()}
    vocab = model.output.out_features
    micro_batches = MicroBatches(tc.grad_accum, tc.batch_size // ctx.dims.dp_size, cfg.data.seq_len,
                                 scaled_cross_entropy)
    model = parallelize(model.to(ctx.device), ctx, cfg.parallel, micro_batches)
    pipelined = isinstance(model, PipelinedModel)
    optimizer = build_optimizer(model, tc)
    scheduler = build_scheduler(optimizer, tc)

    loader_args = dict(batch_size=tc.batch_size, dp_rank=ctx.dp_rank, dp_size=ctx.dims.dp_size)
    loader = PackedLoader(cfg.data, specs, tokenizer, cfg.model.encoders, split="train", seed=tc.seed, **loader_args)
    val_loader = PackedLoader(cfg.data, specs, tokenizer, cfg.model.encoders, split="validation",
                              seed=tc.seed + 1, **loader_args)
    val_batches = [val_loader.next_batch() for _ in range(cfg.data.val_batches)]
    # this rank's counts of training targets; summed over ranks when read
    unigram_counts = torch.zeros(vocab, dtype=torch.float64)
    step, tokens_seen = 0, 0

    if ckpt is not None:
        check_compatible(ckpt, full_shapes)
        state, loader_state = load_train_state(ckpt)
        load_sharded(ckpt, model, optimizer, state["optimizer_param_groups"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        loader.load_state_dict(loader_state)
        step, tokens_seen = int(state["step"]), int(state["tokens_seen"])
        if ctx.is_main:  # the saved counts are global: one rank carries them on
            unigram_counts = state["unigram_counts"]
        if ctx.is_main:
            print(f"resumed from {ckpt} at step {step}", flush=True)

    def global_unigram() -> torch.Tensor:
        return ctx.all_reduce_sum(unigram_counts.clone())

    def checkpoint() -> None:
        train_state = {
            "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "step": step,
            "tokens_seen": tokens_seen,
            "unigram_counts": global_unigram(),
        }
        save_checkpoint(
            run_dir / "checkpoints", step, model=model, optimizer=optimizer, ctx=ctx, train_state=train_state,
            loader_state=loader.state_dict(), tokenizer=tokenizer, config_yaml=config_yaml,
            skipped=loader.skips.as_dict(),
        )

    logger = MetricsLogger(run_dir, tc.max_steps, step) if ctx.is_main else None
    if ctx.is_main:
        print(f"model {cfg.model.name}: {total_params / 1e6:.2f}M parameters, {active_params / 1e6:.2f}M active "
              f"per token; vocabulary {vocab}; {ctx.world_size} process(es) on {ctx.device}, layout "
              f"{ctx.dims}", flush=True)
    last_eval: Evaluation | None = None
    start_step = step
    moes = moe_layers(model)
    for m in moes:
        m.aux_grad_scale = 1.0 / tc.grad_accum
    model.train()
    while step < tc.max_steps:
        t_step = time.perf_counter()
        micro = [loader.next_batch() for _ in range(tc.grad_accum)]
        for batch in micro:
            labels = batch.labels[batch.labels != IGNORE_INDEX]
            unigram_counts += torch.bincount(labels, minlength=vocab).double()
        step_tokens = int(ctx.all_reduce_sum(torch.tensor(sum(int((b.doc_ids >= 0).sum()) for b in micro))))
        loss, grad_norm = train_step(model, micro, ctx, autocast, tc.grad_clip)
        with_grads = memory_report(model, optimizer) if step == start_step else None
        moe_stats = apply_update(optimizer, scheduler, moes)
        if with_grads is not None:  # optimizer state exists only after the first update
            report = memory_report(model, optimizer) | {"grad_bytes": with_grads["grad_bytes"]}
            write_memory_report(run_dir / "memory.json", report, ctx)
        step += 1
        tokens_seen += step_tokens

        at_end = step == tc.max_steps
        validate_now = step % tc.val_every == 0 or at_end
        record = None
        if step % tc.log_every == 0 or validate_now:
            if pipelined:  # every stage's MoE layers, not only this rank's
                moe_stats = model.gather_layer_stats(moe_stats)
            record = {
                "step": step,
                "loss": loss,
                "aux_loss": float(sum(s["load_balance_loss"] + s["z_loss"] for s in moe_stats)),
                "tokens_per_s": step_tokens / (time.perf_counter() - t_step),
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": grad_norm,
                "tokens_seen": tokens_seen,
                "moe": [
                    {
                        "tokens_per_expert": s["tokens_per_expert"].tolist(),
                        "dropped_tokens": float(s["dropped_tokens"]),
                        "load_balance_loss": float(s["load_balance_loss"]),
                        "z_loss": float(s["z_loss"]),
                    }
                    for s in moe_stats
                ],
            }
        if validate_now:
            last_eval = evaluate(model, val_batches, global_unigram(), autocast, ctx)
            record["val_loss"] = last_eval.val_loss
            record["tokens_by_source"] = dict(loader.tokens_by_source)
            record["tokens_by_skill"] = dict(loader.tokens_by_skill)
        if record is not None and logger is not None:
            logger.log(record)
        checkpointed = tc.saves_checkpoint_at(step)
        if checkpointed:
            checkpoint()
        if not at_end and watch.requested(ctx):
            if not checkpointed:
                checkpoint()
            if ctx.is_main:
                cause = watch.received.name if watch.received else "a signal on another rank"
                print(f"pre-empted by {cause}: checkpoint of step {step} written; exiting with code "
                      f"{REQUEUE_EXIT_CODE} (a Slurm job requeues on it)", flush=True)
            raise Preempted

    if step == 0 and tc.saves_checkpoint_at(0):  # max_steps=0: the initial weights, an untrained baseline
        checkpoint()
    if last_eval is None:  # resumed at max_steps or max_steps=0: nothing trained, still report
        last_eval = evaluate(model, val_batches, global_unigram(), autocast, ctx)
    summary = {
        "steps": step,
        "final_val_loss": last_eval.val_loss,
        "unigram_val_loss": last_eval.unigram_val_loss,
        "val_loss_vs_unigram": last_eval.val_loss / last_eval.unigram_val_loss,
        "total_params": total_params,
        "active_params": active_params,
        "tokens_seen": tokens_seen,
        "wall_seconds": time.perf_counter() - t_start,
        "world_size": ctx.world_size,
        "tokens_by_source": dict(loader.tokens_by_source),
        "tokens_by_skill": dict(loader.tokens_by_skill),
        "skipped": loader.skips.as_dict(),
        "checkpoint": str(latest_checkpoint(run_dir / "checkpoints")),
    }
    if ctx.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(
            f"final validation loss {summary['final_val_loss']:.4f} vs unigram {summary['unigram_val_loss']:.4f} "
            f"({1 - summary['val_loss_vs_unigram']:.1%} below); {step} steps in {summary['wall_seconds']:.0f} s; "
            f"run directory {run_dir}",
            flush=True,
        )
    return summary
