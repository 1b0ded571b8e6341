"""The topic x expert heatmap per MoE layer: each topic's share of its routed tokens per expert, coloured around the
uniform share, with the count of tokens per topic in its label.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from process_exp_results.figures.common import (
    DPI,
    MIN_FIG_WIDTH_IN,
    HeatmapLayout,
    as_count_matrix,
    heatmap_titles,
    save_figure_atomic,
    shares_percent,
)
from process_exp_results.report.formatting import format_count


def _heatmap_layout(labels: Sequence[str], n_topics: int, n_experts: int) -> HeatmapLayout:
    cell_in = 0.62 if n_experts <= 12 else 0.48
    label_in = 0.3 + 0.075 * max(len(label) for label in labels)
    fig_w = max(MIN_FIG_WIDTH_IN - 1.5, label_in + cell_in * n_experts + 1.6)
    fig_h = 1.5 + 0.42 * n_topics
    return HeatmapLayout(fig_w, fig_h, label_in, cell_in, n_topics, n_experts)


def _style_heatmap_axes(ax, labels: Sequence[str], n_experts: int) -> None:
    """Experts along x, the topic labels along y, no ticks or frame."""
    ax.set_xticks(np.arange(n_experts))
    ax.set_xticklabels([str(e) for e in range(n_experts)], fontsize=9)
    ax.set_xlabel("expert", fontsize=10)
    ax.set_yticks(np.arange(len(labels)))
    ax.set_yticklabels(labels, fontsize=9)
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)


def _share_colour_bar(fig: Figure, image, cax, norm, uniform: float) -> None:
    """The colour bar, ticked at 0, the uniform share and its top."""
    bar = fig.colorbar(image, cax=cax)
    bar.set_ticks([0.0, uniform, norm.vmax], labels=["0", f"{uniform:.3g}", f"{norm.vmax:.0f}"])  # inside the range
    bar.ax.tick_params(labelsize=8)
    bar.set_label(f"% of topic's tokens\n(white = uniform {uniform:.3g}%)", fontsize=8.5)


def plot_topic_expert_heatmap(
    topic_names: Sequence[str], counts, path: str | os.PathLike, layer_name: str, finding: str | None = None
) -> Path:
    """Which experts each topic's tokens go to, in one MoE layer.

    Rows are topics, columns experts; a cell is the share (%) of the topic's
    routed tokens sent to that expert, written in the cell.  The diverging
    colour map is centred on the uniform share ``100 / n_experts`` (white):
    red cells get more than a uniform router would give, blue cells less.

    Args:
        topic_names: row labels, one per row of ``counts``.
        counts: [n_topics, n_experts] routed real tokens (top choice).
        path: PNG to write (atomically).
        layer_name: e.g. ``"block 0"``, used in the title.
        finding: the title when the verdict is known (step 4: the layer's topic verdict with its index).
    """
    mat = as_count_matrix(f"topic x expert counts for {layer_name!r}", counts)
    n_topics, n_experts = mat.shape
    if len(topic_names) != n_topics:
        raise ValueError(f"{len(topic_names)} topic names for {n_topics} rows of counts")
    shares = shares_percent(mat)
    uniform = 100.0 / n_experts
    labels = [_topic_label(t, n) for t, n in zip(topic_names, mat.sum(axis=1))]
    layout = _heatmap_layout(labels, n_topics, n_experts)
    fig = Figure(figsize=(layout.fig_w, layout.fig_h), dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_axes(layout.cells_rect())
    norm, cmap = _share_norm(shares, uniform), matplotlib.colormaps["RdBu_r"]
    image = ax.imshow(shares, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    _write_cell_shares(ax, shares, cmap, norm)
    _style_heatmap_axes(ax, labels, n_experts)
    _share_colour_bar(fig, image, fig.add_axes(layout.colour_bar_rect()), norm, uniform)
    heatmap_titles(
        fig,
        finding or f"Topic x expert, {layer_name}: % of each topic's tokens per expert",
        f"red = more than uniform ({uniform:.3g}%), blue = less; rows sum to 100%",
        layout.fig_h,
    )
    return save_figure_atomic(fig, path)


def _share_norm(shares: np.ndarray, uniform: float):
    """A diverging norm centred on the uniform share (white); the "above" side scaled to the data (at least twice
    uniform) so modest preferences stay visible."""
    from matplotlib.colors import TwoSlopeNorm

    vmax = min(100.0, max(2.0 * uniform, float(shares.max()) * 1.05))
    return TwoSlopeNorm(vmin=0.0, vcenter=uniform, vmax=vmax)


def _write_cell_shares(ax, shares: np.ndarray, cmap, norm) -> None:
    """Each cell's share in the cell, white on dark colours."""
    n_topics, n_experts = shares.shape
    fontsize = 8.5 if n_experts <= 8 else 7.0
    for row in range(n_topics):
        for col in range(n_experts):
            value = shares[row, col]
            rgba = cmap(norm(value))
            dark = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2] < 0.5
            ax.text(
                col,
                row,
                f"{value:.0f}" if value >= 99.5 else f"{value:.1f}",
                ha="center",
                va="center",
                fontsize=fontsize,
                color="white" if dark else "0.1",
            )


def _topic_label(topic: str, n_tokens: float) -> str:
    return f"{topic} (n={format_count(n_tokens)})"
