"""The study's numbers: per run what step 4 and the common evaluation wrote, per arm the same over seeds.

A run contributes (results/<tag>/): common_eval.json (MLM loss and accuracy on the common set), metrics.csv (its
own test split), routing_stats.json (per MoE layer the topic and token-class specialization indices with their
intervals, the routing saturation curve, local consistency) and ablation.json (per layer and expert whether the
loss increase depends on topic or token class). An arm aggregates its seeds: a per-seed value (the mean over its
MoE layers) summarized by the seed mean with a t interval and the seed range.

The common set is the reference arm's test split: the four masking arms and seed_replica share the reference's
step-1 split, so none of them trained on it. The balanced arm has its own split (train_topics), which holds many
of those documents, so it is scored apart: it and the reference arm on the test documents neither trained on
("balanced_subset"), and the table gives their paired difference.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from config_utils import PipelineError
from process_exp_results.experiments.common_eval import (
    CommonSet,
    difference_interval,
    document_texts,
    seed_summary,
    write_common_eval,
)
from process_exp_results.experiments.learned import learned_markdown
from process_exp_results.experiments.result_files import read_json, read_result_folder
from process_exp_results.report.formatting import MISSING, format_number, with_interval

REFERENCE_ARM = "seq64_mask0.15"  # the early profile's; a sweep.json names its own ("reference_arm")
LEARNED_REFERENCE_ARM = "moe_top1"
BALANCED_ARM = "seq64_mask0.15_balanced"
ABLATION_ALPHA = 0.05  # a cell "depends on topic" at p <= 0.05; by chance 5% of cells do


def _evaluate(common: CommonSet, run: dict) -> dict:
    try:
        return common.evaluate(Path(run["run_dir"]))
    except PipelineError as error:  # one run that cannot be scored does not stop the others
        print(f"common set: {run['tag']}: {error}")
        return {"error": str(error)}


def score_on_common_set(runs: list[dict], reference_arm: str = REFERENCE_ARM) -> None:
    """common_eval.json for every finished run (see the module doc): "common" for every arm but the balanced one,
    "balanced_subset" for the reference and balanced arms."""
    finished = [run for run in runs if run["status"] != "failed" and (Path(run["run_dir"]) / "model").is_dir()]
    reference = next((run for run in finished if run["arm"] == reference_arm), None)
    if reference is None:
        return
    masked, processed = Path(reference["masked_dir"]), Path(reference["processed_dir"])
    trained_on = {folder: document_texts(folder) for folder in {run["processed_dir"] for run in finished}}
    shared = {run["processed_dir"] for run in finished if run["arm"] != BALANCED_ARM}
    common = CommonSet(masked, processed, set().union(*(trained_on[folder] for folder in shared)))
    subset = None
    if any(run["arm"] == BALANCED_ARM for run in finished):
        subset = CommonSet(masked, processed, set().union(*trained_on.values()))
    for run in finished:
        values = {} if run["arm"] == BALANCED_ARM else {"common": _evaluate(common, run)}
        if subset is not None and run["arm"] in (reference_arm, BALANCED_ARM):
            values["balanced_subset"] = _evaluate(subset, run)
        write_common_eval(Path(run["results_dir"]), values)
    print(f"common set: {common.description['documents']} test documents of {masked}")
    if subset is not None:
        print(f"balanced arm vs reference: on the {subset.description['documents']} of them neither trained on")


def ablation_cells(ablation: dict | None, layer: str) -> dict:
    """Per layer: how many experts' loss increases depend on topic / token class at p <= ABLATION_ALPHA."""
    entry = (ablation or {}).get(layer) or {}
    counts = {}
    for factor in ("topic", "class"):
        p_values = [p for p in (entry.get(f"{factor}_p_value") or {}).values() if p is not None]
        counts[factor] = [sum(p <= ABLATION_ALPHA for p in p_values), len(p_values)]
    return counts


def consecutive_vs_random(stats: dict | None, layer: str) -> float | None:
    """How much more often neighbouring tokens share their top-1 expert under the trained router than under
    random routers with its loads on the same hidden states (their mean); None without the reference."""
    reference = (((stats or {}).get("consecutive") or {}).get(layer) or {}).get("random_reference") or {}
    band = reference.get("random_load_matched") or {}
    return reference["trained"] - band["mean"] if reference.get("trained") is not None and band else None


