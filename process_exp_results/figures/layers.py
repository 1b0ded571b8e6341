"""The routing analysis per layer: NMI of the expert with topic, token class and token identity beside their
references, the conditional MI excess, the specialization index with its intervals, and how settled the routing
was over training.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.transforms import blended_transform_factory

from process_exp_results.analysis.verdicts import is_specialized
from process_exp_results.figures.common import DPI, save_figure_atomic
from process_exp_results.report.formatting import MISSING, format_interval, format_number, p_text


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
        stats: ``process_exp_results.analysis.statistics.analyze_routing`` result.
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


def _draw_index_point(ax, xi: float, index: float, ci: Sequence[float], colour, marker: str, label, side: int) -> None:
    """One index with its interval, both written beside the point (side -1: left, 1: right), away from the
    other factor's."""
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
        (xi, index),
        xytext=(9 * side, 0),
        textcoords="offset points",
        ha="left" if side > 0 else "right",
        va="center",
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
            _draw_index_point(ax, xi, index, ci, colour, marker, label, 1 if offset > 0 else -1)
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


def _index_title(layers: Sequence[Mapping]) -> str:
    """The finding: on which factor, in which layers, the router learned more than routers that learned nothing."""
    parts = []
    for factor, p_value in (
        ("topic", lambda layer: layer.get("p_value")),
        ("token_class", lambda layer: layer["token_class"].get("p_value")),
    ):
        found = [layer["layer"] for layer in layers if is_specialized(layer["references"].get(factor), p_value(layer))]
        parts.append(f"{factor.replace('_', ' ')} in {', '.join(found) if found else 'no layer'}")
    return "Specialized beyond routers that learned nothing: " + "; ".join(parts)


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
        _index_title(layers) + "\nspecialization index, 95% CI over documents and random routers",
        fontsize=11.5,
        fontweight="bold",
        x=0.02,
        ha="left",
    )
    return save_figure_atomic(fig, path)


def _saturation_title(saturation: Mapping) -> str:
    """The finding: which layers had settled, and when."""
    settled = [
        f"{layer} (step {values['settled_at']})"
        for layer, values in saturation.items()
        if values["settled_at"] is not None
    ]
    moving = [layer for layer, values in saturation.items() if values["settled_at"] is None]
    parts = ([f"settled in {', '.join(settled)}"] if settled else []) + (
        [f"still changing at the end of training in {', '.join(moving)}"] if moving else []
    )
    return "Routing " + "; ".join(parts) + "\n(probe tokens routed to the final model's top-1 expert)"


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
    ax.set_title(_saturation_title(saturation), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.04, 1.0), fontsize=8, frameon=False)
    return save_figure_atomic(fig, path)
