r"""Compare finished runs: one table of per-topic metrics and routing specialization, and one figure.

Reads step 4's result folders (<results>/<tag>/metrics.csv, and routing_stats.json where step 4 wrote it)
or a sweep folder (its sweep.json lists the runs, in grid order, with their grid values as columns).
Writes to --out: comparison.csv (one row per run: per group mlm_loss / accuracy / baseline; per MoE layer
topic NMI with its bootstrap interval and permutation p, what random routers with the same loads give on the
same hidden states, the best linear router, the topic and token-class specialization indices with intervals,
the excess of I(expert; topic | token) over its null with interval and p, what explains the topic signal, the
step routing settled at, neighbouring tokens' shared experts against random routers, and the ablation's
topic-dependent experts; and study.py's common-set loss and accuracy), comparison.md (the same, printed too) and
comparison.png (per run: the topic specialization index per layer with its interval, and test accuracy against
the baseline). For a study.py sweep also arms.md and arms.png: each arm over its seeds.
A run without routing_stats.json contributes its metrics only (the table says so). Examples:
    python process_exp_results/experiments/compare_runs.py process_exp_results/results/demo process_exp_results/results/big \
        --out process_exp_results/comparisons/demo_vs_big
    python process_exp_results/experiments/compare_runs.py process_exp_results/sweeps/seq_mask
"""

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[2])  # run as a script: import the project, not this folder

import argparse
import csv
import io
import json
import math

import numpy as np
from matplotlib.figure import Figure

from config_utils import PipelineError, run_step, write_text_atomic
from config_utils.cli import HelpFormatter
from process_exp_results.analysis.verdicts import is_specialized
from process_exp_results.experiments.result_files import read_result_folder
from process_exp_results.experiments.study_summary import (
    ablation_cells,
    arm_markdown,
    consecutive_vs_random,
    design_notes,
    summarize_sweep,
    write_arm_figure,
)
from process_exp_results.figures.common import save_figure_atomic
from process_exp_results.report.formatting import MISSING, format_number, format_p, with_interval

NO_ROUTING = "no routing_stats.json: metrics only"


def find_runs(paths: list[str]) -> list[dict]:
    """Each path is a result folder (has metrics.csv), a sweep folder (has sweep.json) or a folder of results."""
    runs = []
    for text in paths:
        path = Path(text)
        if (path / "sweep.json").is_file():
            sweep = json.loads((path / "sweep.json").read_text(encoding="utf-8"))
            for run in sweep["runs"]:
                folder = path / "results" / run["tag"]
                runs.append(
                    {
                        "name": run["tag"],
                        "folder": folder,
                        "grid": run.get("grid", {}),
                        "status": run.get("status"),
                        "arm": run.get("arm"),  # study.py and known_structure.py label their runs
                    }
                )
        elif (path / "metrics.csv").is_file():
            runs.append({"name": path.name, "folder": path, "grid": {}, "status": None})
        elif path.is_dir() and any(path.glob("*/metrics.csv")):
            runs += [
                {"name": sub.parent.name, "folder": sub.parent, "grid": {}, "status": None}
                for sub in sorted(path.glob("*/metrics.csv"))
            ]
        else:
            raise PipelineError(
                f"{path}: neither a result folder (metrics.csv), a sweep folder (sweep.json) nor a "
                f"folder of result folders; run inference/inference.py or sweep.py first"
            )
    names = [run["name"] for run in runs]
    for run in runs:  # two folders with one name (results/a/x and results/b/x): use the parent too
        if names.count(run["name"]) > 1:
            run["name"] = f"{run['folder'].parent.name}/{run['name']}"
    return runs


def load_run(run: dict) -> dict:
    """metrics (group -> row), routing stats, ablation and common-set evaluation (each None where step 4 or
    study.py wrote none); a missing metrics.csv marks the run as missing."""
    if not (run["folder"] / "metrics.csv").is_file():
        return {
            **run,
            "metrics": {},
            "stats": None,
            "ablation": None,
            "common": None,
            "note": f"no results ({run['status']})" if run["status"] else "no metrics.csv",
        }
    files = read_result_folder(run["folder"])
    return {**run, **files, "note": "" if files["stats"] else NO_ROUTING}


def as_float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


LAYER_COLUMNS = [
    "topic_nmi",
    "topic_nmi_ci_low",
    "topic_nmi_ci_high",
    "topic_p",
    "topic_random_mean",
    "topic_random_low",
    "topic_random_high",
    "topic_probe",
    "topic_index",
    "topic_index_ci_low",
    "topic_index_ci_high",
    "topic_specialized",
    "token_class_nmi",
    "token_class_index",
    "token_class_index_ci_low",
    "token_class_index_ci_high",
    "cmi",
    "cmi_excess",
    "cmi_excess_ci_low",
    "cmi_excess_ci_high",
    "cmi_p",
    "explained_by",
    "settled_at",
    "consecutive_vs_random",
    "ablation_topic_cells",
    "ablation_class_cells",
]


