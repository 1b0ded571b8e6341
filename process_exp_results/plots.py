"""Histograms of which experts the MoE routers pick, and the routing-analysis figures.

The two histogram functions take raw routing counts (how many real, i.e. non-padding,
tokens each router sent to each expert) and draw the *share* of routed tokens
per expert in percent, so that groups or layers of different sizes can be
compared, with the raw count written on every bar and a dashed line at the
uniform share ``100 / n_experts``.

Figures are built with the object-oriented API (``matplotlib.figure.Figure``
rendered by the Agg canvas), so nothing is registered with ``pyplot``, no
display is needed and no figure is left open.  Every file is written through
``config_utils.atomic_file`` (a temporary beside it, renamed into place), so
readers never see a half-written PNG.

The routing analysis adds a topic x expert heatmap per layer
(``plot_topic_expert_heatmap``) and the per-layer NMI / conditional MI figure
(``plot_nmi_per_layer``), both drawn from ``routing_stats.analyze_routing``.
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

from config_utils import atomic_file
from process_exp_results.formatting import MISSING, format_count, format_interval, format_number, p_text

__all__ = [
    "DPI",
    "format_count",
    "plot_nmi_per_layer",
    "plot_pooled_expert_histogram",
    "plot_specialization_index",
    "plot_topic_expert_heatmap",
    "plot_topic_layer_histogram",
    "save_figure_atomic",
]

DPI = 150

# Layout constants, in inches / points.
_AXES_HEIGHT_IN = 3.8
_MIN_FIG_WIDTH_IN = 7.5
_MAX_FIG_WIDTH_IN = 40.0
_SIDE_MARGIN_IN = 2.2  # y label, tick labels, "uniform" label
_BAR_IN = 0.22  # width budget per bar
_GROUP_GAP_IN = 0.3  # extra space per expert slot
_MIN_SLOT_IN = 0.8  # an expert slot must fit its "expert 15" tick label
_COUNT_FONTSIZE = 7.0


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #


def save_figure_atomic(fig: Figure, path: str | os.PathLike, *, dpi: int = DPI) -> Path:
    """Save ``fig`` as PNG to ``path`` atomically (``config_utils.atomic_file``: a temporary beside it, renamed
    into place, removed if saving fails); parent directories are created."""
    if fig.canvas is None or not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    with atomic_file(path) as tmp_path:
        fig.savefig(tmp_path, format="png", dpi=dpi, bbox_inches="tight", pad_inches=0.15)
    return Path(path)


def _as_count_matrix(name: str, arr) -> np.ndarray:
    """Validate one [n_layers, n_experts] count array and return it as float."""
    a = np.asarray(arr)
    if a.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D count array [n_layers, n_experts], got shape {a.shape}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"{name}: count array is empty (shape {a.shape})")
    if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating) or a.dtype == bool):
        raise ValueError(f"{name}: counts must be numeric, got dtype {a.dtype}")
    a = a.astype(np.float64)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name}: counts contain NaN or inf")
    if np.any(a < 0):
        raise ValueError(f"{name}: counts must be non-negative")
    return a


def _shares_percent(counts: np.ndarray) -> np.ndarray:
    """Row-wise share in percent; an all-zero row gives all-zero shares."""
    totals = counts.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        shares = np.where(totals > 0, 100.0 * counts / np.where(totals > 0, totals, 1.0), 0.0)
    return shares


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
    fig_w = min(_MAX_FIG_WIDTH_IN, max(_MIN_FIG_WIDTH_IN, slot_in * n_experts + _SIDE_MARGIN_IN))
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
    shares = _shares_percent(counts)
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


# --------------------------------------------------------------------------- #
# public API
# --------------------------------------------------------------------------- #


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
    mats = {str(g): _as_count_matrix(f"expert_counts[{g!r}]", a) for g, a in expert_counts.items()}
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
    mat = _as_count_matrix(f"counts for group {group!r}", counts)
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


# --------------------------------------------------------------------------- #
# routing statistics (step 4's routing analysis)
# --------------------------------------------------------------------------- #


@dataclass
class HeatmapLayout:
    """Sizes of a heatmap figure, in inches (left -> right: row labels, cells, colour bar); the topic x expert
    heatmap's and the ablation's."""

    fig_w: float
    fig_h: float
    label_in: float
    cell_in: float
    n_rows: int
    n_cols: int

    def cells_rect(self) -> tuple[float, float, float, float]:
        return (
            self.label_in / self.fig_w,
            0.75 / self.fig_h,
            self.cell_in * self.n_cols / self.fig_w,
            0.42 * self.n_rows / self.fig_h,
        )

    def colour_bar_rect(self) -> tuple[float, float, float, float]:
        return (
            (self.label_in + self.cell_in * self.n_cols + 0.2) / self.fig_w,
            0.75 / self.fig_h,
            0.18 / self.fig_w,
            0.42 * self.n_rows / self.fig_h,
        )


def _heatmap_layout(labels: Sequence[str], n_topics: int, n_experts: int) -> HeatmapLayout:
    cell_in = 0.62 if n_experts <= 12 else 0.48
    label_in = 0.3 + 0.075 * max(len(label) for label in labels)
    fig_w = max(_MIN_FIG_WIDTH_IN - 1.5, label_in + cell_in * n_experts + 1.6)
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


def heatmap_titles(fig: Figure, title: str, subtitle: str, fig_h: float) -> None:
    """A heatmap's bold title and grey one-line key, top left (the topic x expert and the ablation heatmaps)."""
    fig.suptitle(title, fontsize=11.5, fontweight="bold", x=0.02, ha="left", y=1.0 - 0.12 / fig_h, va="top")
    fig.text(0.02, 1.0 - 0.45 / fig_h, subtitle, fontsize=8.5, color="0.3", ha="left", va="top")


