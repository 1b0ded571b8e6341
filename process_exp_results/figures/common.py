"""What every figure shares: figures are built with the object-oriented API (``matplotlib.figure.Figure`` rendered by
the Agg canvas), so nothing is registered with ``pyplot``, no display is needed and no figure is left open; every
file is written through ``config_utils.atomic_file`` (a temporary beside it, renamed into place), so readers never
see a half-written PNG. Also the heatmap layout and the count-to-share helpers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from config_utils import atomic_file

DPI = 150


def save_figure_atomic(fig: Figure, path: str | os.PathLike, *, dpi: int = DPI) -> Path:
    """Save ``fig`` as PNG to ``path`` atomically (``config_utils.atomic_file``: a temporary beside it, renamed
    into place, removed if saving fails); parent directories are created."""
    if fig.canvas is None or not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    with atomic_file(path) as tmp_path:
        fig.savefig(tmp_path, format="png", dpi=dpi, bbox_inches="tight", pad_inches=0.15)
    return Path(path)


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


def heatmap_titles(fig: Figure, title: str, subtitle: str, fig_h: float) -> None:
    """A heatmap's bold title and grey one-line key, top left (the topic x expert and the ablation heatmaps)."""
    fig.suptitle(title, fontsize=11.5, fontweight="bold", x=0.02, ha="left", y=1.0 - 0.12 / fig_h, va="top")
    fig.text(0.02, 1.0 - 0.45 / fig_h, subtitle, fontsize=8.5, color="0.3", ha="left", va="top")


MIN_FIG_WIDTH_IN = 7.5


def as_count_matrix(name: str, arr) -> np.ndarray:
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


def shares_percent(counts: np.ndarray) -> np.ndarray:
    """Row-wise share in percent; an all-zero row gives all-zero shares."""
    totals = counts.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        shares = np.where(totals > 0, 100.0 * counts / np.where(totals > 0, totals, 1.0), 0.0)
    return shares
