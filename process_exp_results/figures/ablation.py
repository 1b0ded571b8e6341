"""The ablation heatmap per MoE layer: how much each group's MLM loss rises (nats) when each expert is disabled."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

from process_exp_results.figures.common import DPI, HeatmapLayout, heatmap_titles, save_figure_atomic
from process_exp_results.report.formatting import format_number
from process_exp_results.report.sentences import worst_expert


def _ablation_table(entry: Mapping) -> tuple[list[str], list[str], np.ndarray]:
    """Experts (columns), row labels (the groups, then "test: <topic>" with two or more topics) and the deltas."""
    experts = sorted(entry["experts"], key=int)
    groups = list(entry["experts"][experts[0]]) if experts else []
    rows = [(g, [entry["experts"][e][g]["delta"] for e in experts]) for g in groups]
    topic_deltas = entry.get("topic_deltas") or {}
    topics = sorted({t for e in experts for t in topic_deltas.get(e, {})})
    if len(topics) >= 2:
        rows += [(f"test: {t}", [topic_deltas.get(e, {}).get(t) for e in experts]) for t in topics]
    values = np.array([[np.nan if v is None else float(v) for v in r] for _, r in rows], dtype=float)
    return experts, [r[0] for r in rows], values.reshape(len(rows), len(experts))


def _symmetric_limit(values: np.ndarray) -> float:
    """The largest |delta|; 1 when all are zero (or none is finite), so that vmin < vcenter < vmax."""
    finite = values[np.isfinite(values)]
    limit = float(np.abs(finite).max()) if finite.size else 0.0
    return limit if limit > 0 else 1.0


def _heatmap_layout(row_labels: Sequence[str], n_experts: int):
    n_rows, n_cols = max(len(row_labels), 1), max(n_experts, 1)
    cell_in = 0.62 if n_cols <= 12 else 0.5
    label_in = 0.3 + 0.075 * max([len(label) for label in row_labels] + [4])
    fig_w = max(6.0, label_in + cell_in * n_cols + 1.8)
    return HeatmapLayout(fig_w, 1.5 + 0.42 * n_rows, label_in, cell_in, n_rows, n_cols)


def _write_cell_values(ax, values: np.ndarray, cmap, norm, fontsize: float) -> None:
    """Each delta in its cell, white on dark colours."""
    for r in range(values.shape[0]):
        for c in range(values.shape[1]):
            value = values[r, c]
            rgba = cmap(norm(value)) if np.isfinite(value) else (0.85, 0.85, 0.85, 1.0)
            dark = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2] < 0.5
            ax.text(
                c,
                r,
                format_number(value, 2, signed=True),
                ha="center",
                va="center",
                fontsize=fontsize,
                color="white" if dark else "0.1",
            )


def _style_heatmap_axes(ax, experts: Sequence[str], row_labels: Sequence[str]) -> None:
    ax.set_xticks(np.arange(len(experts)))
    ax.set_xticklabels(experts, fontsize=9)
    ax.set_xlabel("disabled expert", fontsize=10)
    ax.set_yticks(np.arange(len(row_labels)))
    ax.set_yticklabels(row_labels, fontsize=9)
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)


def _draw_colorbar(fig, image, rect, limit: float) -> None:
    bar = fig.colorbar(image, cax=fig.add_axes(rect))
    bar.set_ticks([-limit, 0.0, limit], labels=[f"{-limit:.2g}", "0", f"{limit:.2g}"])
    bar.ax.tick_params(labelsize=8)
    bar.set_label("loss increase\n(nats / masked token)", fontsize=8.5)


_ABLATION_KEY = "MLM loss increase (nats per masked token) when one expert is disabled; red = it rises, blue = it falls"


def _ablation_title(entry: Mapping, layer: str) -> str:
    """The finding: which expert's removal costs the test split most."""
    worst = worst_expert(entry)
    if worst is None:
        return f"Expert ablation, {layer}: MLM loss increase when one expert is disabled"
    expert, test = worst
    return f"{layer}: without expert {expert} the test loss rises most ({format_number(test['delta'], 2, signed=True)} nats)"


def plot_ablation(ablation: Mapping, layer: str, path) -> Path:
    """Heatmap for one layer ("block 0"): rows = groups (then the seen topics of the topic test, "test: <topic>"),
    columns = experts, cell = loss increase (nats per masked token) when that expert is disabled, written in
    the cell. Diverging colours centred at 0 (red = loss rises, blue = falls), symmetric limits (so vmin <
    0 < vmax even when all values are equal, zero or of one sign); grey = no masked tokens."""

    experts, row_labels, values = _ablation_table(ablation[layer])
    limit = _symmetric_limit(values)
    norm = TwoSlopeNorm(vmin=-limit, vcenter=0.0, vmax=limit)
    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="0.85")
    layout = _heatmap_layout(row_labels, len(experts))
    fig = Figure(figsize=(layout.fig_w, layout.fig_h), dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_axes(layout.cells_rect())
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    _write_cell_values(ax, values, cmap, norm, 8.0 if layout.n_cols <= 8 else 6.5)
    _style_heatmap_axes(ax, experts, row_labels)
    _draw_colorbar(fig, image, layout.colour_bar_rect(), limit)
    heatmap_titles(fig, _ablation_title(ablation[layer], layer), _ABLATION_KEY, layout.fig_h)
    return save_figure_atomic(fig, path)