def plot_topic_expert_heatmap(topic_names: Sequence[str], counts, path: str | os.PathLike, layer_name: str) -> Path:
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
    """
    mat = _as_count_matrix(f"topic x expert counts for {layer_name!r}", counts)
    n_topics, n_experts = mat.shape
    if len(topic_names) != n_topics:
        raise ValueError(f"{len(topic_names)} topic names for {n_topics} rows of counts")
    shares = _shares_percent(mat)
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
        f"Topic x expert, {layer_name}: % of each topic's tokens per expert",
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


def _interval(entry: Mapping, value_key: str, ci_key: str) -> tuple[float, float, float]:
    value = float(entry[value_key])
    low, high = entry.get(ci_key) or (value, value)
    return value, float(low), float(high)


FACTOR_SERIES = (("topic", "tab:red", "o"), ("token class", "tab:blue", "s"), ("token id", "tab:green", "^"))
FACTOR_KEYS = {"topic": "topic", "token class": "token_class", "token id": "token_id"}


def _factor_entry(layer: Mapping, label: str) -> Mapping:
    return layer if label == "topic" else layer[FACTOR_KEYS[label]]


def _nmi_scale(layers: Sequence[Mapping]) -> tuple[bool, float, np.ndarray]:
    """Whether the NMI axis is logarithmic (the values span more than 20x), the floor that keeps an NMI of 0 on
    it, and the positive values drawn (for the limits)."""
    values = []
    for layer in layers:
        for label, _, _ in FACTOR_SERIES:
            values += list(_interval(_factor_entry(layer, label), "nmi", "nmi_ci"))
            reference = (layer.get("references") or {}).get(FACTOR_KEYS[label])
            if reference:
                band = reference["random_load_matched"]
                values += [band["low"], band["high"]] + ([reference["probe"]] if reference.get("probe") else [])
    values = np.array(values, dtype=float)
    positive = values[values > 0]
    log_y = positive.size > 0 and positive.max() / max(positive.min(), 1e-12) > 20
    return log_y, (1e-4 if log_y else 0.0), positive


def _draw_references(ax, xi: float, reference: Mapping, colour, floor: float, drawn: set[str]) -> None:
    """The load-matched random routers' band (a grey bar, a line at the mean) and the probe's hollow star."""
    band = reference["random_load_matched"]
    ax.bar(
        xi,
        max(band["high"], floor) - max(band["low"], floor),
        bottom=max(band["low"], floor),
        width=0.13,
        color="0.85",
        edgecolor="0.6",
        linewidth=0.6,
        zorder=1,
        label=None if "band" in drawn else "random routers, loads matched (2.5-97.5%)",
    )
    ax.plot([xi - 0.065, xi + 0.065], [max(band["mean"], floor)] * 2, color="0.35", linewidth=1.2, zorder=2)
    drawn.add("band")
    if reference.get("probe") is not None:
        ax.scatter(
            xi,
            max(reference["probe"], floor),
            marker="*",
            s=120,
            facecolor="white",
            edgecolor=colour,
            linewidths=1.2,
            zorder=3,
            label=None if "probe" in drawn else "best linear router (probe)",
        )
        drawn.add("probe")


def _draw_nmi_series(ax, layers: Sequence[Mapping], x: np.ndarray, floor: float) -> None:
    """Per factor and layer the trained router's NMI with its interval, in front of its references."""
    offsets = np.linspace(-0.26, 0.26, len(FACTOR_SERIES))
    drawn: set[str] = set()
    for (label, colour, marker), offset in zip(FACTOR_SERIES, offsets):
        for xi, layer in zip(x + offset, layers):
            value, low, high = (max(v, floor) for v in _interval(_factor_entry(layer, label), "nmi", "nmi_ci"))
            reference = (layer.get("references") or {}).get(FACTOR_KEYS[label])
            if reference:
                _draw_references(ax, xi, reference, colour, floor, drawn)
            ax.errorbar(
                xi,
                value,
                yerr=[[max(value - low, 0.0)], [max(high - value, 0.0)]],
                fmt=marker,
                color=colour,
                markersize=7,
                capsize=4,
                elinewidth=1.4,
                zorder=4,
                label=label if xi == x[0] + offset else None,
            )
            ax.annotate(
                format_number(value),
                (xi, value),
                xytext=(7, 0),
                textcoords="offset points",
                fontsize=7,
                color=colour,
                va="center",
                zorder=5,
            )