def layer_row(layer: dict, stats: dict, ablation: dict | None) -> dict:
    references = layer.get("references") or {}
    topic, token_class = references.get("topic") or {}, references.get("token_class") or {}
    saturation = (stats.get("saturation") or {}).get(layer["layer"]) or {}
    top1 = saturation.get("top1") or []
    return {
        "layer": layer["layer"],
        "topic_nmi": layer.get("nmi"),
        "topic_nmi_random": (topic.get("random_load_matched") or {}).get("mean"),
        "topic_index": topic.get("index"),
        "topic_index_ci": topic.get("index_ci"),
        "token_class_index": token_class.get("index"),
        "token_class_index_ci": token_class.get("index_ci"),
        "settled_at": saturation.get("settled_at"),
        "agreement_before_last": top1[-2] if len(top1) >= 2 else None,
        "consecutive_vs_random": consecutive_vs_random(stats, layer["layer"]),
        "ablation": ablation_cells(ablation, layer["layer"]),
    }


def run_row(run: dict) -> dict:
    """One run: arm, seed, status, its common-set and own test metrics, and one row per MoE layer."""
    files = read_result_folder(Path(run["results_dir"]))
    evaluations, stats, ablation = files["common"] or {}, files["stats"] or {}, files["ablation"]
    common, subset = evaluations.get("common") or {}, evaluations.get("balanced_subset") or {}
    test = files["metrics"].get("test", {})
    return {
        "tag": run["tag"],
        "arm": run.get("arm"),
        "seed": run.get("seed"),
        "status": run.get("status"),
        "extra_failed": run.get("extra_failed") or [],  # the learned profile's step 4 on checkpoints or families
        "common_loss": common.get("mlm_loss"),
        "common_accuracy": common.get("accuracy"),
        "common_set": common.get("common_set"),
        "subset_loss": subset.get("mlm_loss"),
        "subset_set": subset.get("common_set"),
        "own_test_loss": float(test["mlm_loss"]) if test else None,
        "own_test_accuracy": float(test["accuracy"]) if test else None,
        "layers": [layer_row(layer, stats, ablation) for layer in stats.get("layers", [])],
    }


def _layer_mean(row: dict, key: str) -> float | None:
    values = [layer[key] for layer in row["layers"] if layer[key] is not None]
    return float(np.mean(values)) if values else None


def _pairs_clearing(rows: list[dict], key: str) -> list[int]:
    """[layer-seed pairs whose interval lies above 0, pairs with an interval, all layer-seed pairs] (a layer whose
    best linear router is no better than random routers has no index)."""
    intervals = [layer[f"{key}_ci"] for row in rows for layer in row["layers"] if layer[f"{key}_ci"]]
    return [sum(interval[0] > 0 for interval in intervals), len(intervals), sum(len(row["layers"]) for row in rows)]


def _ablation_share(row: dict, factor: str) -> float | None:
    """A seed's share of (layer, expert) cells whose loss increase depends on the factor at p <= ABLATION_ALPHA."""
    hits, cells = (sum(layer["ablation"][factor][i] for layer in row["layers"]) for i in (0, 1))
    return hits / cells if cells else None


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
    """An arm's finished seeds together (see the module doc); ablation shares are per seed, their interval over
    seeds (the experts of one layer share their permutations, so cells are not independent trials)."""
    done = [row for row in rows if row["status"] != "failed" and (row["layers"] or row["common_loss"] is not None)]
    cells = {
        factor: [sum(layer["ablation"][factor][i] for row in done for layer in row["layers"]) for i in (0, 1)]
        for factor in ("topic", "class")
    }
    return {
        "seeds": len(done),
        "common_loss": seed_summary([row["common_loss"] for row in done]),
        "common_accuracy": seed_summary([row["common_accuracy"] for row in done]),
        "subset_loss": seed_summary([row.get("subset_loss") for row in done]),
        "own_test_loss": seed_summary([row["own_test_loss"] for row in done]),
        "topic_nmi": seed_summary([_layer_mean(row, "topic_nmi") for row in done]),
        "topic_nmi_random": seed_summary([_layer_mean(row, "topic_nmi_random") for row in done]),
        "topic_index": seed_summary([_layer_mean(row, "topic_index") for row in done]),
        "topic_pairs_clearing_0": _pairs_clearing(done, "topic_index"),
        "token_class_index": seed_summary([_layer_mean(row, "token_class_index") for row in done]),
        "token_class_pairs_clearing_0": _pairs_clearing(done, "token_class_index"),
        "consecutive_vs_random": seed_summary([_layer_mean(row, "consecutive_vs_random") for row in done]),
        "ablation": {
            factor: {"cells": counts, "share": seed_summary([_ablation_share(row, factor) for row in done])}
            for factor, counts in cells.items()
        },
        "saturation": _saturation(done),
    }


