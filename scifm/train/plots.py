"""plots/ of a finished run, drawn by rank 0 from metrics.jsonl: the loss curves and a heatmap of each
MoE layer's expert load over the steps, as PNG files that need no server to look at.

Figures are drawn on matplotlib's Agg canvas through Figure objects, never pyplot: no display, no
global backend state in the training process. matplotlib is imported only when a run draws (rank 0,
at its end): importing it costs every process of every run about 0.7 s at start. Without matplotlib
(a GPU image that lacks it) the run says so in one line and ends as it would have: a finished run
must not fail, and so lose a scheduler's afterok dependency, over its pictures.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

from scifm.train.dashboards import load_imbalance

PLOTS_DIR = "plots"


def read_records(metrics_path: Path) -> list[dict]:
    return [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]


def expert_load_matrix(records: list[dict]) -> tuple[list[int], np.ndarray]:
    """(steps, [MoE layers, steps]): each layer's load imbalance (busiest expert / mean) at each logged step."""
    steps = [r["step"] for r in records]
    n_layers = len(records[0]["moe"]) if records else 0
    matrix = np.full((n_layers, len(steps)), np.nan)
    for j, record in enumerate(records):
        for i, layer in enumerate(record["moe"]):
            matrix[i, j] = load_imbalance(layer["tokens_per_expert"])
    return steps, matrix


def plot_losses(records: list[dict], out: Path) -> None:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(8, 5), dpi=100)
    ax = fig.add_subplot()
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], label="train loss")
    val = [r for r in records if "val_loss" in r]
    ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss")
    ax.set(xlabel="step", ylabel="loss (nats per token)", title="loss")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(out)


def plot_expert_load(records: list[dict], out: Path) -> None:
    from matplotlib.figure import Figure

    steps, matrix = expert_load_matrix(records)
    height = 1.5 + 0.4 * len(matrix)  # inches: 0.4 per layer
    fig = Figure(figsize=(8, height), dpi=100)
    # fixed margins in inches, not constrained layout: that doubles the drawing time of a run's end
    fig.subplots_adjust(left=0.08, right=1.0, bottom=0.55 / height, top=1 - 0.35 / height)
    ax = fig.add_subplot()
    # one cell per logged step; the x ticks name steps
    image = ax.imshow(matrix, aspect="auto", interpolation="nearest", cmap="viridis",
                      extent=(-0.5, len(steps) - 0.5, len(matrix) - 0.5, -0.5))
    ticks = np.unique(np.linspace(0, len(steps) - 1, min(len(steps), 10)).round().astype(int)) if steps else []
    ax.set_xticks(ticks, [str(steps[t]) for t in ticks])
    ax.set_yticks(range(len(matrix)))
    ax.set(xlabel="step", ylabel="MoE layer", title="expert load: busiest expert's tokens / mean (1 = balanced)")
    fig.colorbar(image, ax=ax)
    fig.savefig(out)


def write_plots(run_dir: Path) -> list[Path]:
    """plots/loss.png and plots/expert_load.png from the run's metrics.jsonl (every session's steps);
    nothing where no step was logged, no expert load for a model without MoE layers."""
    metrics = run_dir / "metrics.jsonl"
    records = read_records(metrics) if metrics.is_file() else []
    if not records:
        return []
    if importlib.util.find_spec("matplotlib") is None:
        print(f"{PLOTS_DIR}/ not written: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
        return []
    out = run_dir / PLOTS_DIR
    out.mkdir(exist_ok=True)
    paths = [out / "loss.png"]
    plot_losses(records, paths[0])
    if records[0]["moe"]:
        paths.append(out / "expert_load.png")
        plot_expert_load(records, paths[1])
    return paths
