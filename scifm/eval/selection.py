"""eval.max_items: a seeded sample of a task's items spread over its skills.

A file is often ordered by skill, so its first N lines would measure one skill. Instead each skill
gets its proportional share of the N items (largest remainders), and at least one item while N is
at least the number of skills (else the N largest skills get one each); within a skill the items
are drawn at random with eval.seed. The sample keeps the file's order and is the same on every
machine for the same file, N and seed.
"""

from __future__ import annotations

import heapq
import random
from collections import defaultdict


def skill_quotas(sizes: dict[str, int], n: int) -> dict[str, int]:
    """How many of n items each skill (with sizes[skill] items, n below their sum) contributes."""
    total = sum(sizes.values())
    ranked = sorted(sizes, key=lambda s: (-sizes[s], s))  # ties go to the larger skill, then by name
    quotas = {s: int(rank < n) for rank, s in enumerate(ranked)}
    share = {s: n * sizes[s] / total for s in sizes}
    # each further item goes to the skill furthest below its share that has items left
    heap = [(quotas[s] - share[s], rank, s) for rank, s in enumerate(ranked) if quotas[s] < sizes[s]]
    heapq.heapify(heap)
    for _ in range(n - sum(quotas.values())):
        _, rank, s = heapq.heappop(heap)
        quotas[s] += 1
        if quotas[s] < sizes[s]:
            heapq.heappush(heap, (quotas[s] - share[s], rank, s))
    return quotas


def sample_over_skills(items: list, n: int, seed: int) -> list:
    """n of the items (all when n >= len(items)), spread over `item.skill`, in file order."""
    if n >= len(items):
        return list(items)
    by_skill: dict[str, list[int]] = defaultdict(list)
    for i, item in enumerate(items):
        by_skill[item.skill].append(i)
    quotas = skill_quotas({s: len(idx) for s, idx in by_skill.items()}, n)
    rng = random.Random(seed)
    chosen = [i for s in sorted(by_skill) for i in rng.sample(by_skill[s], quotas[s])]
    return [items[i] for i in sorted(chosen)]
