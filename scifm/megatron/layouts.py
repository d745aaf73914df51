"""Tensor layouts that differ between scifm and Megatron-Core, both ways; only splits, concatenations,
reshapes and transposes, so a round trip returns the same values bit for bit.

Shape suffixes: H query heads, K kv heads (Megatron's query groups), R = H / K query heads per group,
D head_dim, M d_model, F a feed-forward width, E experts.
"""

from __future__ import annotations

import torch


def fuse_qkv(q_HDx: torch.Tensor, k_KDx: torch.Tensor, v_KDx: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    """Megatron's linear_qkv rows (weight [(H + 2K) * D, M] or bias [(H + 2K) * D]): for each kv head g in
    turn, the R query heads that share it, then its key head, then its value head."""
    tail = q_HDx.shape[1:]  # (M,) for weights, () for biases
    q_KRx = q_HDx.reshape(n_kv_heads, -1, *tail)
    k_K1x, v_K1x = k_KDx.reshape(n_kv_heads, -1, *tail), v_KDx.reshape(n_kv_heads, -1, *tail)
    return torch.cat([q_KRx, k_K1x, v_K1x], dim=1).reshape(-1, *tail)


def split_qkv(qkv: torch.Tensor, n_heads: int, n_kv_heads: int, head_dim: int) -> list[torch.Tensor]:
    """Inverse of fuse_qkv: [wq, wk, wv] (or their biases) in scifm's head-major rows."""
    tail = qkv.shape[1:]
    per_group = n_heads // n_kv_heads * head_dim
    qkv_Kx = qkv.reshape(n_kv_heads, -1, *tail)
    q_KRx, k_K1x, v_K1x = qkv_Kx.split([per_group, head_dim, head_dim], dim=1)
    return [t.reshape(-1, *tail).contiguous() for t in (q_KRx, k_K1x, v_K1x)]


def fuse_gate_up(w1_FM: torch.Tensor, w3_FM: torch.Tensor) -> torch.Tensor:
    """Megatron's gated linear_fc1 [2F, M]: gate (silu) rows, then up rows (MLP's glu chunks them so)."""
    return torch.cat([w1_FM, w3_FM], dim=0)


def split_gate_up(fc1_2FM: torch.Tensor) -> list[torch.Tensor]:
    return [t.contiguous() for t in fc1_2FM.chunk(2, dim=0)]


def experts_to_megatron(w1_EMF: torch.Tensor, w3_EMF: torch.Tensor, w2_EFM: torch.Tensor) -> list[torch.Tensor]:
    """scifm's stacked experts (x @ w) -> per expert Megatron [linear_fc1 [2F, M], linear_fc2 [M, F]]
    (nn.Linear layout, x @ w.T), expert 0 first."""
    out = []
    for w1_MF, w3_MF, w2_FM in zip(w1_EMF, w3_EMF, w2_EFM):
        out += [fuse_gate_up(w1_MF.T, w3_MF.T), w2_FM.T.contiguous()]
    return out


def experts_from_megatron(per_expert: list[torch.Tensor]) -> list[torch.Tensor]:
    """Inverse of experts_to_megatron: [w1 [E, M, F], w3 [E, M, F], w2 [E, F, M]]."""
    fc1s_2FM, fc2s_MF = per_expert[0::2], per_expert[1::2]
    gate_up = [fc1_2FM.chunk(2, dim=0) for fc1_2FM in fc1s_2FM]
    w1_EMF = torch.stack([gate_FM.T for gate_FM, _ in gate_up])
    w3_EMF = torch.stack([up_FM.T for _, up_FM in gate_up])
    w2_EFM = torch.stack([fc2_MF.T for fc2_MF in fc2s_MF])
    return [w1_EMF, w3_EMF, w2_EFM]


def shard(full: torch.Tensor, dim: int, stride: int, rank: int, world: int) -> torch.Tensor:
    """A tensor-parallel rank's slice as Megatron partitions a weight (its partition_dim and
    partition_stride): `full` cut along `dim` into stride x world chunks, of which the rank holds
    chunks rank, rank + world, ... (stride 2: gated fc1's [gate; up] -> [gate_r; up_r])."""
    chunks = full.chunk(stride * world, dim=dim)
    return torch.cat(chunks[rank::world], dim=dim).contiguous()


def unshard(parts: list[torch.Tensor], dim: int, stride: int) -> torch.Tensor:
    """Inverse of shard: the whole tensor from every rank's slice, rank 0 first."""
    pieces = [p.chunk(stride, dim=dim) for p in parts]
    return torch.cat([rank_pieces[s] for s in range(stride) for rank_pieces in pieces], dim=dim)
