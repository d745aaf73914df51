"""The training loop: data -> model -> LM loss + MoE aux -> AdamW -> metrics and checkpoints.

One process or many (torchrun): rank 0 alone logs and writes; every rank holds the same global
batch stream and keeps its data-parallel rows; checkpoints hold full tensors under full-model
names, so a run saved under one layout resumes under another.

`Trainer` reads top to bottom as a run does: set-up (config, tokenizer, model, layout, optimizer,
loaders, resume), then per step: train, log (metrics.jsonl, dashboards), validate, checkpoint; then the
summary and plots/.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from omegaconf import OmegaConf

from scifm.config import RunConfig
from scifm.core.checkpoint_files import latest_checkpoint
from scifm.core.device import autocast_for
from scifm.core.errors import CheckpointError, ScifmError
from scifm.core.host_memory import keep_freed_host_memory
from scifm.core.python_gc import freeze_set_up_objects
from scifm.data.indexed.files import indexed_tokenizer
from scifm.data.loader import PackedLoader
from scifm.data.packing import IGNORE_INDEX, Batch
from scifm.data.prefetch import training_loader
from scifm.data.streams import resolve_sources
from scifm.data.tokenizer_training import train_tokenizer
from scifm.hf.pretrained import (
    exported_tokenizer,
    init_from_dir,
    load_pretrained,
    pretrained_prose,
)
from scifm.model.init import init_parameters
from scifm.model.multimodal import ScientificMoE, vocab_sizes_of
from scifm.model.transformer import count_params, moe_layers
from scifm.parallel.distributed import DistContext, init_distributed, shutdown
from scifm.parallel.deepspeed_engine import initialize_deepspeed
from scifm.parallel.fp8 import apply_fp8
from scifm.parallel.megatron_engine import initialize_megatron
from scifm.parallel.memory import memory_report, step_peak_bytes
from scifm.parallel.parallelize import parallelize
from scifm.tokenizers import ScientificTokenizer
from scifm.train.checkpoint import (
    check_compatible,
    load_tokenizer,
    load_train_state,
    PendingCheckpoint,
    prune_checkpoints,
    resolve_checkpoint,
    start_checkpoint,
)
from scifm.train.dashboards import Dashboards
from scifm.train.metrics import MetricsLogger
from scifm.train.optim import build_optimizer, build_scheduler, saved_hyperparameters
from scifm.train.plots import write_plots
from scifm.train.prework import check_before_work
from scifm.train.preemption import REQUEUE_EXIT_CODE, Preempted, PreemptionWatch, exit_for_requeue
from scifm.train.profiling import StepProfiler
from scifm.train.sharded_state import async_save_groups, load_sharded, read_full_tensors, saved_names
from scifm.train.step import (
    Evaluation,
    apply_update,
    discard_update,
    evaluate,
    scaled_cross_entropy,
    train_step,
)


def train(cfg: RunConfig, run_dir: Path) -> dict:
    """Runs `cfg` in `run_dir`; returns the summary. Leaves with the requeue exit code when pre-empted."""
    t_start = time.perf_counter()
    device = check_before_work(cfg)
    ctx = init_distributed(cfg.parallel, cfg.model, device)
    watch = PreemptionWatch()  # after the layout checks: a rejected layout leaves no handlers behind
    try:
        trainer = Trainer(cfg, ctx.same_path_everywhere(run_dir), ctx)
        try:
            return trainer.run(watch, t_start)
        finally:
            trainer.loader.close()  # stops its worker process, also where the process leaves by os._exit
    except Preempted:
        pass  # checkpointed; the process leaves below with the code the Slurm job requeues on
    finally:
        watch.restore()
        shutdown(ctx)
    exit_for_requeue()


class TrainingDiverged(ScifmError):
    """Too many steps with a non-finite loss or gradient."""


@dataclass
class StepResult:
    """What one optimizer step measured, counted once here for logging and the summary."""

    loss: float
    grad_norm: float
    tokens: int  # real (non-padding) input tokens of the global step
    seconds: float
    moe_stats: list[dict]  # per MoE layer of this rank, from the step's last micro-batch
    update_skipped: bool = False  # the loss or a gradient was not finite


class Trainer:
    def __init__(self, cfg: RunConfig, run_dir: Path, ctx: DistContext):
        self.cfg, self.tc, self.run_dir, self.ctx = cfg, cfg.trainer, run_dir, ctx
        if ctx.device.type == "cpu":  # each step's tensors reuse the last step's memory (core/host_memory.py)
            keep_freed_host_memory()
        self.config_yaml = OmegaConf.to_yaml(OmegaConf.structured(cfg))
        if ctx.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(self.config_yaml)
        torch.manual_seed(self.tc.seed)
        self.specs = resolve_sources(cfg.data)
        ckpt = resolve_checkpoint(cfg.resume, run_dir) if cfg.resume else None
        self.resumed_from = ckpt  # checkpoint retention never deletes it
        self.tokenizer = self._tokenizer(ckpt)
        self._build_model()
        self._build_loaders()
        self.step, self.tokens_seen = 0, 0
        # this rank's counts of training targets; summed over ranks when read
        self.unigram_counts = torch.zeros(self.vocab, dtype=torch.float64)
        if ckpt is not None:
            self._resume(ckpt)
        self.start_step = self.step  # memory.json is measured at this process's first step
        self.nonfinite_steps: list[int] = []  # steps whose update was skipped
        self.nonfinite_in_row = 0
        self.reloads = 0  # of the last checkpoint after nonfinite_reload_after such steps in a row
        self.pending: PendingCheckpoint | None = None  # a save whose shards may still be in flight
        # background writes synchronise on their own groups, never interleaved with training's collectives
        self.async_groups = async_save_groups(ctx.distributed) if self.tc.async_checkpoint else None
        freeze_set_up_objects()  # a loader on this thread makes objects by the thousand (core/python_gc.py)

    # --- set-up -----------------------------------------------------------------------------

    def _tokenizer(self, ckpt: Path | None) -> ScientificTokenizer:
        """From the checkpoint when resuming; else trained once by rank 0 and loaded by the others."""
        if ckpt is not None:
            return load_tokenizer(ckpt)
        if self.ctx.is_main:
            self._new_tokenizer().save(self.run_dir / "tokenizer")
        self.ctx.barrier()
        return ScientificTokenizer.load(self.run_dir / "tokenizer")

    def _new_tokenizer(self) -> ScientificTokenizer:
        """Trained on the run's sources; with model.init_from the prose part is the pretrained one
        (and an exported scifm model brings its whole tokenizer). Indexed sources bring the tokenizer
        their ids were written with."""
        hf_dir = init_from_dir(self.cfg.model)
        if hf_dir is None:
            indexed = indexed_tokenizer([s.index for s in self.specs if s.index is not None])
            return indexed or train_tokenizer(self.specs, self.cfg.data)
        return exported_tokenizer(hf_dir) or train_tokenizer(self.specs, self.cfg.data, pretrained_prose(hf_dir))

    def _build_model(self) -> None:
        cfg, tc, ctx = self.cfg, self.tc, self.ctx
        model = ScientificMoE(cfg.model, vocab_sizes_of(self.tokenizer))
        init_parameters(model, tc.seed, cfg.model.init_std, cfg.model.n_layers)
        hf_dir = init_from_dir(cfg.model)
        if hf_dir is not None and self.resumed_from is None:  # a resumed run has the checkpoint's weights
            line = load_pretrained(model, hf_dir)
            if ctx.is_main:
                print(line, flush=True)
        self.total_params, self.active_params = count_params(model, cfg.model)
        self.full_shapes = {k: v.shape for k, v in saved_names(model.state_dict()).items()}
        self.vocab = model.output.out_features
        model, autocast = model.to(ctx.device), autocast_for(tc.precision, ctx.device)
        self.fp8 = None
        if tc.precision == "fp8":  # before any sharding: the layers are swapped whole
            fsdp = cfg.parallel.engine == "native" and ctx.dims.fsdp and ctx.dims.tp == 1
            self.fp8 = apply_fp8(model, tc.fp8, ctx.device, fsdp)
            autocast = self.fp8.forward_context(autocast)
            if ctx.is_main:
                print(self.fp8.describe(), flush=True)
        if cfg.parallel.engine == "deepspeed":
            # DeepSpeed partitions the optimizer built over the model's (whole, or expert-parallel) parameters
            self.runner = initialize_deepspeed(
                model, ctx, cfg.parallel, partial(build_optimizer, cfg=tc), partial(build_scheduler, cfg=tc),
                micro_batch=tc.batch_size, grad_accum=tc.grad_accum, grad_clip=tc.grad_clip,
                loss_fn=scaled_cross_entropy, autocast=autocast)
            self.model, self.optimizer, self.scheduler = self.runner.model, self.runner.optimizer, self.runner.scheduler
        elif cfg.parallel.engine == "megatron":
            # the decoder moves into Megatron's GPTModel; the optimizer is built over the result
            self.runner = initialize_megatron(model, ctx, cfg.parallel, scaled_cross_entropy, autocast,
                                              partial(build_optimizer, cfg=tc))
            self.model, self.optimizer = self.runner.model, self.runner.optimizer
            self.scheduler = build_scheduler(self.optimizer, tc)
        else:
            self.runner = parallelize(model, ctx, cfg.parallel, scaled_cross_entropy, autocast)
            self.model = self.runner.model  # this rank's (sharded) modules
            self.optimizer = build_optimizer(self.model, tc)
            self.scheduler = build_scheduler(self.optimizer, tc)
        self.moes = moe_layers(self.model)
        for m in self.moes:
            m.aux_grad_scale = 1.0 / tc.grad_accum

    def _build_loaders(self) -> None:
        cfg, ctx = self.cfg, self.ctx
        common = dict(batch_size=self.tc.batch_size, dp_rank=ctx.dp_rank, dp_size=ctx.dims.dp_size)
        self.loader = training_loader(cfg.data, self.specs, self.tokenizer, cfg.model.encoders, seed=self.tc.seed,
                                      **common)
        val_loader = PackedLoader(cfg.data, self.specs, self.tokenizer, cfg.model.encoders, split="validation",
                                  seed=self.tc.seed + 1, **common)
        self.val_batches = [val_loader.next_batch() for _ in range(cfg.data.val_batches)]
        # every rank builds every row (and keeps its own), so these are the same names on every rank
        self.val_sources, self.val_skills = sorted(val_loader.tokens_by_source), sorted(val_loader.tokens_by_skill)

    def _resume(self, ckpt: Path) -> None:
        """Every file is checked before any state changes; then the loader, weights, optimizer, RNG."""
        check_compatible(ckpt, self.full_shapes)
        state, loader_state = load_train_state(ckpt)
        try:
            self.loader.load_state_dict(loader_state)
        except (KeyError, IndexError, TypeError, ValueError, StopIteration) as err:
            raise CheckpointError(f"{ckpt / 'loader.json'}: not a state of this run's data loader "
                                  f"({type(err).__name__}: {err}); the checkpoint is damaged") from None
        self._load_weights_optimizer_schedule(ckpt, state)
        torch.set_rng_state(state["torch_rng"])
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        if self.ctx.is_main:  # the saved counts are global: one rank carries them on
            self.unigram_counts = state["unigram_counts"]
            print(f"resumed from {ckpt} at step {self.step}", flush=True)

    def _load_weights_optimizer_schedule(self, ckpt: Path, state: dict) -> None:
        """What both a resume and a reload after non-finite steps take from a checkpoint."""
        hyperparameters = saved_hyperparameters(state["optimizer_param_groups"])
        if self.runner.gathers_checkpoint:
            self.runner.load_checkpoint_states(partial(read_full_tensors, ckpt), hyperparameters)
        else:
            load_sharded(ckpt, self.model, self.optimizer, hyperparameters)
        self.runner.load_scheduler_state(self.scheduler, state["scheduler"])

    # --- the loop ---------------------------------------------------------------------------

    def run(self, watch: PreemptionWatch, t_start: float) -> dict:
        cfg, tc, ctx = self.cfg, self.tc, self.ctx
        logger = None
        if ctx.is_main:
            print(f"model {cfg.model.name}: {self.total_params / 1e6:.2f}M parameters, "
                  f"{self.active_params / 1e6:.2f}M active per token; vocabulary {self.vocab}; "
                  f"{ctx.world_size} process(es) on {ctx.device}, layout {ctx.dims}", flush=True)
            run_config = OmegaConf.to_container(OmegaConf.structured(cfg))  # a W&B run's config
            logger = MetricsLogger(self.run_dir, tc.max_steps, self.start_step,
                                   Dashboards(tc, self.run_dir, self.start_step, run_config))
        try:
            last_eval = self.train_steps(watch, logger)
        finally:
            if logger is not None:  # a run that stops early (pre-emption, divergence) leaves whole dashboard files
                logger.close()
        if self.step == 0 and tc.saves_checkpoint_at(0):  # max_steps=0: the initial weights, an untrained baseline
            self.checkpoint()
        self.wait_for_checkpoint()
        # resumed at max_steps, or max_steps=0: nothing trained, still report
        return self.finish(last_eval or self.validate(), t_start)

    def train_steps(self, watch: PreemptionWatch, logger: MetricsLogger | None) -> Evaluation | None:
        """Up to trainer.max_steps: train, log, validate, checkpoint; returns the last validation."""
        tc, last_eval = self.tc, None
        self.model.train()
        memory_step = self.start_step + 1 if self.ctx.device.type == "cpu" else None  # step_peak_bytes' profiler
        profiler = StepProfiler(tc.profile, self.run_dir, self.ctx.rank, self.ctx.device, memory_step)
        try:  # a run that stops early still writes the steps it profiled
            while self.step < tc.max_steps:
                with profiler.step(self.step + 1):
                    result = self.train_one_step()
                at_end = self.step == tc.max_steps
                evaluation = self.validate() if self.step % tc.val_every == 0 or at_end else None
                if evaluation is not None or self.step % tc.log_every == 0:
                    self.log(result, evaluation, logger)
                last_eval = evaluation or last_eval
                checkpointed = tc.saves_checkpoint_at(self.step)
                if checkpointed:
                    self.checkpoint()
                if not at_end and watch.requested(self.ctx):
                    self._stop_for_preemption(watch, checkpointed)
        finally:
            profiler.close()
        return last_eval

    def train_one_step(self) -> StepResult:
        t0 = time.perf_counter()
        micro = [self.loader.next_batch() for _ in range(self.tc.grad_accum)]
        tokens = self._count_targets_and_tokens(micro)
        first = self.step == self.start_step  # memory.json's step: measured once, in this process's first step
        with step_peak_bytes(self.ctx.device) if first else contextlib.nullcontext({}) as peak:
            loss, grad_norm = train_step(self.runner, micro, self.ctx, self.tc.grad_clip)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):  # the same verdict on every rank
            moe_stats = discard_update(self.optimizer, self.moes)
            self.step += 1
            self._after_nonfinite_step(loss, grad_norm)
            return StepResult(loss, grad_norm, tokens, time.perf_counter() - t0, moe_stats, update_skipped=True)
        self.nonfinite_in_row = 0
        with_grads = memory_report(self.model, self.optimizer) if first else None
        moe_stats = apply_update(self.optimizer, self.scheduler, self.moes, self.runner.applies_update)
        if self.fp8 is not None:
            self.fp8.after_update(self.model)
        if with_grads is not None:  # optimizer state exists only after the first update
            self._write_memory_report(memory_report(self.model, self.optimizer) | {"grad_bytes": with_grads["grad_bytes"]}
                                      | peak)
        self.step += 1
        self.tokens_seen += tokens
        return StepResult(loss, grad_norm, tokens, time.perf_counter() - t0, moe_stats)

    def _count_targets_and_tokens(self, micro: list[Batch]) -> int:
        """Adds the step's targets to this rank's unigram counts; returns the global step's real tokens."""
        for batch in micro:
            labels = batch.labels[batch.labels != IGNORE_INDEX]
            self.unigram_counts += torch.bincount(labels, minlength=self.vocab).double()
        mine = torch.tensor(sum(int((b.doc_ids >= 0).sum()) for b in micro))
        return int(self.ctx.all_reduce_sum(mine))

    def log(self, result: StepResult, evaluation: Evaluation | None, logger: MetricsLogger | None) -> None:
        moe_stats = self.runner.gather_moe_stats(result.moe_stats)  # collective: every stage's layers
        if logger is None:
            return
        record = {
            "step": self.step,
            "loss": result.loss,
            "aux_loss": float(sum(s["load_balance_loss"] + s["z_loss"] for s in moe_stats)),
            "tokens_per_s": result.tokens / result.seconds,
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": result.grad_norm,
            "tokens_seen": self.tokens_seen,
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
        if result.update_skipped:
            record["update_skipped"] = True
        if evaluation is not None:
            record["val_loss"] = evaluation.val_loss
            record["val_loss_by_source"] = evaluation.by_source
            record["val_loss_by_skill"] = evaluation.by_skill
            record["tokens_by_source"] = dict(self.loader.tokens_by_source)
            record["tokens_by_skill"] = dict(self.loader.tokens_by_skill)
        logger.log(record)

    def validate(self) -> Evaluation:
        return evaluate(self.runner, self.val_batches, self._global_unigram(), self.ctx, self.val_sources,
                        self.val_skills)

    def checkpoint(self) -> None:
        """Collective: every rank writes its shards of step_N; rank 0 the rest. With
        trainer.async_checkpoint the shards are written in the background while training goes on,
        and the checkpoint becomes step_N (meta.json, rename) when the next save, the end of the
        run or a pre-emption waits for it."""
        train_state = {
            "scheduler": self.runner.scheduler_state(self.scheduler),
            "torch_rng": torch.get_rng_state(),
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "unigram_counts": self._global_unigram(),
        }
        self.wait_for_checkpoint()  # one save in flight at a time
        self.pending = start_checkpoint(
            self.run_dir / "checkpoints", self.step, model=self.model, optimizer=self.optimizer, ctx=self.ctx,
            train_state=train_state, loader_state=self.loader.state_dict(), tokenizer=self.tokenizer,
            config_yaml=self.config_yaml, skipped=self.loader.skips.as_dict(),
            async_groups=self.async_groups,
            states=self.runner.checkpoint_states() if self.runner.gathers_checkpoint else None,
        )
        if not self.tc.async_checkpoint:
            self.wait_for_checkpoint()

    def wait_for_checkpoint(self) -> None:
        """Collective: completes the save in flight, if any, then applies checkpoint retention."""
        if self.pending is None:
            return
        pending, self.pending = self.pending, None
        pending.finish()
        if self.ctx.is_main:
            prune_checkpoints(self.run_dir / "checkpoints", self.tc.keep_last, self.tc.keep_every, self.resumed_from)

    def finish(self, last_eval: Evaluation, t_start: float) -> dict:
        summary = {
            "steps": self.step,
            "final_val_loss": last_eval.val_loss,
            "unigram_val_loss": last_eval.unigram_val_loss,
            "val_loss_vs_unigram": last_eval.val_loss / last_eval.unigram_val_loss,
            "total_params": self.total_params,
            "active_params": self.active_params,
            "tokens_seen": self.tokens_seen,
            "wall_seconds": time.perf_counter() - t_start,
            "world_size": self.ctx.world_size,
            "tokens_by_source": dict(self.loader.tokens_by_source),
            "tokens_by_skill": dict(self.loader.tokens_by_skill),
            "skipped": self.loader.skips.as_dict(),
            "nonfinite_steps": self.nonfinite_steps,
            "nonfinite_reloads": self.reloads,
            "checkpoint": str(latest_checkpoint(self.run_dir / "checkpoints")),
        }
        if self.fp8 is not None:
            summary["fp8"] = {"backend": self.fp8.backend, "recipe": self.fp8.recipe, "linear_layers": len(self.fp8.linears),
                              "expert_blocks": len(self.fp8.experts), "experts_kernels": self.fp8.experts_kernels(),
                              "high_precision_misfits": self.fp8.misfits,
                              "fsdp_float8_all_gather": self.fp8.fsdp_float8_all_gather}
        if self.ctx.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            write_plots(self.run_dir)
            print(
                f"final validation loss {summary['final_val_loss']:.4f} vs unigram {summary['unigram_val_loss']:.4f} "
                f"({1 - summary['val_loss_vs_unigram']:.1%} below); {self.step} steps in "
                f"{summary['wall_seconds']:.0f} s; run directory {self.run_dir}",
                flush=True,
            )
        return summary

    # --- non-finite steps -------------------------------------------------------------------

    def _after_nonfinite_step(self, loss: float, grad_norm: float) -> None:
        """Counted and reported; `trainer.nonfinite_reload_after` in a row reload the last checkpoint's
        weights, optimizer and schedule (the data moves on past the batches that diverged; under DeepSpeed,
        which has applied the update before its norm is known, at once); more than
        `trainer.max_nonfinite_steps` in all stop the run."""
        tc = self.tc
        self.nonfinite_steps.append(self.step)
        self.nonfinite_in_row += 1
        if self.ctx.is_main:
            verdict = "undone by reloading" if self.runner.applies_update else "skipped"
            print(f"step {self.step}: loss {loss} / gradient norm {grad_norm} not finite; update {verdict} "
                  f"({len(self.nonfinite_steps)} such steps, {self.nonfinite_in_row} in a row)", flush=True)
        if len(self.nonfinite_steps) > tc.max_nonfinite_steps:
            raise TrainingDiverged(
                f"{len(self.nonfinite_steps)} steps with a non-finite loss or gradient (trainer.max_nonfinite_steps="
                f"{tc.max_nonfinite_steps}), at steps {self.nonfinite_steps[:10]}; the last checkpoint is "
                f"{latest_checkpoint(self.run_dir / 'checkpoints')}; lower trainer.lr or raise trainer.warmup_steps")
        # an engine that steps inside clip_grad_norm (DeepSpeed) has applied the bad update already
        reload_after = 1 if self.runner.applies_update else tc.nonfinite_reload_after
        if reload_after and self.nonfinite_in_row >= reload_after:
            self._reload_last_checkpoint()

    def _reload_last_checkpoint(self) -> None:
        self.wait_for_checkpoint()
        ckpt = latest_checkpoint(self.run_dir / "checkpoints")
        if ckpt is None:
            raise TrainingDiverged(f"{self.nonfinite_in_row} steps in a row with a non-finite loss or gradient "
                                   f"before any checkpoint, at steps {self.nonfinite_steps[-self.nonfinite_in_row:]}")
        self._load_weights_optimizer_schedule(ckpt, load_train_state(ckpt)[0])
        self.reloads += 1
        self.nonfinite_in_row = 0
        if self.ctx.is_main:
            print(f"step {self.step}: reloaded the weights, optimizer and schedule of {ckpt}", flush=True)

    # --- helpers ----------------------------------------------------------------------------

    def _global_unigram(self) -> torch.Tensor:
        return self.ctx.all_reduce_sum(self.unigram_counts.clone())

    def _stop_for_preemption(self, watch: PreemptionWatch, checkpointed: bool) -> None:
        if not checkpointed:
            self.checkpoint()
        self.wait_for_checkpoint()
        if self.ctx.is_main:
            cause = watch.received.name if watch.received else "a signal on another rank"
            print(f"pre-empted by {cause}: checkpoint of step {self.step} written; exiting with code "
                  f"{REQUEUE_EXIT_CODE} (a Slurm job requeues on it)", flush=True)
        raise Preempted

    def _write_memory_report(self, report: dict) -> None:
        """Rank 0 writes every rank's parameter, gradient and optimizer-state bytes and its first step's peak."""
        reports = [report]
        if self.ctx.distributed:
            reports = [None] * self.ctx.world_size
            torch.distributed.all_gather_object(reports, report)
        if self.ctx.is_main:
            text = json.dumps({f"rank{r}": rep for r, rep in enumerate(reports)}, indent=2) + "\n"
            (self.run_dir / "memory.json").write_text(text)