def _style_nmi_axis(ax, names: Sequence[str], log_y: bool, positive: np.ndarray) -> None:
    if log_y:
        from matplotlib.ticker import FuncFormatter, LogLocator

        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        ax.set_ylim(positive.min() / 1.6, min(positive.max() * 1.6, 1.6))  # every band and star inside
    else:
        ax.set_ylim(bottom=0)
    ax.set_xticks(np.arange(len(names), dtype=float))
    ax.set_xticklabels(names, fontsize=9)
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.set_ylabel("NMI with the top expert" + (" (log scale)" if log_y else ""), fontsize=10)
    ax.set_title("What predicts the expert? Trained router (95% CI) vs references", fontsize=10.5)
    ax.legend(fontsize=8, frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=3)
    ax.yaxis.grid(True, color="0.9", which="major")


def _draw_cmi_excess(ax, layers: Sequence[Mapping], names: Sequence[str], n_perm: int) -> None:
    """Per layer the excess of I(expert; topic | token) over its null, with interval, p and verdict."""
    x = np.arange(len(layers), dtype=float)
    excess = [_interval(layer["conditional_topic"], "cmi_excess", "cmi_excess_ci") for layer in layers]
    value, low, high = (np.array(c) for c in zip(*excess))
    ax.axhline(0.0, color="0.5", linestyle="--", linewidth=1, zorder=1)
    ax.errorbar(
        x,
        value,
        yerr=np.vstack([value - low, high - value]).clip(min=0),
        fmt="D",
        color="tab:purple",
        markersize=7,
        capsize=4,
        elinewidth=1.4,
        zorder=3,
    )
    for xi, layer, v in zip(x, layers, high):
        cond = layer["conditional_topic"]
        text = f"{format_number(cond['cmi_excess'])}\n{p_text(cond['p_value'], n_perm)}\n{cond['explained_by']}"
        ax.annotate(
            text,
            (xi, v),
            xytext=(0, 5),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=7.5,
            color="0.25",
        )
    ax.set_xticks(x)
    ax.set_xticklabels(names, fontsize=9)
    ax.set_xlim(-0.6, len(layers) - 0.4)
    top, bottom = float(np.nanmax(np.r_[high, 0.0])), float(np.nanmin(np.r_[low, 0.0]))
    span = max(top - bottom, 1e-3)
    ax.set_ylim(bottom - 0.1 * span, top + 0.6 * span)
    ax.set_ylabel("bits above the permutation null", fontsize=10)
    ax.set_title("I(expert; topic | token): excess over its null", fontsize=10.5)
    ax.yaxis.grid(True, color="0.9")