def summarize_sweep(sweep_dir: Path) -> dict:
    """Per run and per arm (in the sweep's order); each arm's common-set loss minus the reference arm's, with a
    Welch interval over seeds (the balanced arm: on the documents neither trained on, see the module doc)."""
    sweep = json.loads((Path(sweep_dir) / "sweep.json").read_text(encoding="utf-8"))
    reference = sweep.get("reference_arm", REFERENCE_ARM)
    rows = [run_row(run) for run in sweep["runs"]]
    arms = list(dict.fromkeys(row["arm"] for row in rows))
    summary = {arm: arm_summary([row for row in rows if row["arm"] == arm]) for arm in arms}

    def losses(arm: str, key: str) -> list[float]:
        return [row[key] for row in rows if row["arm"] == arm and row["status"] != "failed" and row[key] is not None]

    for arm in arms:
        key = "subset_loss" if arm == BALANCED_ARM else "common_loss"
        summary[arm]["loss_minus_reference"] = difference_interval(losses(arm, key), losses(reference, key))
    subset = next((row["subset_set"] for row in rows if row.get("subset_set")), None)
    earlier = [earlier_starts_seconds(run) for run in sweep["runs"]]
    return {
        # its runs, data steps included; the sweep times a run's last invocation, so add its earlier training starts
        "seconds": round(sum((run.get("seconds") or 0) + (more or 0) for run, more in zip(sweep["runs"], earlier)), 1),
        "runs_with_unrecorded_starts": sum(more is None for more in earlier),
        "corpus": sweep.get("corpus"),
        "design": sweep.get("design"),
        "reference_arm": reference,
        "runs": rows,
        "arms": summary,
        "common_set": next((row["common_set"] for row in rows if row.get("common_set")), None),
        "balanced_subset": subset,
    }


def earlier_starts_seconds(run: dict) -> float | None:
    """Seconds of step 3 that the sweep's time for the run leaves out, from its training manifest: the starts before
    its last, or all of them when the sweep found it trained by an earlier invocation (None: a resumed run's
    checkpoint predates the record)."""
    manifest = read_json(Path(run["run_dir"]) / "manifest.json")
    if manifest is None:
        return 0.0
    resumed = manifest.get("resumed_from") is not None
    all_starts = manifest.get("seconds_all_starts") if resumed else manifest["seconds"]
    if run.get("trained_earlier"):
        return all_starts
    return None if all_starts is None else all_starts - manifest["seconds"]


def minutes_text(design: dict) -> str:
    """'12.3 min', or 'at least 12.3 min' when some resumed run's earlier starts went unrecorded."""
    text = f"{design.get('seconds', 0) / 60:.1f} min"
    return f"at least {text}" if design.get("runs_with_unrecorded_starts") else text


def _seeds_cell(summary: dict, digits: int = 3) -> str:
    """'mean [t interval] (min-max)' over seeds; the value alone for one seed."""
    if summary["mean"] is None:
        return MISSING
    if summary["ci"] is None:
        return format_number(summary["mean"], digits)
    spread = f"{format_number(summary['min'], digits)}-{format_number(summary['max'], digits)}"
    return f"{with_interval(summary['mean'], summary['ci'], digits)} ({spread})"


def _index_cell(summary: dict, pairs: list[int]) -> str:
    cleared, with_interval_, total = pairs
    without = f", {total - with_interval_} without an index" if total > with_interval_ else ""
    return f"{_seeds_cell(summary, 2)} ({cleared}/{with_interval_}{without})"


