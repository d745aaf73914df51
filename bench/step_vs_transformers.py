"""One training step of scifm against transformers' Qwen3-MoE at the same shape, with the same weights:
forward, loss, backward, gradient clipping and AdamW, as each library trains (scifm: its ModelRunner,
cross-entropy and the optimizer its trainer builds; transformers: the model's own loss and the fused
AdamW its Trainer uses from torch 2.8 on). fp32 and bf16 autocast; the variants alternate within each
round so that load on the machine hits them alike. Before timing, the two models' logits are compared
on the batch's first row (same weights, so a different computation would show). Prints parameter counts, medians,
spreads (max / min over rounds) and scifm / transformers per precision. With --profile, one more
step of each variant runs under torch's profiler and its kernels' self CPU time is printed by kind:
matrix multiplies (aten::mm, addmm, bmm, _grouped_mm), attention (SDPA's kernels) and the rest.
With --compile, scifm also runs with parallel.compile's per-block torch.compile.
On a GPU (--device cuda) each step ends with a synchronize, so that the timer holds the whole step.
Run: python bench/step_vs_transformers.py [--shape small|big] [--precisions fp32 bf16] [--rounds 7]
     [--batch 4] [--seq 512] [--device cpu|cuda] [--profile] [--compile]
"""

from __future__ import annotations

import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers

from scifm.core.host_memory import keep_freed_host_memory
from scifm.hf.architectures import QWEN3_MOE, hf_config
from scifm.hf.model_files import decoder_tensors, write_weights
from scifm.parallel.fsdp import apply_compile
from text_step import (CLIP, VOCAB, TextBatch, autocast_of, build_model, model_config, scifm_optimizer, scifm_step,
                       step_arguments, synchronize)


def as_transformers(model) -> torch.nn.Module:
    """The same weights in transformers' Qwen3-MoE, through the files `scifm export hf` writes."""
    with tempfile.TemporaryDirectory() as hf_dir:
        config = hf_config(model.cfg, QWEN3_MOE, VOCAB, {"bos": 0, "eos": 1, "pad": 2})
        (Path(hf_dir) / "config.json").write_text(json.dumps(config), encoding="utf-8")
        write_weights(decoder_tensors(model), QWEN3_MOE, Path(hf_dir), 2**40, torch.float32)
        return transformers.AutoModelForCausalLM.from_pretrained(hf_dir).train()


def transformers_optimizer(model) -> torch.optim.Optimizer:
    """The fused AdamW that transformers' Trainer uses from torch 2.8 on."""
    return torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)


def transformers_step(model, batch: TextBatch, precision: str, optimizer: torch.optim.Optimizer):
    device = batch.input_ids.device
    autocast = autocast_of(precision, device.type)

    def step() -> None:
        with autocast:  # transformers shifts the labels inside its loss
            loss = model(input_ids=batch.input_ids, labels=batch.input_ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
    return step


KINDS = {"matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::_grouped_mm"),
         "attention": ("aten::_scaled_dot_product", "aten::_flash_attention")}


def kernel_shares(step) -> dict[str, float]:
    """One step under torch's profiler: the share of its operators' self CPU time by kind."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    by_kind = dict.fromkeys([*KINDS, "other"], 0.0)
    for event in prof.key_averages():
        kind = next((k for k, prefixes in KINDS.items() if event.key.startswith(prefixes)), "other")
        by_kind[kind] += event.self_cpu_time_total
    total = sum(by_kind.values())
    return {kind: t / total for kind, t in by_kind.items()}


def count(params) -> float:
    return sum(p.numel() for p in params) / 1e6


def main() -> None:
    parser = step_arguments(__doc__.splitlines()[0], rounds=7)
    parser.add_argument("--profile", action="store_true", help="also print each variant's operator time by kind")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda[:N]")
    parser.add_argument("--compile", action="store_true",
                        help="also time scifm with parallel.compile's per-block torch.compile (a copy of the same model)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.profile and device.type != "cpu":
        parser.error("--profile shares out CPU operator time: run it with --device cpu")
    if device.type == "cpu":
        keep_freed_host_memory()  # as the trainer does on CPU (for both libraries' steps alike)
    cfg = model_config(args.shape, args.seq)
    ours = build_model(cfg)
    theirs = as_transformers(ours)
    batch = TextBatch.random(args.batch, args.seq)
    check = TextBatch(batch.input_ids[:1])  # one row shows a different computation as well as all
    with torch.no_grad():  # on the CPU in fp32, whatever the device timed: the check is of the computation
        diff = (ours(check.input_ids, **check.model_kwargs()) - theirs(input_ids=check.input_ids).logits).abs().max().item()
    assert diff < 1e-4, f"the two models disagree on the logits (max |diff| {diff:.2e}): not the same computation"
    ours, theirs, batch = ours.to(device), theirs.to(device), batch.to(device)

    compiled = None
    if args.compile:
        compiled = copy.deepcopy(ours)
        apply_compile(compiled)
    # one optimizer per model, shared by its precisions' steps: a set of moments each would not fit
    # --shape big's two precisions into 24 GiB
    optimizers = {"ours": scifm_optimizer(ours), "theirs": transformers_optimizer(theirs),
                  "compiled": scifm_optimizer(compiled) if compiled is not None else None}
    steps = {}
    for precision in args.precisions:
        steps[f"scifm {precision}"] = scifm_step(ours, batch, precision, optimizers["ours"])
        if compiled is not None:
            steps[f"scifm {precision} compiled"] = scifm_step(compiled, batch, precision, optimizers["compiled"])
        steps[f"transformers {precision}"] = transformers_step(theirs, batch, precision, optimizers["theirs"])
    for step in steps.values():  # warm-up: the optimizers' moments, kernel probes, the allocator
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)

    decoder = [p for n, p in ours.named_parameters() if not n.startswith("encoders.")]
    encoders = [p for n, p in ours.named_parameters() if n.startswith("encoders.")]
    print(f"shape {args.shape}: d_model {cfg.d_model}, {cfg.n_layers} layers, {cfg.n_heads}/{cfg.n_kv_heads} heads, "
          f"{cfg.moe.n_experts} experts top-{cfg.moe.top_k} width {cfg.moe.expert_ffn}, vocab {VOCAB}; "
          f"batch {args.batch} x {args.seq}; {args.rounds} rounds, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, "
          + (torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"))
    print(f"parameters: scifm decoder {count(decoder):.2f}M (+ {count(encoders):.2f}M in encoders a text batch "
          f"leaves idle), transformers {count(theirs.parameters()):.2f}M; logits max |diff| {diff:.1e}")
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        print(f"  {name:24s} median {medians[name] * 1e3:8.1f} ms  spread {max(t) / min(t):5.2f}")
    variants = ["", " compiled"] if compiled is not None else [""]
    for precision in args.precisions:
        for variant in variants:
            ratio = medians[f"scifm {precision}{variant}"] / medians[f"transformers {precision}"]
            print(f"scifm{variant} / transformers ({precision}): {ratio:.2f}")
    if args.profile:
        print("share of the step's operator time (self CPU, one profiled step):")
        for name, step in steps.items():
            print(f"  {name:24s} " + "  ".join(f"{k} {v:.0%}" for k, v in kernel_shares(step).items()))


if __name__ == "__main__":
    main()
