"""Memory and time of the Hugging Face export and import of a scifm model, side by side in one run.

Writes an untrained checkpoint of the model config (default moe_1b, about 1B parameters) the way the
trainer does, then runs each operation in a fresh process, so each peak RSS is that operation's own:
  load    load_checkpoint_model: the whole model in memory (the baseline)
  export  export_hf in fp32, in shards of --max-shard-gb (it loads the checkpoint the same way first)
  import  the model built from pretrained_model_config(init_from=hf:OUT), then load_pretrained
Prints each one's time and peak RSS as ratios to the load and to the fp32 weight bytes, and checks
the claim that export streams shard by shard, never holding a second copy of the weights: export's
peak RSS above the load's, and the peak RSS of export's writing above its RSS once loaded (the load's
own transient peak can hide the writing's), must each stay under half of the weight bytes.
Peak RSS counts the pages of the safetensors files that load and import read through memory maps
(page cache, reclaimable); measured once for moe_1b, their peak anonymous memory was one copy.
Linux only (/proc). Run: python bench/hf_convert.py [--model moe_1b] [--max-shard-gb 1.0] [--keep DIR]
(moe_1b needs about 11 GiB of memory, for the checkpoint's save, and 7 GiB of disk.)
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import re
import resource
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TypeVar

import torch
from omegaconf import OmegaConf

import scifm.train.export as export_module
from scifm.config import RunConfig, compose_run_config
from scifm.hf.pretrained import exported_tokenizer, load_pretrained, pretrained_model_config
from scifm.model.config import ModelConfig
from scifm.model.init import init_parameters
from scifm.model.multimodal import ScientificMoE, vocab_sizes_of
from scifm.parallel.distributed import init_distributed
from scifm.tokenizers import ScientificTokenizer
from scifm.train.checkpoint import start_checkpoint
from scifm.train.export import export_hf, load_checkpoint_model
from scifm.train.optim import build_scheduler

T = TypeVar("T")
THRESHOLD = 0.5  # export's extra RSS, as a fraction of the fp32 weight bytes: well under a second copy


def write_checkpoint(cfg: RunConfig, root: Path) -> tuple[Path, int]:
    """(step_0 checkpoint of freshly initialised weights, parameter count), saved as the trainer saves
    at step 0 (max_steps=0), with a small tokenizer in place of the corpus one."""
    texts = [f"Sample {i}: the reaction at {i % 97} K gives {i * 7 % 113} mg of product." for i in range(400)]
    tokenizer = ScientificTokenizer.train(texts, vocab_size=1000)
    model = ScientificMoE(cfg.model, vocab_sizes_of(tokenizer))
    init_parameters(model, cfg.trainer.seed, cfg.model.init_std, cfg.model.n_layers)
    # AdamW over one small parameter: load and export never read the optimizer state, and the state of
    # every parameter (two copies of the weights, created through zero gradients: a third) does not fit
    # 24 GiB beside the model; the checkpoint is therefore loadable and exportable, not resumable
    optimizer = torch.optim.AdamW([model.norm.weight])
    train_state = {"scheduler": build_scheduler(optimizer, cfg.trainer).state_dict(),
                   "torch_rng": torch.get_rng_state(), "step": 0, "tokens_seen": 0,
                   "unigram_counts": torch.zeros(model.output.out_features, dtype=torch.float64)}
    pending = start_checkpoint(
        root, 0, model=model, optimizer=optimizer, ctx=init_distributed(cfg.parallel, cfg.model, torch.device("cpu")),
        train_state=train_state, loader_state={}, tokenizer=tokenizer,
        config_yaml=OmegaConf.to_yaml(OmegaConf.structured(cfg)), skipped={})
    pending.finish()
    return pending.final, sum(p.numel() for p in model.parameters())


def peak_rss() -> int:
    """This process's peak RSS in bytes: the interpreter and torch included, the same in every
    process, so differences between operations cancel them."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def current_rss() -> int:
    match = re.search(r"VmRSS:\s*(\d+) kB", Path("/proc/self/status").read_text())
    assert match is not None
    return int(match.group(1)) * 1024


