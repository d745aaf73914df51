"""The training loop: data -> model -> LM loss + MoE aux -> AdamW -> metrics and checkpoints."""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from scifm.config import RunConfig
from scifm.data.loader import PackedLoader
from scifm.data.packing import IGNORE_INDEX, Batch
from scifm.data.sources import resolve_sources
from scifm.data.tokenizer_training import train_tokenizer
from scifm.model.init import init_parameters
from scifm.model.multimodal import ScientificMoE, vocab_sizes_of
from scifm.model.transformer import count_params, moe_layers
from scifm.tokenizers import ScientificTokenizer
from scifm.train.checkpoint import (
    latest_checkpoint,
    load_model_weights,
    load_train_state,
    resolve_checkpoint,
    save_checkpoint,
)
from scifm.train.metrics import MetricsLogger
from scifm.train.optim import build_optimizer, build_scheduler


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from scifm.errors import ConfigError

        raise ConfigError("trainer.device: cuda was asked for but no CUDA device is available")
    return torch.device(name)


def autocast_for(precision: str, device: torch.device):
    """bf16 autocast where asked (or, with auto, on a GPU that supports it); fp32 otherwise."""
    use_bf16 = precision == "bf16" or (
        precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    )
    if use_bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lm_loss_sum(model: ScientificMoE, batch: Batch, autocast) -> torch.Tensor:
    with autocast:
        logits_BSV = model(batch.input_ids, batch.positions, batch.doc_ids, batch.items, batch.slot_index)
    return F.cross_entropy(
        logits_BSV.float().flatten(0, 1), batch.labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


@dataclass
class Evaluation:
    val_loss: float
    unigram_val_loss: float


@torch.no_grad()
def evaluate(model, val_batches: list[Batch], unigram_counts: torch.Tensor, autocast, device) -> Evaluation:
    model.eval()
    total, n = 0.0, 0
    log_p = torch.log((unigram_counts + 1.0) / (unigram_counts.sum() + unigram_counts.numel()))
    uni_total = 0.0
    for batch in val_batches:
        batch = batch.to(device)
        total += float(lm_loss_sum(model, batch, autocast))
        targets = batch.labels[batch.labels != IGNORE_INDEX]
        uni_total += float(-log_p.to(device)[targets].sum())
        n += targets.numel()
    model.train()
    return Evaluation(total / max(n, 1), uni_total / max(n, 1))


def train(cfg: RunConfig, run_dir: Path) -> dict:
    t_start = time.perf_counter()
    cfg.validate()
    tc = cfg.trainer
    run_dir.mkdir(parents=True, exist_ok=True)
    config_yaml = OmegaConf.to_yaml(OmegaConf.structured(cfg))
    (run_dir / "config.yaml").write_text(config_yaml)
    device = pick_device(tc.device)
    autocast = autocast_for(tc.precision, device)
    torch.manual_seed(tc.seed)

    specs = resolve_sources(cfg.data)
    ckpt = resolve_checkpoint(cfg.resume, run_dir) if cfg.resume else None
    if ckpt is not None:
        tokenizer = ScientificTokenizer.load(ckpt / "tokenizer")
    else:
        tokenizer = train_tokenizer(specs, cfg.data)
        tokenizer.save(run_dir / "tokenizer")

    model = ScientificMoE(cfg.model, vocab_sizes_of(tokenizer))
    init_parameters(model, tc.seed, cfg.model.init_std, cfg.model.n_layers)
    model.to(device)
    total_params, active_params = count_params(model, cfg.model)
    optimizer = build_optimizer(model, tc)
    scheduler = build_scheduler(optimizer, tc)

    loader = PackedLoader(cfg.data, specs, tokenizer, cfg.model.encoders, split="train",
                          batch_size=tc.batch_size, seed=tc.seed)
    val_loader = PackedLoader(cfg.data, specs, tokenizer, cfg.model.encoders, split="validation",
                              batch_size=tc.batch_size, seed=tc.seed + 1)
    val_batches = [val_loader.next_batch() for _ in range(cfg.data.val_batches)]
    vocab = model.output.out_features
    unigram_counts = torch.zeros(vocab, dtype=torch.float64)
    step, tokens_seen = 0, 0

    if ckpt is not None:
        load_model_weights(model, ckpt)
        state, loader_state = load_train_state(ckpt)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        loader.load_state_dict(loader_state)
        step, tokens_seen = int(state["step"]), int(state["tokens_seen"])
        unigram_counts = state["unigram_counts"]
        print(f"resumed from {ckpt} at step {step}", flush=True)

    def checkpoint() -> Path:
        train_state = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "step": step,
            "tokens_seen": tokens_seen,
            "unigram_counts": unigram_counts,
        }
        return save_checkpoint(
            run_dir / "checkpoints", step, model=model, train_state=train_state,
            loader_state=loader.state_dict(), tokenizer=tokenizer, config_yaml=config_yaml,
            skipped=loader.skips.as_dict(),
        )

    logger = MetricsLogger(run_dir, tc.max_steps, step)
    print(f"model {cfg.model.name}: {total_params / 1e6:.2f}M parameters, {active_params / 1e6:.2f}M active "
          f"per token; vocabulary {vocab}; device {device}", flush=True)
    last_eval: Evaluation | None = None
    moes = moe_layers(model)
    for m in moes:
        m.aux_grad_scale = 1.0 / tc.grad_accum
    model.train()
    while step < tc.max_steps:
        t_step = time.perf_counter()
        micro = [loader.next_batch() for _ in range(tc.grad_accum)]
        n_targets = sum(b.n_targets for b in micro)
        step_tokens = sum(int((b.doc_ids >= 0).sum()) for b in micro)
        loss_total = 0.0
        for batch in micro:
            labels = batch.labels[batch.labels != IGNORE_INDEX]
            unigram_counts += torch.bincount(labels, minlength=vocab).double()
            batch = batch.to(device)
            # normalised by the step's total target count, so accumulation splits change nothing
            loss = lm_loss_sum(model, batch, autocast) / max(n_targets, 1)
            loss.backward()
            loss_total += float(loss.detach())
        grad_norm = torch.nn.utils.clip_grad_norm_(
            model.parameters(), tc.grad_clip if tc.grad_clip > 0 else math.inf
        )
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        moe_stats = [dict(m.last_stats) for m in moes]
        for m in moes:
            m.update_bias(m.pop_tokens_per_expert())
        step += 1
        tokens_seen += step_tokens

        at_end = step == tc.max_steps
        if step % tc.log_every == 0 or at_end or step % tc.val_every == 0:
            record = {
                "step": step,
                "loss": loss_total,
                "aux_loss": float(sum(s["load_balance_loss"] + s["z_loss"] for s in moe_stats)),
                "tokens_per_s": step_tokens / (time.perf_counter() - t_step),
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm),
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
            if step % tc.val_every == 0 or at_end:
                last_eval = evaluate(model, val_batches, unigram_counts, autocast, device)
                record["val_loss"] = last_eval.val_loss
                record["tokens_by_source"] = dict(loader.tokens_by_source)
                record["tokens_by_skill"] = dict(loader.tokens_by_skill)
            logger.log(record)
        if (tc.ckpt_every and step % tc.ckpt_every == 0) or at_end:
            checkpoint()

    if last_eval is None:  # resumed at max_steps: nothing trained, still report
        last_eval = evaluate(model, val_batches, unigram_counts, autocast, device)
    summary = {
        "steps": step,
        "final_val_loss": last_eval.val_loss,
        "unigram_val_loss": last_eval.unigram_val_loss,
        "val_loss_vs_unigram": last_eval.val_loss / last_eval.unigram_val_loss,
        "total_params": total_params,
        "active_params": active_params,
        "tokens_seen": tokens_seen,
        "wall_seconds": time.perf_counter() - t_start,
        "tokens_by_source": dict(loader.tokens_by_source),
        "tokens_by_skill": dict(loader.tokens_by_skill),
        "skipped": loader.skips.as_dict(),
        "checkpoint": str(latest_checkpoint(run_dir / "checkpoints")),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"final validation loss {summary['final_val_loss']:.4f} vs unigram {summary['unigram_val_loss']:.4f} "
        f"({1 - summary['val_loss_vs_unigram']:.1%} below); {step} steps in {summary['wall_seconds']:.0f} s; "
        f"run directory {run_dir}",
        flush=True,
    )
    return summary
