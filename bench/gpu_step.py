"""Training step speed of a Qwen3-30B-A3B-shaped model on one GPU, bf16 against FP8, in one run.

The shape is Qwen3-30B-A3B's (width 2048, 32 query / 4 KV heads of 128, 128 experts top-8 of width
768, vocabulary 151936) with fewer layers, so that weights, gradients and AdamW state fit one GPU.
Each mode builds the model, runs warm-up steps, then times steps of forward, the trainer's loss
(the chunked cross-entropy), backward and AdamW (fused) on random tokens; modes run one after
another (two such models do not fit together).

  bf16          bf16 autocast, fp32 master weights (trainer.precision=bf16)
  fp8           trainer.precision=fp8 with the default layers (torchao tensorwise Linear layers, the
                routed experts as grouped FP8 GEMMs on Hopper/Blackwell, else per-expert scaled matmuls)
  fp8_dense     FP8 Linear layers only; routed experts stay in bf16 (trainer.fp8.exclude adds *experts)
  bf16_one_call bf16 with each layer's attention as one SDPA call over all keys
                (model.attention_query_block=0), against the default blocks of 256 queries of bf16
  <mode>_compiled  that mode with each block compiled (parallel.compile=true); its warm-up steps compile

--profile-modes names modes that run one more step under torch.profiler, whose operator table goes
to <profile-dir>/<mode>_profile.txt.

A bf16 matmul of 8192^3 is timed first, in the same run: MFU is given against it as well as against
the datasheet peak. A mode that fails is recorded with its one-line error and the next one runs; a
mode not started within --budget-s seconds of the start is recorded as skipped; the JSON file is
rewritten after each mode, so a run cut short keeps what it measured.

Model FLOPs per token: 6 x the matmul parameters a token uses (attention, router, its top-k experts,
output) + 12 x layers x heads x head_dim x sequence for attention scores (torchtitan's count, no
causal halving). MFU is against the GPU's dense bf16 peak (`--peak-tflops`, default H100/H200 SXM)
and against the measured matmul rate.

  python bench/gpu_step.py --layers 6 --out gpu_step.json --profile-modes bf16,fp8
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import time

import torch

from scifm.core.device import autocast_for
from scifm.core.encoders_config import EncodersConfig
from scifm.model.config import ModelConfig, MoEConfig
from scifm.model.multimodal import ScientificMoE
from scifm.parallel.fp8 import apply_fp8
from scifm.parallel.fsdp import apply_compile
from scifm.parallel.fp8_config import Fp8Config
from scifm.train.step import scaled_cross_entropy
from text_step import synchronize

VOCAB = 151936


def qwen3_30b_a3b_shape(layers: int, seq: int) -> ModelConfig:
    moe = MoEConfig(n_experts=128, top_k=8, expert_ffn=768, n_shared_experts=0, aux_loss_coef=0.001)
    return ModelConfig(name="qwen3-30b-a3b-cut", vocab_size=VOCAB, d_model=2048, n_layers=layers, n_heads=32,
                       n_kv_heads=4, head_dim=128, n_dense_layers=0, rope_theta=1e6, max_seq_len=seq, moe=moe,
                       encoders=EncodersConfig())


def flops_per_token(cfg: ModelConfig, seq: int) -> float:
    d, hd = cfg.d_model, cfg.head_dim
    attention = d * hd * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
    moe = d * cfg.moe.n_experts + cfg.moe.top_k * 3 * d * cfg.moe.expert_ffn
    matmul_params = cfg.n_layers * (attention + moe) + d * cfg.vocab_size
    return 6 * matmul_params + 12 * cfg.n_layers * cfg.n_heads * hd * seq


def measure(mode: str, cfg: ModelConfig, batch: int, seq: int, warmup: int, steps: int,
            device: torch.device, profile_to: str | None = None) -> dict:
    cuda = device.type == "cuda"
    if mode.startswith("bf16_one_call"):
        cfg = dataclasses.replace(cfg, attention_query_block=0)
    torch.manual_seed(0)
    with device:
        model = ScientificMoE(cfg, {"total": VOCAB, "text": VOCAB, "latex": 512, "protein": 32})  # encoders idle
    autocast = autocast_for("bf16", device)
    fp8_layers = None
    if mode.startswith("fp8"):
        exclude = Fp8Config().exclude + (["*experts"] if mode.startswith("fp8_dense") else [])
        conversion = apply_fp8(model, Fp8Config(backend="torchao", exclude=exclude), device)
        autocast = conversion.forward_context(autocast)
        fp8_layers = {"linear_layers": len(conversion.linears), "expert_blocks": len(conversion.experts),
                      "experts_kernels": conversion.experts_kernels() if conversion.experts else None}
    if mode.endswith("_compiled"):
        apply_compile(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    tokens = torch.randint(0, VOCAB, (batch, seq + 1), device=device)
    positions = torch.arange(seq, device=device).expand(batch, seq)
    doc_ids = torch.zeros(batch, seq, dtype=torch.long, device=device)

    def step() -> float:
        synchronize(device)
        t0 = time.perf_counter()
        with autocast:
            logits = model(tokens[:, :-1], positions, doc_ids)
        loss = scaled_cross_entropy(logits, tokens[:, 1:], 1.0 / (batch * seq))  # the trainer's loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        step.loss = loss.item()
        return time.perf_counter() - t0

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = [step() for _ in range(warmup + steps)][warmup:]
    seconds = statistics.median(times)
    result = {"mode": mode, "parameters": sum(p.numel() for p in model.parameters()),
              "step_seconds_median": seconds, "step_seconds_spread": (max(times) - min(times)) / seconds,
              "tokens_per_second": batch * seq / seconds, "loss": step.loss,
              "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
              "fp8": fp8_layers}
    if profile_to:
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        with torch.profiler.profile(activities=activities) as prof:
            step()
        sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"  # kernels, each counted once
        with open(profile_to, "w") as f:
            f.write(f"{mode}: one step's operators and kernels by {sort}\n")
            f.write(prof.key_averages().table(sort_by=sort, row_limit=70, max_name_column_width=90))
    model = optimizer = None  # freed before the next mode builds its own
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def matmul_tflops(device: torch.device, n: int = 8192, reps: int = 10) -> float | None:
    """bf16 n^3 matmul rate on random data, mean of `reps` after warm-up: the ceiling this run's GPU gives."""
    if device.type != "cuda":
        return None
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    synchronize(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU")
    parser.add_argument("--modes", default="bf16,bf16_compiled,fp8,fp8_compiled,fp8_dense_compiled,bf16_one_call_compiled")
    parser.add_argument("--profile-modes", default="", help="modes whose extra step is profiled, comma-separated")
    parser.add_argument("--profile-dir", default=".", help="where <mode>_profile.txt files go")
    parser.add_argument("--budget-s", type=float, default=200.0, help="start no mode after this many seconds")
    parser.add_argument("--out", default="gpu_step.json")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (to try the script, not to measure)")
    args = parser.parse_args()
    start = time.perf_counter()
    device = torch.device(args.device)
    cfg = qwen3_30b_a3b_shape(args.layers, args.seq)
    per_token = flops_per_token(cfg, args.seq)
    measured_peak = matmul_tflops(device)
    if measured_peak is not None:
        print(f"bf16 8192^3 matmul: {measured_peak:.0f} TFLOP/s (datasheet dense peak {args.peak_tflops:.0f})", flush=True)
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "args": vars(args), "flops_per_token": per_token,
            "matmul_tflops_measured": measured_peak, "results": []}
    results = info["results"]
    for mode in args.modes.split(","):
        if time.perf_counter() - start > args.budget_s:
            results.append({"mode": mode, "skipped": f"not started: past --budget-s {args.budget_s:.0f}"})
            print(f"{mode:13s} skipped (budget)", flush=True)
            continue
        try:
            profile_to = (f"{args.profile_dir}/{mode}_profile.txt"
                          if mode in args.profile_modes.split(",") else None)
            r = measure(mode, cfg, args.batch, args.seq, args.warmup, args.steps, device, profile_to)
        except Exception as e:  # noqa: BLE001 -- one mode's failure must not lose the others' figures
            results.append({"mode": mode, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"})
            print(f"{mode:13s} failed: {results[-1]['error']}", flush=True)
        else:
            r["model_tflops"] = r["tokens_per_second"] * per_token / 1e12
            r["mfu"] = r["model_tflops"] / args.peak_tflops
            r["mfu_of_measured_matmul"] = r["model_tflops"] / measured_peak if measured_peak else None
            results.append(r)
            memory = f"peak {r['peak_memory_gib']:.1f} GiB" if r["peak_memory_gib"] is not None else ""
            print(f"{mode:13s} {r['tokens_per_second']:9.0f} tok/s  {r['model_tflops']:6.1f} TFLOP/s  "
                  f"MFU {r['mfu']:.1%}  {memory}  spread {r['step_seconds_spread']:.2f}  "
                  f"elapsed {time.perf_counter() - start:.0f} s", flush=True)
        gc.collect()  # a failed mode's model is freed only once its traceback is gone
        if device.type == "cuda":
            torch.cuda.empty_cache()
        with open(args.out, "w") as f:
            json.dump(info, f, indent=2)
    measured = {r["mode"]: r for r in results if "tokens_per_second" in r}
    if measured:
        print(f"parameters: {next(iter(measured.values()))['parameters'] / 1e9:.2f}B")
    for base in ("bf16", "bf16_compiled"):  # each mode against bf16 eager, and compiled ones against compiled bf16
        for mode, r in measured.items():
            if base in measured and mode != base and (base == "bf16" or mode.endswith("_compiled")):
                print(f"{mode} / {base} tokens/s: {r['tokens_per_second'] / measured[base]['tokens_per_second']:.2f}")

if __name__ == "__main__":
    main()
