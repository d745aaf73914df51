"""Batching of featurized items of different sizes: pad along the first axis, mask the real part."""

from __future__ import annotations

import numpy as np
import torch

# mask key -> the item arrays that share its first-axis length (one group per padded axis)
Groups = dict[str, tuple[str, ...]]


def collate_groups(groups: Groups, items: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Each array becomes [n_items, n_max, ...] zero-padded; each mask [n_items, n_max], True = real."""
    batch: dict[str, torch.Tensor] = {}
    for mask_key, keys in groups.items():
        lengths_B = torch.tensor([item[keys[0]].shape[0] for item in items])
        n_max = int(lengths_B.max())
        batch[mask_key] = torch.arange(n_max)[None, :] < lengths_B[:, None]
        for key in keys:
            first = items[0][key]
            padded = np.zeros((len(items), n_max, *first.shape[1:]), dtype=first.dtype)
            for i, item in enumerate(items):
                padded[i, : len(item[key])] = item[key]
            batch[key] = torch.from_numpy(padded)
    return batch