def plot_nmi_per_layer(stats: Mapping, path: str | os.PathLike) -> Path:
    """How much of the expert choice each factor explains, per MoE layer, against its references.

    Left: NMI (0 = unrelated, 1 = determined) between the top expert and the document's topic, the token's class
    and the token id, with 95% bootstrap intervals; behind each, a grey bar spanning what random routers with the
    trained router's loads give on the same hidden states (2.5-97.5% over the draws, a line at their mean), and a
    hollow star at the best linear router (the probe). Right: the excess of I(expert; topic | token) over its
    permutation null (bits), with its interval: the part of the topic signal that the token's identity does not
    explain and that is not estimator bias.

    Args:
        stats: ``process_exp_results.routing_stats.analyze_routing`` result.
        path: PNG to write (atomically).
    """
    layers = list(stats["layers"])
    if not layers:
        raise ValueError("stats has no layers: nothing to plot")
    names = [layer["layer"] for layer in layers]
    log_y, floor, positive = _nmi_scale(layers)
    fig = Figure(figsize=(max(10.0, 5.0 + 1.5 * len(layers) * 2), 5.0), dpi=DPI)
    FigureCanvasAgg(fig)
    ax_nmi, ax_cmi = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.8, 1.0], "wspace": 0.3})
    _draw_nmi_series(ax_nmi, layers, np.arange(len(layers), dtype=float), floor)
    _style_nmi_axis(ax_nmi, names, log_y, positive)
    _draw_cmi_excess(ax_cmi, layers, names, int(stats.get("settings", {}).get("n_perm", 0)))
    for ax in (ax_nmi, ax_cmi):
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    fig.suptitle(
        f"Routing vs topic, token class and token ({stats.get('n_tokens', 0):,} tokens, "
        f"{stats.get('n_documents', 0):,} documents)",
        fontsize=12,
        fontweight="bold",
    )
    fig.subplots_adjust(bottom=0.2)
    return save_figure_atomic(fig, path)


_INDEX_SERIES = (("topic", "tab:red", "o"), ("token_class", "tab:blue", "s"))


def _draw_index_point(ax, xi: float, index: float, ci: Sequence[float], colour, marker: str, label) -> None:
    """One index with its interval, and both written above the interval."""
    # an interval need not contain its estimate (few resamples): draw the part that does
    ax.errorbar(
        xi,
        index,
        yerr=[[max(index - ci[0], 0.0)], [max(ci[1] - index, 0.0)]],
        fmt=marker,
        color=colour,
        markersize=8,
        capsize=5,
        elinewidth=1.6,
        zorder=3,
        label=label,
    )
    ax.annotate(
        f"{format_number(index, 2)}\n{format_interval(ci, 2)}",
        (xi, ci[1]),
        xytext=(0, 4),
        textcoords="offset points",
        ha="center",
        va="bottom",
        fontsize=7.5,
        color=colour,
    )


def _draw_index_series(ax, layers: Sequence[Mapping], x: np.ndarray) -> list[float]:
    """Per factor and layer the index with its interval, n/a where it is missing; returns the y values drawn
    (with -0.15 and 1.15, so the 0 and 1 lines stay in view)."""
    bounds = [-0.15, 1.15]
    for (factor, colour, marker), offset in zip(_INDEX_SERIES, (-0.12, 0.12)):
        for xi, layer in zip(x + offset, layers):
            reference = layer["references"].get(factor) or {}
            index, ci = reference.get("index"), reference.get("index_ci")
            if index is None or ci is None:
                ax.annotate(MISSING, (xi, 0.0), ha="center", va="bottom", fontsize=8, color=colour)
                continue
            bounds += [ci[0], ci[1]]
            label = factor.replace("_", " ") if xi == x[0] + offset else None
            _draw_index_point(ax, xi, index, ci, colour, marker, label)
    return bounds


