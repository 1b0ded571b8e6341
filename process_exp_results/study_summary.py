"""The study's numbers: per run what step 4 and the common evaluation wrote, per arm the same over seeds.

A run contributes (results/<tag>/): common_eval.json (MLM loss and accuracy on the common set), metrics.csv (its
own test split), routing_stats.json (per MoE layer the topic and token-class specialization indices with their
intervals, the routing saturation curve, local consistency) and ablation.json (per layer and expert whether the
loss increase depends on topic or token class). An arm aggregates its seeds: a per-seed value (the mean over its
MoE layers) summarized by the seed mean with a t interval and the seed range; ablation cells are pooled over
layers, experts and seeds, as a share with a Wilson interval against the 5% a test at 0.05 gives by chance.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np

from process_exp_results.common_eval import (
    CommonSet,
    difference_interval,
    read_common_eval,
    seed_summary,
    step1_doc_ids,
    write_common_eval,
)
from process_exp_results.formatting import MISSING, format_number, with_interval

ABLATION_ALPHA = 0.05  # a cell "depends on topic" at p <= 0.05; by chance 5% of cells do


def score_on_common_set(runs: list[dict], sweep_dir: Path, reference_arm: str, balanced_arm: str) -> None:
    """common_eval.json for every finished run: its model on the reference arm's test split, less the documents
    any arm trained on (the balanced arm's split differs)."""
    finished = [run for run in runs if run["status"] != "failed" and (Path(run["run_dir"]) / "model").is_dir()]
    reference = next((run for run in runs if run["arm"] == reference_arm and run["status"] != "failed"), None)
    if reference is None or not finished:
        return
    seen: set[int] = set()
    for processed in {run["processed_dir"] for run in finished if run["processed_dir"] != reference["processed_dir"]}:
        seen |= step1_doc_ids(Path(processed))
    common = CommonSet(Path(reference["masked_dir"]), seen)
    for run in finished:
        write_common_eval(Path(run["results_dir"]), common.evaluate(Path(run["run_dir"])))
    print(
        f"common set: {common.description['documents']} test documents of {reference['masked_dir']} "
        f"({common.description['excluded_documents']} left out: in the balanced arm's training data)"
    )


def _test_metrics(folder: Path) -> dict:
    path = folder / "metrics.csv"
    if not path.is_file():
        return {}
    with open(path, newline="", encoding="utf-8") as handle:
        return {row["group"]: row for row in csv.DictReader(handle)}


def ablation_cells(ablation: dict | None, layer: str) -> dict:
    """Per layer: how many experts' loss increases depend on topic / token class at p <= ABLATION_ALPHA."""
    entry = (ablation or {}).get(layer) or {}
    counts = {}
    for factor in ("topic", "class"):
        p_values = [p for p in (entry.get(f"{factor}_p_value") or {}).values() if p is not None]
        counts[factor] = [sum(p <= ABLATION_ALPHA for p in p_values), len(p_values)]
    return counts


def layer_row(layer: dict, stats: dict, ablation: dict | None) -> dict:
    references = layer.get("references") or {}
    topic, token_class = references.get("topic") or {}, references.get("token_class") or {}
    saturation = (stats.get("saturation") or {}).get(layer["layer"]) or {}
    consecutive = (stats.get("consecutive") or {}).get(layer["layer"]) or {}
    top1 = saturation.get("top1") or []
    return {
        "layer": layer["layer"],
        "topic_nmi": layer.get("nmi"),
        "topic_index": topic.get("index"),
        "topic_index_ci": topic.get("index_ci"),
        "token_class_index": token_class.get("index"),
        "token_class_index_ci": token_class.get("index_ci"),
        "settled_at": saturation.get("settled_at"),
        "agreement_before_last": top1[-2] if len(top1) >= 2 else None,
        "consecutive_excess": consecutive.get("top1_excess"),
        "consecutive_excess_ci": consecutive.get("top1_excess_ci"),
        "ablation": ablation_cells(ablation, layer["layer"]),
    }


def run_row(run: dict) -> dict:
    """One run: arm, seed, status, its common-set and own test metrics, and one row per MoE layer."""
    folder = Path(run["results_dir"])
    common = read_common_eval(folder) or {}
    test = _test_metrics(folder).get("test", {})
    stats_path, ablation_path = folder / "routing_stats.json", folder / "ablation.json"
    stats = json.loads(stats_path.read_text(encoding="utf-8")) if stats_path.is_file() else {}
    ablation = json.loads(ablation_path.read_text(encoding="utf-8")) if ablation_path.is_file() else None
    return {
        "tag": run["tag"],
        "arm": run.get("arm"),
        "seed": run.get("seed"),
        "status": run.get("status"),
        "common_loss": common.get("mlm_loss"),
        "common_accuracy": common.get("accuracy"),
        "common_set": common.get("common_set"),
        "own_test_loss": float(test["mlm_loss"]) if test else None,
        "own_test_accuracy": float(test["accuracy"]) if test else None,
        "layers": [layer_row(layer, stats, ablation) for layer in stats.get("layers", [])],
    }


def _layer_mean(row: dict, key: str) -> float | None:
    values = [layer[key] for layer in row["layers"] if layer[key] is not None]
    return float(np.mean(values)) if values else None


def wilson_interval(successes: int, n: int) -> list[float] | None:
    """95% Wilson score interval for a proportion (None for n = 0)."""
    if n == 0:
        return None
    z, share = 1.96, successes / n
    centre = (share + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(share * (1 - share) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [centre - half, centre + half]


def _pairs_clearing(rows: list[dict], key: str) -> list[int]:
    """[layer-seed pairs whose interval lies above 0, pairs with an interval]."""
    intervals = [layer[f"{key}_ci"] for row in rows for layer in row["layers"] if layer[f"{key}_ci"]]
    return [sum(interval[0] > 0 for interval in intervals), len(intervals)]


def _saturation(rows: list[dict]) -> dict:
    """Per seed the step by which every layer had settled (None: some layer never did), and the agreement."""
    steps = []
    for row in rows:
        settled = [layer["settled_at"] for layer in row["layers"]]
        steps.append(max(settled) if settled and None not in settled else None)
    found = [step for step in steps if step is not None]
    return {
        "settled_seeds": [len(found), len(steps)],
        "median_step": float(np.median(found)) if found else None,
        "agreement_before_last": seed_summary([_layer_mean(row, "agreement_before_last") for row in rows]),
    }


def arm_summary(rows: list[dict]) -> dict:
    """An arm's seeds together (see the module doc)."""
    done = [row for row in rows if row["layers"] or row["common_loss"] is not None]
    cells = {
        factor: [sum(layer["ablation"][factor][i] for row in done for layer in row["layers"]) for i in (0, 1)]
        for factor in ("topic", "class")
    }
    return {
        "seeds": len(done),
        "common_loss": seed_summary([row["common_loss"] for row in done]),
        "common_accuracy": seed_summary([row["common_accuracy"] for row in done]),
        "own_test_loss": seed_summary([row["own_test_loss"] for row in done]),
        "topic_index": seed_summary([_layer_mean(row, "topic_index") for row in done]),
        "topic_pairs_clearing_0": _pairs_clearing(done, "topic_index"),
        "token_class_index": seed_summary([_layer_mean(row, "token_class_index") for row in done]),
        "token_class_pairs_clearing_0": _pairs_clearing(done, "token_class_index"),
        "consecutive_excess": seed_summary([_layer_mean(row, "consecutive_excess") for row in done]),
        "ablation": {
            factor: {
                "cells": counts,
                "share": counts[0] / counts[1] if counts[1] else None,
                "ci": wilson_interval(*counts),
            }
            for factor, counts in cells.items()
        },
        "saturation": _saturation(done),
    }


def summarize_sweep(sweep_dir: Path) -> dict:
    """Per run and per arm (in the sweep's order); the differences of each arm's common-set loss from the
    reference arm's (the first), with Welch intervals over seeds."""
    sweep = json.loads((Path(sweep_dir) / "sweep.json").read_text(encoding="utf-8"))
    rows = [run_row(run) for run in sweep["runs"]]
    arms = list(dict.fromkeys(row["arm"] for row in rows))
    summary = {arm: arm_summary([row for row in rows if row["arm"] == arm]) for arm in arms}
    reference = [row["common_loss"] for row in rows if row["arm"] == arms[0] and row["common_loss"] is not None]
    for arm in arms:
        values = [row["common_loss"] for row in rows if row["arm"] == arm and row["common_loss"] is not None]
        summary[arm]["common_loss_minus_reference"] = difference_interval(values, reference)
    return {
        "seconds": round(sum(run.get("seconds") or 0 for run in sweep["runs"]), 1),  # its runs, data steps included
        "corpus": sweep.get("corpus"),
        "design": sweep.get("design"),
        "reference_arm": arms[0],
        "runs": rows,
        "arms": summary,
    }


def _seeds_cell(summary: dict, digits: int = 3) -> str:
    """'mean [t interval] (min-max)' over seeds; the value alone for one seed."""
    if summary["mean"] is None:
        return MISSING
    if summary["ci"] is None:
        return format_number(summary["mean"], digits)
    spread = f"{format_number(summary['min'], digits)}-{format_number(summary['max'], digits)}"
    return f"{with_interval(summary['mean'], summary['ci'], digits)} ({spread})"


def _cells_cell(ablation: dict) -> str:
    hits, n = ablation["cells"]
    return MISSING if not n else f"{hits}/{n} = {with_interval(ablation['share'], ablation['ci'], 2)}"


def _settled_cell(saturation: dict) -> str:
    settled, n = saturation["settled_seeds"]
    step = format_number(saturation["median_step"], 0) if saturation["median_step"] is not None else "-"
    agreement = saturation["agreement_before_last"]["mean"]
    return f"{step} ({settled}/{n} seeds); {format_number(agreement, 2)}"


ARM_COLUMNS = [
    "arm",
    "seeds",
    "common-set MLM loss [95% CI] (seed range)",
    "minus reference [95% CI]",
    "common-set accuracy",
    "topic index [95% CI] (pairs > 0)",
    "token-class index [95% CI] (pairs > 0)",
    "ablation: topic-dependent cells",
    "ablation: class-dependent cells",
    "settled at step (seeds); agreement before the last",
    "consecutive excess",
]


def arm_markdown(design: dict) -> str:
    """The arm table of one corpus and design."""
    lines = ["| " + " | ".join(ARM_COLUMNS) + " |", "|" + "---|" * len(ARM_COLUMNS)]
    for arm, summary in design["arms"].items():
        difference = summary["common_loss_minus_reference"]
        topic_pairs, class_pairs = summary["topic_pairs_clearing_0"], summary["token_class_pairs_clearing_0"]
        cells = [
            arm,
            str(summary["seeds"]),
            _seeds_cell(summary["common_loss"]),
            MISSING
            if arm == design["reference_arm"] or difference["difference"] is None
            else with_interval(difference["difference"], difference["ci"], 3, signed=True),
            _seeds_cell(summary["common_accuracy"]),
            f"{_seeds_cell(summary['topic_index'], 2)} ({topic_pairs[0]}/{topic_pairs[1]})",
            f"{_seeds_cell(summary['token_class_index'], 2)} ({class_pairs[0]}/{class_pairs[1]})",
            _cells_cell(summary["ablation"]["topic"]),
            _cells_cell(summary["ablation"]["class"]),
            _settled_cell(summary["saturation"]),
            _seeds_cell(summary["consecutive_excess"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


LEGEND = (
    "Common set: the reference arm's test split (the same documents for every model, cut to 64 tokens, masked "
    "once at 0.15). Per-seed values are means over the MoE layers; [95% CI] is a t interval over seeds (a single "
    "seed has none), (a-b) the seed range. Index: 0 = no more specific than random routers with the same loads on "
    "the same hidden states, 1 = the best linear router; (k/n) = layer-seed pairs whose own interval lies above 0. "
    "Ablation: experts (layer x expert x seed) whose loss increase when disabled depends on topic / token class at "
    "p <= 0.05, with a Wilson interval; chance alone gives 0.05. Settled: the step from which >= 90% of probe "
    "tokens go to the final top-1 expert, median over seeds where every layer settled; agreement = that share at "
    "the evaluation before the last. Consecutive excess: how much more often neighbouring tokens share their top-1 "
    "expert than under the load-matched chance."
)


def study_markdown(designs: dict, settings: dict) -> str:
    parts = []
    for name, design in designs.items():
        minutes = design.get("seconds", 0) / 60
        parts.append(f"### {design['corpus']}, {design['design']} topics ({name}, {minutes:.1f} min)\n")
        parts.append(arm_markdown(design))
        common = next((row["common_set"] for row in design["runs"] if row.get("common_set")), None)
        if common:
            parts.append(
                f"\nCommon set: {common['documents']} documents ({common['excluded_documents']} left out), "
                f"seq_len {common['seq_len']}, mask {common['mask_prob']}, seed {common['seed']}."
            )
        parts.append("")
    parts.append(LEGEND)
    parts.append(f"\nWhole study: {settings['seconds'] / 60:.1f} min, {settings['seeds']} seed(s) per arm.")
    return "\n".join(parts)


def _seed_points(axes, x: float, summary: dict, values: list, colour: str, label: str | None) -> None:
    """One arm: its seeds as dots, the mean and its interval as a bar."""
    values = [value for value in values if value is not None]
    axes.scatter([x] * len(values), values, s=14, color=colour, alpha=0.6, zorder=3, label=label)
    if summary["mean"] is not None:
        low, high = summary["ci"] or [summary["mean"], summary["mean"]]
        axes.errorbar(
            [x],
            [summary["mean"]],
            yerr=[[summary["mean"] - low], [high - summary["mean"]]],
            fmt="_",
            color="black",
            markersize=14,
            capsize=4,
            zorder=4,
        )


def _arm_axes(axes, design: dict, key: str, colour: str, offset: float, label: str) -> None:
    for position, (arm, summary) in enumerate(design["arms"].items()):
        rows = [row for row in design["runs"] if row["arm"] == arm]
        values = [row[key] if key.startswith("common") else _layer_mean(row, key) for row in rows]
        _seed_points(axes, position + offset, summary[key], values, colour, label if position == 0 else None)
    arms = list(design["arms"])
    axes.set_xticks(range(len(arms)), [arm.replace("_", " ") for arm in arms], rotation=30, ha="right", fontsize=8)
    axes.grid(axis="y", alpha=0.3)


def _loss_panel(axes, design: dict) -> None:
    _arm_axes(axes, design, "common_loss", "C0", 0.0, "one seed")
    axes.set_title(f"{design['corpus']}: MLM loss on the common set\n(lower is better; bar: mean, 95% CI)", fontsize=10)
    axes.set_ylabel("MLM loss (nats per masked token)")
    axes.legend(fontsize=8)


def _index_panel(axes, design: dict) -> None:
    _arm_axes(axes, design, "topic_index", "C3", -0.15, "topic")
    _arm_axes(axes, design, "token_class_index", "C2", 0.15, "token class")
    axes.axhline(0.0, color="0.3", linestyle="--", linewidth=0.9)
    axes.set_title(f"{design['corpus']}, {design['design'].replace('_', '-')} topics: specialization", fontsize=10)
    axes.set_ylabel("index (0 = random router, 1 = best linear)")
    axes.legend(fontsize=8)


def write_arm_figure(design: dict, path: Path) -> Path:
    """One corpus and design: the common-set loss per arm (left) and the two specialization indices (right)."""
    from matplotlib.figure import Figure

    from process_exp_results.plots import save_figure_atomic

    fig = Figure(figsize=(11, 4.6))
    left, right = fig.subplots(1, 2)
    _loss_panel(left, design)
    _index_panel(right, design)
    fig.tight_layout()
    return save_figure_atomic(fig, path)


def write_figures(designs: dict, out_dir: Path) -> list[Path]:
    """study_masking.png (common-set loss per arm, seen design) and study_index.png (topic and token-class
    index per arm, every design)."""
    from matplotlib.figure import Figure

    from process_exp_results.plots import save_figure_atomic

    seen = [design for design in designs.values() if design["design"] == "seen"]
    paths = []
    if seen:
        fig = Figure(figsize=(5.2 * len(seen), 4.4))
        for axes, design in zip(np.atleast_1d(fig.subplots(1, len(seen))), seen):
            _loss_panel(axes, design)
        fig.tight_layout()
        paths.append(save_figure_atomic(fig, Path(out_dir) / "study_masking.png"))
    fig = Figure(figsize=(5.2 * len(designs), 4.6))
    for axes, design in zip(np.atleast_1d(fig.subplots(1, len(designs))), designs.values()):
        _index_panel(axes, design)
    fig.tight_layout()
    paths.append(save_figure_atomic(fig, Path(out_dir) / "study_index.png"))
    return paths