def _cells_cell(ablation: dict) -> str:
    hits, n = ablation["cells"]
    return MISSING if not n else f"{hits}/{n}; {_seeds_cell(ablation['share'], 2)}"


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
    "own test split's loss (its own masks)",
    "topic NMI: trained / random routers",
    "topic index [95% CI] (pairs > 0)",
    "token-class index [95% CI] (pairs > 0)",
    "ablation: topic-dependent cells; share",
    "ablation: class-dependent cells; share",
    "settled at step (seeds); agreement before the last",
    "consecutive, minus random routers",
]


# the shorter table of docs/results.md: the masking metrics on the common set, the two indices, the ablation, saturation
SHORT_COLUMNS = [ARM_COLUMNS[index] for index in (0, 2, 3, 4, 6, 7, 8, 9, 11)]


def arm_markdown(design: dict, columns: list[str] = ARM_COLUMNS) -> str:
    """The arm table of one corpus and design (the given columns of ARM_COLUMNS)."""
    keep = [ARM_COLUMNS.index(column) for column in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for arm, summary in design["arms"].items():
        difference = summary["loss_minus_reference"]
        balanced = arm == BALANCED_ARM
        cells = [
            arm,
            str(summary["seeds"]),
            f"{_seeds_cell(summary['subset_loss'])} *" if balanced else _seeds_cell(summary["common_loss"]),
            MISSING
            if arm == design.get("reference_arm", REFERENCE_ARM) or difference["difference"] is None
            else with_interval(difference["difference"], difference["ci"], 3, signed=True) + (" *" if balanced else ""),
            MISSING if balanced else _seeds_cell(summary["common_accuracy"]),
            _seeds_cell(summary["own_test_loss"]),
            f"{format_number(summary['topic_nmi']['mean'], 4)} / {format_number(summary['topic_nmi_random']['mean'], 4)}",
            _index_cell(summary["topic_index"], summary["topic_pairs_clearing_0"]),
            _index_cell(summary["token_class_index"], summary["token_class_pairs_clearing_0"]),
            _cells_cell(summary["ablation"]["topic"]),
            _cells_cell(summary["ablation"]["class"]),
            _settled_cell(summary["saturation"]),
            _seeds_cell(summary["consecutive_vs_random"]),
        ]
        lines.append("| " + " | ".join(cells[index] for index in keep) + " |")
    return "\n".join(lines)


def design_notes(design: dict) -> list[str]:
    """The common set and the balanced arm's subset, in words."""
    notes = []
    if design.get("common_set"):
        common = design["common_set"]
        notes.append(
            f"Common set: {common['documents']} test documents of the reference arm, seq_len {common['seq_len']}, "
            f"mask {common['mask_prob']}, seed {common['seed']}."
        )
    if design.get("balanced_subset"):
        notes.append(
            f"* {BALANCED_ARM}: its own split holds {design['balanced_subset']['excluded_documents']} of those "
            f"documents, so it and the reference arm are scored on the other {design['balanced_subset']['documents']}"
            f" (loss there; difference paired on those documents)."
        )
    if design.get("design") == "held_out":
        notes.append(
            "Held-out design: the routing analysis pools the held-out topics with the test split's, as the earlier "
            "study did (held-out topics are unfamiliar text: topic and novelty mix); ablation: the test split's topics."
        )
    return notes


LEGEND = (
    "Per-seed values are means over the MoE layers; [95% CI] is a t interval over seeds (a single seed has none), "
    "(a-b) the seed range. The indices, ablation, saturation and consistency are step 4's, on each run's own test "
    "split (its own seq_len and masks). Index: 0 = no more specific than random routers with the same loads on the "
    "same hidden states, 1 = the best linear router; topic NMI (normalized mutual information of top-1 expert and topic): the trained router's and "
    "the load-matched random routers' mean, what the earlier study read by eye; (k/n) = layer-seed pairs whose own interval lies above 0 (a "
    "layer whose best linear router is no better than random routers has no index). Ablation: (layer, expert) cells "
    "whose loss increase when the expert is disabled depends on topic / token class at p <= 0.05, pooled over "
    "seeds; share = per-seed share, interval over seeds; chance alone gives 0.05. Settled: the step from which "
    ">= 90% of probe tokens go to the final top-1 expert, median over the seeds where every layer settled; "
    "agreement = that share at the evaluation before the last. Consecutive: the rate at which neighbouring tokens "
    "share their top-1 expert, minus that of random routers with the same loads on the same hidden states."
)


def study_markdown(designs: dict, settings: dict) -> str:
    parts = []
    for name, design in designs.items():
        parts.append(f"### {design['corpus']}, {design['design']} topics ({name}: {minutes_text(design)} of runs)\n")
        parts.append(arm_markdown(design))
        parts.append("\n" + "\n".join(design_notes(design)) + "\n")
        parts.append("Shorter (docs/results.md's):\n\n" + arm_markdown(design, SHORT_COLUMNS) + "\n")
        if design.get("learned"):
            parts.append(learned_markdown(design["learned"]) + "\n")
    parts.append(LEGEND)
    all_runs = {
        "seconds": sum(design.get("seconds", 0) for design in designs.values()),
        "runs_with_unrecorded_starts": sum(design.get("runs_with_unrecorded_starts", 0) for design in designs.values()),
    }
    unrecorded = all_runs["runs_with_unrecorded_starts"]
    parts.append(
        f"\n{settings['seeds']} seed(s) per arm; {minutes_text(all_runs)} of runs in all"
        + (f" ({unrecorded} resumed run(s) from before step 3 recorded its earlier starts)" if unrecorded else "")
        + f"; this invocation {settings['seconds'] / 60:.1f} min."
    )
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
        rows = [row for row in design["runs"] if row["arm"] == arm and row["status"] != "failed"]
        values = [row[key] if key in row else _layer_mean(row, key) for row in rows]
        _seed_points(axes, position + offset, summary[key], values, colour, label if position == 0 else None)
    arms = list(design["arms"])
    axes.set_xticks(range(len(arms)), [arm.replace("_", " ") for arm in arms], rotation=30, ha="right", fontsize=8)
    axes.grid(axis="y", alpha=0.3)


def _loss_panel(axes, design: dict) -> None:
    """The common-set loss per arm; the balanced arm (scored on other documents) as its paired difference."""
    _arm_axes(axes, design, "common_loss", "C0", 0.0, "one seed")
    balanced = design["arms"].get(BALANCED_ARM)
    if balanced and balanced["loss_minus_reference"]["difference"] is not None:
        difference = balanced["loss_minus_reference"]
        text = with_interval(difference["difference"], difference["ci"], 3, signed=True)
        position = list(design["arms"]).index(BALANCED_ARM)
        axes.annotate(
            f"vs reference,\nown documents:\n{text}",
            (position, 0.5),
            xycoords=("data", "axes fraction"),
            ha="center",
            fontsize=7,
            color="0.3",
        )
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

    from process_exp_results.figures.common import save_figure_atomic

    fig = Figure(figsize=(11, 4.6))
    left, right = fig.subplots(1, 2)
    _loss_panel(left, design)
    _index_panel(right, design)
    fig.tight_layout()
    return save_figure_atomic(fig, path)


def write_figures(designs: dict, out_dir: Path) -> list[Path]:
    """study_loss.png (common-set loss per arm, seen design) and study_index.png (topic and token-class index per
    arm, every design)."""
    from matplotlib.figure import Figure

    from process_exp_results.figures.common import save_figure_atomic

    seen = [design for design in designs.values() if design["design"] == "seen"]
    paths = []
    if seen:
        fig = Figure(figsize=(5.2 * len(seen), 4.4))
        for axes, design in zip(np.atleast_1d(fig.subplots(1, len(seen))), seen):
            _loss_panel(axes, design)
        fig.tight_layout()
        paths.append(save_figure_atomic(fig, Path(out_dir) / "study_loss.png"))
    columns = min(len(designs), 2)  # a corpus per row: its seen and held-out designs side by side
    rows = -(-len(designs) // columns)
    fig = Figure(figsize=(6.2 * columns, 4.6 * rows))
    panels = np.atleast_1d(fig.subplots(rows, columns)).ravel()
    for axes, design in zip(panels, designs.values()):
        _index_panel(axes, design)
    for axes in panels[len(designs) :]:
        axes.set_visible(False)
    fig.tight_layout()
    paths.append(save_figure_atomic(fig, Path(out_dir) / "study_index.png"))
    return paths