def layer_values(layer: dict, stats: dict | None = None, ablation: dict | None = None) -> dict:
    """The LAYER_COLUMNS of one layer of routing_stats.json (None where step 4 computed no references); its
    saturation and local consistency from the rest of stats, its ablation cells (experts whose loss increase
    depends on topic / token class at p <= 0.05, of all) from ablation.json."""
    conditional = layer.get("conditional_topic") or {}
    references = layer.get("references") or {}
    topic, token_class = references.get("topic") or {}, references.get("token_class") or {}
    band = topic.get("random_load_matched") or {}
    nan2 = [math.nan, math.nan]
    values = {
        "topic_nmi": layer.get("nmi"),
        "topic_p": layer.get("p_value"),
        "topic_random_mean": band.get("mean"),
        "topic_random_low": band.get("low"),
        "topic_random_high": band.get("high"),
        "topic_probe": topic.get("probe"),
        "topic_index": topic.get("index"),
        "topic_specialized": is_specialized(topic, layer.get("p_value")) if topic else None,
        "token_class_nmi": (layer.get("token_class") or {}).get("nmi"),
        "token_class_index": token_class.get("index"),
        "cmi": conditional.get("cmi"),
        "cmi_excess": conditional.get("cmi_excess"),
        "cmi_p": conditional.get("p_value"),
        "explained_by": conditional.get("explained_by"),
        "settled_at": ((stats or {}).get("saturation") or {}).get(layer["layer"], {}).get("settled_at"),
        "consecutive_vs_random": consecutive_vs_random(stats, layer["layer"]),
    }
    cells = ablation_cells(ablation, layer["layer"])
    for factor in ("topic", "class"):
        values[f"ablation_{factor}_cells"] = f"{cells[factor][0]}/{cells[factor][1]}" if cells[factor][1] else None
    for name, interval in (
        ("topic_nmi", layer.get("nmi_ci")),
        ("topic_index", topic.get("index_ci")),
        ("token_class_index", token_class.get("index_ci")),
        ("cmi_excess", conditional.get("cmi_excess_ci")),
    ):
        values[f"{name}_ci_low"], values[f"{name}_ci_high"] = interval or nan2
    return values


def table_rows(runs: list[dict]) -> tuple[list[str], list[dict], dict]:
    """One flat row per run (numbers for the CSV); columns in a stable order across runs; and the column
    families (grid keys, groups, layers) for the Markdown table."""
    grid_keys = list(dict.fromkeys(key for run in runs for key in run["grid"]))
    groups = list(dict.fromkeys(group for run in runs for group in run["metrics"]))
    layers = list(dict.fromkeys(layer["layer"] for run in runs if run["stats"] for layer in run["stats"]["layers"]))
    columns = ["run", *grid_keys, "common mlm_loss", "common accuracy"]
    for group in groups:
        columns += [f"{group} mlm_loss", f"{group} accuracy", f"{group} baseline"]
    for layer in layers:
        columns += [f"{layer} {name}" for name in LAYER_COLUMNS]
    columns.append("note")
    rows = []
    for run in runs:
        row = {"run": run["name"], **{key: run["grid"].get(key) for key in grid_keys}, "note": run["note"]}
        row["common mlm_loss"] = as_float((run.get("common") or {}).get("mlm_loss"))
        row["common accuracy"] = as_float((run.get("common") or {}).get("accuracy"))
        for group, metric in run["metrics"].items():
            row.update(
                {
                    f"{group} mlm_loss": as_float(metric.get("mlm_loss")),
                    f"{group} accuracy": as_float(metric.get("accuracy")),
                    f"{group} baseline": as_float(metric.get("majority_accuracy")),
                }
            )
        for layer in (run["stats"] or {}).get("layers", []):
            values = layer_values(layer, run["stats"], run.get("ablation"))
            row.update({f"{layer['layer']} {name}": value for name, value in values.items()})
        rows.append(row)
    return columns, rows, {"grid_keys": grid_keys, "groups": groups, "layers": layers}


def _number(row: dict, key: str, digits: int = 3) -> str:
    return format_number(as_float(row.get(key)), digits)


def _with_ci(row: dict, layer: str, name: str, digits: int = 3) -> str:
    interval = [as_float(row.get(f"{layer} {name}_ci_low")), as_float(row.get(f"{layer} {name}_ci_high"))]
    return with_interval(as_float(row.get(f"{layer} {name}")), interval, digits)