def measured(op: Callable[[], object]) -> tuple[float, int]:
    """(seconds, peak RSS) of `op`."""
    t0 = time.perf_counter()
    op()
    return time.perf_counter() - t0, peak_rss()


def load_op(ckpt: Path) -> tuple[float, int]:
    return measured(lambda: load_checkpoint_model(ckpt))


def export_op(ckpt: Path, out: Path, max_shard_bytes: int) -> tuple[float, int, int, int]:
    """(seconds, peak RSS, RSS once export_hf has loaded the checkpoint, peak RSS of the writing after
    that). The writing's own peak is needed because the load's transient peak can hide it."""
    loaded: dict[str, int] = {}

    def load_then_reset_peak(path: Path) -> tuple[ScientificMoE, ScientificTokenizer, RunConfig]:
        result = load_checkpoint_model(path)
        loaded["peak"], loaded["rss"] = peak_rss(), current_rss()
        Path("/proc/self/clear_refs").write_text("5")  # Linux: the peak RSS restarts at the current RSS
        return result

    export_module.load_checkpoint_model = load_then_reset_peak  # what export_hf calls, in this process only
    seconds, writing_peak = measured(lambda: export_hf(ckpt, out, torch.float32, max_shard_bytes))
    return seconds, max(loaded["peak"], writing_peak), loaded["rss"], writing_peak


def import_op(model_cfg: ModelConfig, out: Path) -> tuple[float, int]:
    def run() -> None:
        cfg = pretrained_model_config(dataclasses.replace(model_cfg, init_from=f"hf:{out}"))
        load_pretrained(ScientificMoE(cfg, vocab_sizes_of(exported_tokenizer(out))), out)
    return measured(run)


def in_fresh_process(fn: Callable[..., T], *args: object) -> T:
    # spawn, one task per pool: a new interpreter whose peak RSS belongs to this call alone
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def run(model: str, max_shard_bytes: int, work: Path) -> None:
    cfg = compose_run_config([f"model={model}"])
    ckpt, n_params = in_fresh_process(write_checkpoint, cfg, work / "checkpoints")
    out = work / "hf"
    results = {"load": in_fresh_process(load_op, ckpt),
               "export": in_fresh_process(export_op, ckpt, out, max_shard_bytes),
               "import": in_fresh_process(import_op, cfg.model, out)}
    weight_bytes = 4 * n_params
    shards = len(list(out.glob("model-*.safetensors")))
    print(f"model={model}: {n_params / 1e9:.3f}B parameters, {weight_bytes / 2**30:.2f} GiB in fp32; "
          f"export in {shards} shards of at most {max_shard_bytes / 2**30:.2f} GiB")
    print(f"{'op':<8}{'seconds':>9}{'peak RSS GiB':>14}{'RSS/weights':>13}{'time/load':>11}")
    load_s = results["load"][0]
    for name, (seconds, rss, *_) in results.items():
        print(f"{name:<8}{seconds:>9.1f}{rss / 2**30:>14.2f}{rss / weight_bytes:>13.2f}{seconds / load_s:>11.2f}")
    _, export_peak, loaded_rss, writing_peak = results["export"]
    print(f"(one shard is {max_shard_bytes / weight_bytes:.2f} of the weight bytes)")
    for what, extra in (("export peak RSS above load's peak", export_peak - results["load"][1]),
                        ("export's writing: peak RSS above its RSS once loaded", writing_peak - loaded_rss)):
        print(f"{what}: {extra / weight_bytes:.2f} of the weight bytes "
              f"({'PASS' if extra / weight_bytes < THRESHOLD else 'FAIL'}: < {THRESHOLD})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="moe_1b", help="model config name (scifm/configs/model)")
    parser.add_argument("--max-shard-gb", type=float, default=1.0, help="export shard size limit, GiB")
    parser.add_argument("--keep", type=Path, help="write the checkpoint and the export here and keep them")
    args = parser.parse_args()
    max_shard_bytes = int(args.max_shard_gb * 2**30)
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        run(args.model, max_shard_bytes, args.keep)
    else:
        with tempfile.TemporaryDirectory(prefix="hf_convert.") as work:
            run(args.model, max_shard_bytes, Path(work))


if __name__ == "__main__":
    main()
