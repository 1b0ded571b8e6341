"""Histograms of which experts the MoE routers pick. They take raw routing counts (how many real, i.e. non-padding,
tokens each router sent to each expert) and draw the *share* of routed tokens per expert in percent, so that
groups or layers of different sizes can be compared, with the raw count written on every bar and a dashed line at
the uniform share ``100 / n_experts``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.transforms import blended_transform_factory

from process_exp_results.figures.common import (
    DPI,
    MIN_FIG_WIDTH_IN,
    as_count_matrix,
    save_figure_atomic,
    shares_percent,
)
from process_exp_results.report.formatting import format_count

# Layout constants, in inches / points.
_AXES_HEIGHT_IN = 3.8


_MAX_FIG_WIDTH_IN = 40.0


_SIDE_MARGIN_IN = 2.2  # y label, tick labels, "uniform" label


_BAR_IN = 0.22  # width budget per bar


_GROUP_GAP_IN = 0.3  # extra space per expert slot


_MIN_SLOT_IN = 0.8  # an expert slot must fit its "expert 15" tick label


_COUNT_FONTSIZE = 7.0


def _series_colours(n: int, ordered: bool) -> list:
    if ordered:
        # Layers are ordered: a sequential map reads "shallow -> deep".
        cmap = matplotlib.colormaps["viridis"]
        if n == 1:
            return [cmap(0.35)]
        return [cmap(0.05 + 0.8 * i / (n - 1)) for i in range(n)]
    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


@dataclass
class _ShareLayout:
    """Sizes of the grouped bar chart, in inches (bottom -> top: x labels, axes, legend, title)."""

    fig_w: float
    fig_h: float
    bottom_in: float
    axes_w_in: float
    axes_h_in: float
    legend_columns: int


def _share_layout(n_series: int, n_experts: int, series_labels: Sequence[str]) -> _ShareLayout:
    slot_in = max(_MIN_SLOT_IN, _BAR_IN * n_series + _GROUP_GAP_IN)
    fig_w = min(_MAX_FIG_WIDTH_IN, max(MIN_FIG_WIDTH_IN, slot_in * n_experts + _SIDE_MARGIN_IN))
    # Legend above the axes, as many columns as fit the figure width.
    entry_w_in = 0.75 + 0.075 * max(len(s) for s in series_labels)
    ncol = int(max(1, min(n_series, (fig_w - 0.4) // entry_w_in)))
    legend_rows = -(-n_series // ncol)
    # Very wide figures (E=16, many groups) get a little taller axes so the
    # aspect stays readable when the PNG is shown scaled down.
    bottom_in = 0.75
    axes_h_in = min(5.5, _AXES_HEIGHT_IN + 0.06 * max(0.0, fig_w - 12.0))
    legend_in = 0.32 + 0.24 * legend_rows
    title_in = 0.55
    return _ShareLayout(
        fig_w, bottom_in + axes_h_in + legend_in + title_in, bottom_in, fig_w - _SIDE_MARGIN_IN, axes_h_in, ncol
    )


def _draw_share_bars(
    ax, counts: np.ndarray, shares: np.ndarray, series_labels: Sequence[str], colours: list, layout: _ShareLayout
) -> float:
    """One bar per series in each expert slot, labelled with its raw count; returns the label font size."""
    n_series, n_experts = counts.shape
    x = np.arange(n_experts, dtype=float)
    total_width = 0.82
    bar_w = total_width / n_series
    offsets = (np.arange(n_series) - (n_series - 1) / 2.0) * bar_w
    # Count labels: font shrinks a little if bars get narrow (very wide E*S
    # hits the width cap).
    bar_pts = layout.axes_w_in * 72.0 / n_experts * bar_w
    fontsize = float(np.clip(bar_pts * 0.75, 4.5, _COUNT_FONTSIZE))
    for i in range(n_series):
        bars = ax.bar(
            x + offsets[i],
            shares[i],
            width=bar_w * 0.92,
            color=colours[i],
            edgecolor="white",
            linewidth=0.4,
            label=series_labels[i],
            zorder=2,
        )
        ax.bar_label(
            bars,
            labels=[format_count(c) for c in counts[i]],
            padding=2,
            rotation=90,
            fontsize=fontsize,
            color="0.2",
            # keep the dashed "uniform" line from striking through labels
            bbox=dict(boxstyle="square,pad=0.1", facecolor="white", edgecolor="none", alpha=0.85),
            zorder=5,
        )
    return fontsize


def _draw_uniform_line(ax, uniform: float, top_share: float, fontsize: float, axes_h_in: float) -> None:
    """The dashed uniform share, and head-room for the rotated count labels (the longest is ~6 chars)."""
    label_pts = 6 * 0.62 * fontsize + 4
    frac = min(0.5, label_pts / (axes_h_in * 72.0) + 0.03)
    ax.set_ylim(0.0, max(top_share, uniform) / (1.0 - frac))
    ax.axhline(uniform, color="0.25", linestyle="--", linewidth=1.1, zorder=4)
    ax.text(
        1.005,
        uniform,
        f"uniform\n{uniform:.3g}%",
        transform=blended_transform_factory(ax.transAxes, ax.transData),
        ha="left",
        va="center",
        fontsize=9,
        color="0.25",
    )


def _style_share_axes(ax, n_experts: int, ylabel: str) -> None:
    ax.set_xticks(np.arange(n_experts, dtype=float))
    ax.set_xticklabels([f"expert {e}" for e in range(n_experts)], fontsize=9)
    ax.set_xlim(-0.5, n_experts - 0.5)
    ax.set_xlabel("expert", fontsize=11)
    ax.set_ylabel(ylabel, fontsize=11)
    ax.tick_params(axis="y", labelsize=9)
    ax.yaxis.grid(True, color="0.88", linewidth=0.8, zorder=0)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _grouped_share_figure(
    counts: np.ndarray,
    series_labels: Sequence[str],
    *,
    title: str,
    ylabel: str,
    legend_title: str,
    ordered_colours: bool,
) -> Figure:
    """Grouped bar chart: one bar group per expert, one bar per row of ``counts``.

    ``counts`` is [n_series, n_experts] of raw counts; bar height is the share
    of the row's total in percent, bar label is the compact raw count.
    """
    n_series, n_experts = counts.shape
    shares = shares_percent(counts)
    layout = _share_layout(n_series, n_experts, series_labels)
    fig = Figure(figsize=(layout.fig_w, layout.fig_h), dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_axes(
        (
            1.25 / layout.fig_w,
            layout.bottom_in / layout.fig_h,
            layout.axes_w_in / layout.fig_w,
            layout.axes_h_in / layout.fig_h,
        )
    )
    fontsize = _draw_share_bars(ax, counts, shares, series_labels, _series_colours(n_series, ordered_colours), layout)
    _draw_uniform_line(ax, 100.0 / n_experts, float(shares.max()), fontsize, layout.axes_h_in)
    _style_share_axes(ax, n_experts, ylabel)
    ax.legend(
        loc="lower center",
        bbox_to_anchor=(0.5, 1.0 + 0.08 / layout.axes_h_in),
        ncol=layout.legend_columns,
        fontsize=9,
        title=legend_title,
        title_fontsize=9,
        frameon=False,
    )
    fig.suptitle(title, fontsize=14, fontweight="bold", y=1.0 - 0.12 / layout.fig_h, va="top")
    return fig


def plot_pooled_expert_histogram(
    expert_counts: Mapping[str, np.ndarray], path: str | os.PathLike, title: str | None = None
) -> Path:
    """Expert choice per group, all MoE layers pooled.

    Args:
        expert_counts: group name (e.g. ``"test"``, ``"programming"``) ->
            int array [n_moe_layers, n_experts] of real tokens routed to each
            expert by each layer's router.  All arrays must have the same shape.
        path: PNG to write (atomically).
        title: figure title; a default naming the layer count is used if None.

    Returns:
        The written path.

    Raises:
        ValueError: no groups, a non-2-D / empty / negative array, or shapes
            that differ between groups.
    """
    if not isinstance(expert_counts, Mapping) or len(expert_counts) == 0:
        raise ValueError("expert_counts must be a non-empty mapping group -> [n_layers, n_experts] counts")
    mats = {str(g): as_count_matrix(f"expert_counts[{g!r}]", a) for g, a in expert_counts.items()}
    shapes = {g: m.shape for g, m in mats.items()}
    if len(set(shapes.values())) != 1:
        detail = ", ".join(f"{g}={s}" for g, s in shapes.items())
        raise ValueError(
            f"all groups in expert_counts must have the same shape [n_moe_layers, n_experts]; got {detail}"
        )
    n_layers, n_experts = next(iter(shapes.values()))
    groups = list(mats)
    pooled = np.stack([mats[g].sum(axis=0) for g in groups])  # [G, E]
    labels = [f"{g} (n={int(round(pooled[i].sum())):,})" for i, g in enumerate(groups)]
    if title is None:
        layer_word = "layer" if n_layers == 1 else "layers"
        title = f"Expert choice per group, {n_layers} MoE {layer_word} pooled ({n_experts} experts)"
    fig = _grouped_share_figure(
        pooled,
        labels,
        title=title,
        ylabel="share of group's routed tokens (%)",
        legend_title="group (routed tokens, all layers)",
        ordered_colours=False,
    )
    return save_figure_atomic(fig, path)


def plot_topic_layer_histogram(
    group: str, counts: np.ndarray, path: str | os.PathLike, layer_names: Sequence[str] | None = None
) -> Path:
    """Expert choice per layer for one group (topic / split).

    Args:
        group: group name, used in the title.
        counts: int array [n_layers, n_experts] of routed real tokens.
        path: PNG to write (atomically).
        layer_names: legend label per layer (e.g. ``"block 1"``); defaults to
            ``"layer 0"``, ``"layer 1"``, ...

    Returns:
        The written path.

    Raises:
        ValueError: bad ``counts`` shape/values or ``layer_names`` length.
    """
    mat = as_count_matrix(f"counts for group {group!r}", counts)
    n_layers = mat.shape[0]
    if layer_names is None:
        names = [f"layer {i}" for i in range(n_layers)]
    else:
        names = [str(n) for n in layer_names]
        if len(names) != n_layers:
            raise ValueError(
                f"layer_names has {len(names)} entries but counts has {n_layers} layers (shape {mat.shape})"
            )
    totals = mat.sum(axis=1)
    if np.all(totals == totals[0]):
        legend_title = f"layer (n={int(round(totals[0])):,} routed tokens each)"
    else:
        legend_title = "layer"
        names = [f"{n} (n={int(round(t)):,})" for n, t in zip(names, totals)]
    fig = _grouped_share_figure(
        mat,
        names,
        title=f"Expert choice per layer: {group}",
        ylabel="share of layer's routed tokens (%)",
        legend_title=legend_title,
        ordered_colours=True,
    )
    return save_figure_atomic(fig, path)
