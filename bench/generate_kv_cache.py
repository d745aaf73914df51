"""Greedy decoding through the KV cache against recomputing the whole sequence each token, side by
side in one run, on the tiny config with random weights (timing does not depend on the weights).

Prints, per (batch, prompt length, new tokens), the time of each and their ratio (< 1 means the
cache is faster), and checks that both produce the same tokens.
Run: python bench/generate_kv_cache.py
"""

from __future__ import annotations

import time

import torch

from scifm.model.init import init_parameters
from scifm.model.kv_cache import KVCache
from scifm.model.multimodal import ScientificMoE
from scifm.config import compose_run_config

CASES = [(16, 64, 16), (16, 192, 16), (4, 128, 64)]  # (batch, prompt tokens, new tokens)
VOCAB = {"total": 4096, "text": 4096, "latex": 512, "protein": 32}


def positions_of(ids_BS: torch.Tensor, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    B, S = ids_BS.shape
    return torch.arange(start, start + S).expand(B, S), torch.zeros(B, S, dtype=torch.long)


def recompute(model, prompt_BS: torch.Tensor, n_new: int) -> torch.Tensor:
    ids_BS = prompt_BS
    for _ in range(n_new):
        logits_BSV = model(ids_BS, *positions_of(ids_BS), {}, {})
        ids_BS = torch.cat([ids_BS, logits_BSV[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids_BS[:, prompt_BS.shape[1]:]


def cached(model, prompt_BS: torch.Tensor, n_new: int) -> torch.Tensor:
    cache, new = KVCache(), []
    logits_BSV = model(prompt_BS, *positions_of(prompt_BS), cache=cache)
    for step in range(n_new):
        next_B1 = logits_BSV[:, -1].argmax(-1, keepdim=True)
        new.append(next_B1)
        if step + 1 < n_new:
            logits_BSV = model(next_B1, *positions_of(next_B1, prompt_BS.shape[1] + step), cache=cache)
    return torch.cat(new, dim=1)


def best_time(fn, *args, repeats: int = 3) -> tuple[float, torch.Tensor]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn(*args)
        best = min(best, time.perf_counter() - t0)
    return best, out


@torch.no_grad()
def main() -> None:
    cfg = compose_run_config(["experiment=tiny"]).model
    model = ScientificMoE(cfg, VOCAB).eval()
    init_parameters(model, 0, cfg.init_std, cfg.n_layers)
    torch.manual_seed(0)
    print(f"{'B':>3} {'prompt':>6} {'new':>4}  {'cache ms':>9} {'recompute ms':>12}  cache/recompute  same tokens")
    for batch, prompt_len, n_new in CASES:
        prompt_BS = torch.randint(0, VOCAB["total"], (batch, prompt_len))
        t_cache, ids_cache = best_time(cached, model, prompt_BS, n_new)
        t_full, ids_full = best_time(recompute, model, prompt_BS, n_new)
        print(f"{batch:3d} {prompt_len:6d} {n_new:4d}  {t_cache * 1e3:9.1f} {t_full * 1e3:12.1f}  "
              f"{t_cache / t_full:15.2f}  {bool(torch.equal(ids_cache, ids_full))}")


if __name__ == "__main__":
    main()