def _layer_cells(row: dict, layer: str) -> list[str]:
    """The eleven cells of one layer: topic NMI, p, random band, the two indices, CMI excess, p, explanation,
    the step its routing settled at, the consecutive-token excess and the ablation's topic-dependent cells."""
    if row.get(f"{layer} topic_nmi") is None:
        return [MISSING] * 11
    band = [as_float(row.get(f"{layer} topic_random_{end}")) for end in ("low", "high")]
    return [
        _with_ci(row, layer, "topic_nmi"),
        format_p(as_float(row.get(f"{layer} topic_p"))),
        with_interval(as_float(row.get(f"{layer} topic_random_mean")), band),
        _with_ci(row, layer, "topic_index", 2),
        _with_ci(row, layer, "token_class_index", 2),
        _with_ci(row, layer, "cmi_excess", 4),
        format_p(as_float(row.get(f"{layer} cmi_p"))),
        str(row[f"{layer} explained_by"]),
        MISSING if row.get(f"{layer} settled_at") is None else str(row[f"{layer} settled_at"]),
        _number(row, f"{layer} consecutive_vs_random"),
        row.get(f"{layer} ablation_topic_cells") or MISSING,
    ]


def markdown_table(rows: list[dict], families: dict) -> str:
    """The same numbers, value and interval in one cell, per group and per layer."""
    grid_keys, groups, layers = families["grid_keys"], families["groups"], families["layers"]
    header = ["run", *[key.rsplit(".", 1)[-1] for key in grid_keys]]
    header += ["common set acc / loss"] + [f"{group} acc (baseline) / loss" for group in groups]
    for layer in layers:
        header += [
            f"{layer} topic NMI [CI]",
            "p",
            "random, loads matched",
            "topic index [CI]",
            "class index [CI]",
            "CMI excess [CI]",
            "p",
            "explained by",
            "settled at",
            "consecutive minus random",
            "ablation: topic cells",
        ]
    header.append("note")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["run"], *[str(row.get(key)) for key in grid_keys]]
        cells.append(f"{_number(row, 'common accuracy')} / {_number(row, 'common mlm_loss', 2)}")
        cells += [
            f"{_number(row, f'{g} accuracy')} ({_number(row, f'{g} baseline')}) / {_number(row, f'{g} mlm_loss', 2)}"
            for g in groups
        ]
        for layer in layers:
            cells += _layer_cells(row, layer)
        cells.append(row.get("note") or "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparison_figure(runs: list[dict]) -> Figure:
    """Left: the topic specialization index per layer with its interval, per run (filled: the layer is called
    topic-specialized). Right: test accuracy and its baseline."""
    names = [run["name"] for run in runs]
    width = max(8.0, 1.1 * len(runs) + 4.0)
    fig = Figure(figsize=(width, 4.6))
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    x = np.arange(len(runs), dtype=float)
    layers = list(dict.fromkeys(layer["layer"] for run in runs if run["stats"] for layer in run["stats"]["layers"]))
    colours = [f"C{index % 10}" for index in range(len(layers))]
    step = 0.7 / max(len(layers), 1)
    for index, (layer, colour) in enumerate(zip(layers, colours)):
        xs, ys, low, high, specialized = [], [], [], [], []
        for position, run in zip(x, runs):
            found = [entry for entry in (run["stats"] or {}).get("layers", []) if entry["layer"] == layer]
            values = layer_values(found[0]) if found else {}
            if values.get("topic_index") is not None and not math.isnan(values["topic_index_ci_low"]):
                xs.append(position + (index - (len(layers) - 1) / 2) * step)
                ys.append(values["topic_index"])
                low.append(values["topic_index"] - values["topic_index_ci_low"])
                high.append(values["topic_index_ci_high"] - values["topic_index"])
                specialized.append(bool(values["topic_specialized"]))
        left.errorbar(xs, ys, yerr=[low, high], fmt="none", ecolor=colour, capsize=3)
        left.scatter(
            xs,
            ys,
            color=[colour if flag else "white" for flag in specialized],
            edgecolors=colour,
            zorder=3,
            label=layer,
        )  # hollow: not called specialized
    left.axhline(0.0, color="0.4", linewidth=0.9, linestyle="--")
    left.axhline(1.0, color="0.6", linewidth=0.8, linestyle=":")
    left.set_title(
        "Topic specialization index, 95% interval (0 = random router, 1 = best linear router)\n"
        "filled: topic-specialized (interval clear of 0 and p <= 0.01)",
        fontsize=10,
    )
    left.set_ylabel("specialization index")
    if layers:
        left.legend(fontsize=8, title="MoE layer", title_fontsize=8)
    for position, run in zip(x, runs):
        if run["stats"] is None or not any(layer.get("references") for layer in run["stats"]["layers"]):
            left.text(position, 0.0, "no routing\nreferences", ha="center", va="bottom", fontsize=7, color="0.4")
    accuracy = [as_float(run["metrics"].get("test", {}).get("accuracy")) for run in runs]
    baseline = [as_float(run["metrics"].get("test", {}).get("majority_accuracy")) for run in runs]
    right.bar(x, accuracy, color="C0", width=0.6, label="model")
    right.scatter(x, baseline, marker="_", s=400, color="black", zorder=3, label="most frequent token")
    right.set_title("Masked-token accuracy, test split", fontsize=10)
    right.set_ylabel("accuracy")
    right.set_ylim(0, max([value for value in accuracy + baseline if not math.isnan(value)] + [0.1]) * 1.15)
    right.legend(fontsize=8, loc="upper right")
    for axes in (left, right):
        axes.set_xticks(x, names, rotation=30 if max(map(len, names)) > 8 else 0, ha="right", fontsize=8)
        axes.set_xlim(-0.6, len(runs) - 0.4)
        axes.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def _experiment(path: Path) -> str | None:
    """The experiment a sweep folder belongs to (study.py, known_structure.py), or None."""
    manifest = path / "sweep.json"
    return json.loads(manifest.read_text(encoding="utf-8")).get("experiment") if manifest.is_file() else None


def compare(paths: list[str], out_dir: Path) -> tuple[list[Path], dict | None]:
    """comparison.csv / .md / .png in out_dir (the table printed too); for one sweep whose runs carry arms
    (study.py), also arms.md and arms.png: the arms over their seeds. Returns the files written and that arm
    summary (study_summary.summarize_sweep; None for other folders)."""
    runs = [load_run(run) for run in find_runs(paths)]
    out_dir.mkdir(parents=True, exist_ok=True)
    columns, rows, families = table_rows(runs)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(out_dir / "comparison.csv", buffer.getvalue())
    markdown = markdown_table(rows, families)
    missing = [run["name"] for run in runs if run["stats"] is None]
    notes = [
        "acc = masked-token accuracy; baseline = always the group's most frequent masked token; common set = "
        "study.py's one evaluation set for every run; "
        "NMI: top choice vs document topic, 95% document-bootstrap interval, p from a document-level "
        "permutation; random: what random routers with the trained loads give on the same hidden states "
        "(mean [2.5, 97.5%]); index: 0 = no more than such a router, 1 = as much as the best linear router; "
        "CMI excess = I(expert; topic | token) minus its permutation null; settled at = the step from which "
        ">= 90% of probe tokens go to the final top-1 expert; consecutive minus random = how much more often "
        "neighbouring tokens share a top-1 expert than under random routers with the same loads; ablation topic cells = experts whose loss increase depends on topic at "
        "p <= 0.05, of all."
    ]
    if missing:
        notes.append(f"{len(missing)} run(s) without routing_stats.json (metrics only): {', '.join(missing)}")
    write_text_atomic(out_dir / "comparison.md", markdown + "\n\n" + "\n".join(notes) + "\n")
    written = [out_dir / "comparison.csv", out_dir / "comparison.md"]
    written.append(save_figure_atomic(comparison_figure(runs), out_dir / "comparison.png"))
    print(markdown)
    print("\n".join(notes))
    design = None
    if len(paths) == 1 and _experiment(Path(paths[0])) == "study":
        design = summarize_sweep(Path(paths[0]))
        write_text_atomic(out_dir / "arms.md", arm_markdown(design) + "\n\n" + "\n".join(design_notes(design)) + "\n")
        written += [out_dir / "arms.md", write_arm_figure(design, out_dir / "arms.png")]
        print("\n" + arm_markdown(design))
    return written, design


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument(
        "results",
        nargs="+",
        metavar="RESULT_DIR",
        help="step 4 result folders (<save_path>/<tag>), folders of them, or sweep folders",
    )
    parser.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="where the table and figure go; default: <sweep>/comparison for one sweep folder, "
        "else process_exp_results/comparison",
    )
    args = parser.parse_args()
    single_sweep = len(args.results) == 1 and (Path(args.results[0]) / "sweep.json").is_file()
    out_dir = Path(
        args.out or (Path(args.results[0]) / "comparison" if single_sweep else "process_exp_results/comparison")
    )
    written, _ = compare(args.results, out_dir)
    print("written: " + ", ".join(str(path) for path in written))


if __name__ == "__main__":
    run_step(main)
