"""How unevenly a run routes its tokens, from the routing statistics it logged.

Under expert parallelism rank r holds the experts r x E/ep to (r+1) x E/ep - 1 (expert_parallel.py),
and every rank waits at each MoE block's combine all-to-all for the one that received the most rows.
The trainer logs each MoE block's routed tokens per expert, over the global batch, to metrics.jsonl
(`moe[i].tokens_per_expert`, every trainer.log_every steps). For an ep size the imbalance is, per
logged step and block, the busiest rank's rows over the mean rank's, averaged over steps and blocks:
the factor by which that rank's routed work and its all-to-all rows exceed an even split. Counts over
the global batch stand for each ep group's (a group sees fewer tokens, so its own spread is wider).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from scifm.core.checks import require
from scifm.core.errors import ConfigError

KEY = "plan.routing_metrics"


class RoutingLoad:
    """Imbalance by ep size, from a metrics.jsonl; even routing (1.0) where no file is given."""

    def __init__(self, metrics_path: str, n_experts: int):
        self.n_experts = n_experts
        self._blocks: list[list[float]] = []  # tokens per expert, one list per logged step and MoE block
        if metrics_path:
            self._blocks = _read_counts(Path(metrics_path), n_experts)
        self._cache: dict[int, float] = {}

    @property
    def n_blocks(self) -> int:
        """Logged (step, MoE block) pairs the imbalance averages over."""
        return len(self._blocks)

    def imbalance(self, ep: int) -> float:
        if ep <= 1 or not self._blocks:
            return 1.0
        if ep not in self._cache:
            local = self.n_experts // ep
            ratios = []
            for counts in self._blocks:
                per_rank = [sum(counts[r * local:(r + 1) * local]) for r in range(ep)]
                mean = sum(per_rank) / ep
                ratios.append(max(per_rank) / mean if mean > 0 else 1.0)
            self._cache[ep] = statistics.fmean(ratios)
        return self._cache[ep]


def _read_counts(path: Path, n_experts: int) -> list[list[float]]:
    if path.is_dir():  # a run directory: the metrics.jsonl it holds
        path = path / "metrics.jsonl"
    require(path.is_file(), KEY, f"no such file: {path} (give a run's metrics.jsonl or its directory)")
    blocks = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{KEY}: {path} line {number} is not JSON ({err.msg})") from None
        for block in record.get("moe", []) if isinstance(record, dict) else []:
            counts = block.get("tokens_per_expert") if isinstance(block, dict) else None
            if counts is None:
                continue
            require(len(counts) == n_experts, KEY, f"{path} line {number} routes to {len(counts)} experts; "
                    f"the model has model.moe.n_experts={n_experts}")
            blocks.append([float(c) for c in counts])
    require(bool(blocks), KEY, f"{path} holds no routing statistics (moe[].tokens_per_expert): give the "
            "metrics.jsonl of a run of an MoE model")
    return blocks
