"""One figure for the learned profile (learned.py's views): does routing specialize as the model learns? Four panels
against the training step: accuracy, both specialization indices with their intervals, routing agreement with the
final model, and the validation loss of the MoE arms against the dense one with equal active parameters."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from process_exp_results.experiments.learned import BAR_AGREEMENT, LEARNED_ACCURACY
from process_exp_results.figures.common import save_figure_atomic

FACTOR_STYLES = {"topic": "o-", "token_class": "s--"}


def _accuracy_panel(axes, summary: dict) -> None:
    validation = summary["validation"]
    steps, accuracy = [row["step"] for row in validation], [row["accuracy"] for row in validation]
    axes.plot(steps, accuracy, "-", color="0.4", label="validation (every evaluation)")
    points = [point for point in summary["points"] if point["test_accuracy"] is not None]
    axes.plot(
        [p["step"] for p in points],
        [p["test_accuracy"] for p in points],
        "o",
        color="black",
        label="test split (step 4)",
    )
    axes.axhline(
        LEARNED_ACCURACY, color="tab:red", linestyle=":", linewidth=1, label=f"the profile's bar ({LEARNED_ACCURACY})"
    )
    axes.set(title="masked-token accuracy", xlabel="training step", ylabel="accuracy")
    axes.legend(fontsize=8)


def _index_series(summary: dict, layer: str, factor: str) -> tuple[list, list, list]:
    """(steps, indices, [below, above]) of the points where the layer has an index for the factor."""
    steps, values, errors = [], [], [[], []]
    for point in summary["points"]:
        entry = point["layers"].get(layer, {})
        index = entry.get(f"{factor}_index")
        if index is None:
            continue
        low, high = entry.get(f"{factor}_index_ci") or (index, index)
        steps.append(point["step"])
        values.append(index)
        errors[0].append(index - low)
        errors[1].append(high - index)
    return steps, values, errors


def _index_panel(axes, summary: dict, layers: list[str]) -> None:
    for number, layer in enumerate(layers):
        for factor, style in FACTOR_STYLES.items():
            steps, values, errors = _index_series(summary, layer, factor)
            if steps:
                label = f"{layer}: {factor.replace('_', '-')}"
                axes.errorbar(steps, values, yerr=errors, fmt=style, color=f"C{number}", capsize=3, label=label)
    axes.axhline(0, color="0.5", linewidth=1)
    axes.set(title="specialization index (0 = random routers)", xlabel="training step", ylabel="index, 95% interval")
    axes.legend(fontsize=8)


def _agreement_panel(axes, summary: dict, layers: list[str]) -> None:
    for number, layer in enumerate(layers):
        curve = summary["saturation"].get(layer)
        if curve:
            axes.plot(curve["steps"], curve["top1"], "-", color=f"C{number}", label=layer)
    axes.axhline(BAR_AGREEMENT, color="tab:red", linestyle=":", linewidth=1, label=f"settled ({BAR_AGREEMENT})")
    axes.set(title="top-1 agreement with the final routing", xlabel="training step", ylabel="share of probe tokens")
    axes.set_ylim(0, 1.02)
    axes.legend(fontsize=8)


def _loss_panel(axes, curves: dict) -> None:
    for number, (arm, seeds) in enumerate(curves.items()):
        for seed, steps, losses in seeds:
            style = "-" if seed == 0 else "--"
            axes.plot(steps, losses, style, color=f"C{number + 3}", label=f"{arm} (seed {seed})")
    axes.set(title="validation MLM loss: experts vs dense, equal active parameters", xlabel="training step")
    axes.set_ylabel("loss (nats)")
    if curves:
        axes.legend(fontsize=8)


def write_emergence_figure(summary: dict | None, curves: dict, path: Path) -> Path | None:
    """The four panels (None before the reference's first seed has finished)."""
    if not summary or not summary["points"]:
        return None
    figure = Figure(figsize=(13, 9))
    grid = figure.subplots(2, 2)
    layers = list(summary["points"][-1]["layers"])
    _accuracy_panel(grid[0, 0], summary)
    _index_panel(grid[0, 1], summary, layers)
    _agreement_panel(grid[1, 0], summary, layers)
    _loss_panel(grid[1, 1], curves)
    title = f"Does routing specialize as the model learns? {summary['run']}, {summary['total_steps']} steps"
    figure.suptitle(title, fontsize=12)
    figure.tight_layout()
    return save_figure_atomic(figure, path)
