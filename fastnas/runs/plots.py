"""The PNGs of a run, each written atomically."""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str, dpi: int = 80) -> None:
    """Write ``fig`` to ``path`` atomically and close it."""
    from fastnas.runs.checkpoint import atomic_write_bytes

    buf = io.BytesIO()
    try:
        fig.savefig(buf, dpi=dpi, format="png")
    finally:
        _pyplot().close(fig)
    atomic_write_bytes(path, buf.getvalue())


def arch_weights_figure(
    history: list[dict[str, Any]],
    op_names: list[str] | None = None,
    edge_labels: dict[str, list[str]] | None = None,
    chosen: dict[str, dict[str, str]] | None = None,
) -> Any:
    """The figure of :func:`plot_arch_weights` (None without history)."""
    if not history:
        return None
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    cells = list(history[0]["arch_weights"])
    epochs = [h["epoch"] for h in history]
    n_edges = max(len(history[0]["arch_weights"][c]) for c in cells)
    cols = min(n_edges, 7)
    rows_per_cell = math.ceil(n_edges / cols)
    height = 2.1 * rows_per_cell * len(cells) + 0.6
    fig, axes = plt.subplots(rows_per_cell * len(cells), cols, figsize=(2.3 * cols, height), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ci, cell in enumerate(cells):
        w = np.array([h["arch_weights"][cell] for h in history])  # [epochs, edges, ops]
        for e in range(rows_per_cell * cols):
            ax = axes[ci * rows_per_cell + e // cols][e % cols]
            if e >= w.shape[1]:
                ax.axis("off")
                continue
            label = edge_labels[cell][e] if edge_labels else f"edge {e}"
            pick = (chosen or {}).get(cell, {}).get(label)
            for k in range(w.shape[2]):
                name = op_names[k] if op_names else str(k)
                is_pick = pick == name
                ax.plot(
                    epochs, w[:, e, k], label=name, color=colours[k % len(colours)],
                    linewidth=2.2 if is_pick else 0.9, marker="*" if is_pick else None, markevery=[-1],
                )  # fmt: skip
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylim(0, 1)
            title = label if len(cells) == 1 else f"{cell} {label}"
            ax.set_title(f"{title}: {pick}" if pick else title, fontsize=7)
            ax.tick_params(labelsize=6)
            if e % cols == 0:
                ax.set_ylabel("op weight", fontsize=7)
            if e // cols == rows_per_cell - 1 or e + cols >= w.shape[1]:
                ax.set_xlabel("epoch", fontsize=7)
    axes[0][0].legend(fontsize=5, loc="upper left")
    marked = "; the exported ops drawn thick and starred" if chosen else ""
    fig.suptitle(f"architecture weights over the epochs (one panel per edge, one line per op{marked})", fontsize=9)
    fig.subplots_adjust(left=0.06, right=0.99, bottom=0.5 / height, top=1 - 0.6 / height, wspace=0.3, hspace=0.75)
    return fig


def plot_arch_weights(
    history: list[dict[str, Any]],
    path: str,
    op_names: list[str] | None = None,
    edge_labels: dict[str, list[str]] | None = None,
    chosen: dict[str, dict[str, str]] | None = None,
) -> None:
    """PNG of every edge's op weights over the epochs: one panel per edge (titled by ``edge_labels[cell]``,
    e.g. ``1<-0``), one line per op (named by ``op_names``), the panels of each cell type in their own
    rows; ``chosen[cell][edge label]``, the exported op of an edge, is drawn thick, starred and named
    in the panel's title."""
    fig = arch_weights_figure(history, op_names, edge_labels, chosen)
    if fig is not None:
        save_figure(fig, path)


def plot_curves(history: list[dict[str, Any]], path: str, title: str = "") -> None:
    """PNG of a training run: losses (left) and accuracies (right) of training and test over the epochs."""
    if not history:
        return
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.4))
    for split in ("train", "test"):
        ax_loss.plot(epochs, [h[f"{split}_loss"] for h in history], label=split)
        ax_acc.plot(epochs, [h[f"{split}_acc"] for h in history], label=split)
    ax_loss.set(xlabel="epoch", ylabel="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)")
    ax_acc.legend(fontsize=8)
    fig.suptitle(title if len(title) < 110 else title[:107] + "...", fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def plot_rank_scatter(
    shared_acc: list[float], truth: list[float], path: str, summary: dict[str, Any], truth_name: str
) -> None:
    """PNG of a ranking run: each architecture's shared-weight accuracy against its ground truth, the
    shared-weight top-1 and top-5 marked, Kendall's tau and Spearman's rho in the title."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4.2))
    ax.scatter(shared_acc, truth, s=18, color="tab:blue", label="architectures")
    order = sorted(range(len(shared_acc)), key=lambda i: -shared_acc[i])
    top5 = order[:5]
    ax.scatter([shared_acc[i] for i in top5], [truth[i] for i in top5], s=40, facecolors="none",
               edgecolors="tab:orange", label="shared-weight top-5")  # fmt: skip
    ax.scatter([shared_acc[order[0]]], [truth[order[0]]], s=80, marker="*", color="tab:red", label="top-1")
    fmt = lambda v: "undefined" if v is None else f"{v:.3f}"
    ax.set_title(
        f"Kendall tau {fmt(summary['kendall_tau'])}, Spearman rho {fmt(summary['spearman_rho'])} "
        f"({len(truth)} architectures)",
        fontsize=9,
    )
    ax.set_xlabel("shared-weight accuracy (%)", fontsize=8)
    ax.set_ylabel(truth_name if len(truth_name) < 50 else "ground truth", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