def _draw_index_anchors(ax) -> None:
    """The lines at 0 (a random router) and 1 (the best linear router), named right of the axes."""
    ax.axhline(0.0, color="0.35", linestyle="--", linewidth=1.1)
    ax.axhline(1.0, color="0.35", linestyle=":", linewidth=1.1)
    transform = blended_transform_factory(ax.transAxes, ax.transData)
    ax.text(
        1.02, 0.0, "0: random router\n(learned nothing)", transform=transform, va="center", fontsize=8.5, color="0.3"
    )
    ax.text(1.02, 1.0, "1: best linear\nrouter (probe)", transform=transform, va="center", fontsize=8.5, color="0.3")


def _style_index_axis(ax, names: Sequence[str], bounds: Sequence[float]) -> None:
    span = max(bounds) - min(bounds)
    ax.set_ylim(min(bounds) - 0.05 * span, max(bounds) + 0.2 * span)
    ax.set_xticks(np.arange(len(names), dtype=float))
    ax.set_xticklabels(names, fontsize=9)
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.set_ylabel("specialization index", fontsize=10)
    ax.legend(fontsize=8.5, frameon=False, loc="upper left", ncol=2)
    ax.yaxis.grid(True, color="0.92")
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def plot_specialization_index(stats: Mapping, path: str | os.PathLike) -> Path:
    """The specialization index per MoE layer and factor, with 95% intervals: 0 = no more than a router that
    learned nothing (random routers with the trained loads, on the same hidden states), 1 = as much as the best
    linear router for the factor. A layer is called specialized on a factor when the interval clears 0 (and its
    permutation test passes). Layers without references are left out; n/a where the probe found nothing.
    """
    layers = [layer for layer in stats["layers"] if layer.get("references")]
    if not layers:
        raise ValueError("stats has no references: nothing to plot (step 4 ran without router inputs)")
    names = [layer["layer"] for layer in layers]
    fig = Figure(figsize=(max(7.5, 3.0 + 1.6 * len(layers)), 4.6), dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.1, 0.17, 0.62, 0.7))
    bounds = _draw_index_series(ax, layers, np.arange(len(layers), dtype=float))
    _draw_index_anchors(ax)
    _style_index_axis(ax, names, bounds)
    fig.suptitle(
        "What did the router learn? (95% CI over documents and random routers)",
        fontsize=11.5,
        fontweight="bold",
        x=0.02,
        ha="left",
    )
    return save_figure_atomic(fig, path)


def plot_routing_saturation(saturation: Mapping, path: str | os.PathLike) -> Path:
    """Router saturation over training: per MoE layer, the share of the probe tokens whose top-1 expert at each
    evaluation equals the final model's (solid) and the mean top-k overlap / k (dashed, when k >= 2), with the
    0.9 line from which a layer counts as settled.

    Args:
        saturation: ``train.routing_snapshots.saturation`` result, {layer: {"steps", "top1", "topk", "settled_at"}}.
        path: PNG to write (atomically).
    """
    if not saturation:
        raise ValueError("no saturation to plot (the run has fewer than two routing snapshots)")
    fig = Figure(figsize=(7.5, 4.4), dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.1, 0.14, 0.64, 0.74))
    colours = matplotlib.colormaps["tab10"]
    for index, (layer, values) in enumerate(saturation.items()):
        colour = colours(index % 10)
        ax.plot(values["steps"], values["top1"], marker="o", markersize=3.5, color=colour, label=f"{layer}: top-1")
        if values["topk"] != values["top1"]:  # k >= 2
            ax.plot(values["steps"], values["topk"], linestyle="--", color=colour, label=f"{layer}: top-k overlap")
        if values["settled_at"] is not None:
            ax.axvline(values["settled_at"], color=colour, linestyle=":", linewidth=1.0)
    ax.axhline(0.9, color="0.35", linestyle="--", linewidth=1.0)
    ax.text(
        1.0,
        0.9,
        " 0.9",
        transform=blended_transform_factory(ax.transAxes, ax.transData),
        va="center",
        fontsize=8,
        color="0.35",
    )
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("training step")
    ax.set_ylabel("agreement with the final model")
    ax.set_title("Router saturation: probe tokens routed as by the final model", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.04, 1.0), fontsize=8, frameon=False)
    return save_figure_atomic(fig, path)
