"""The files step 4 writes: metrics.csv and expert_counts.csv, the expert-choice histograms, and from the routing
analysis routing_stats.json / .csv, a topic x expert heatmap and a token page per MoE layer, the NMI,
specialization-index and saturation figures, ablation.json with its heatmaps; and the summary it prints.
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from config_utils import write_json_atomic, write_text_atomic
from process_exp_results.analysis.records import RoutingRecords
from process_exp_results.figures.ablation import plot_ablation
from process_exp_results.figures.heatmaps import plot_topic_expert_heatmap
from process_exp_results.figures.histograms import plot_pooled_expert_histogram, plot_topic_layer_histogram
from process_exp_results.figures.layers import plot_nmi_per_layer, plot_routing_saturation, plot_specialization_index
from process_exp_results.report.glance import factor_finding, glance_lines
from process_exp_results.report.stats_csv import stats_csv_rows
from process_exp_results.report.tokens_html import write_token_html

if TYPE_CHECKING:  # the writers take the analysis' result, never run it
    from inference.stages import RoutingAnalysis

CSV_COLUMNS = ["layer", "measure", "value", "ci_low", "ci_high", "p_value"]


def sample_documents(
    records: RoutingRecords, id_to_token: list[str], layer: int, per_topic: int = 2, seed: int = 0
) -> list[dict]:
    """A few documents per topic for the token page: {"label", "tokens", "experts"} with the layer's top choice."""
    rng = np.random.default_rng(seed)
    documents = []
    for topic, topic_name in enumerate(records.topic_names):
        doc_ids = np.unique(records.doc_id[records.topic == topic])
        for doc_id in np.sort(rng.choice(doc_ids, size=min(per_topic, len(doc_ids)), replace=False)):
            rows = np.flatnonzero(records.doc_id == doc_id)
            rows = rows[np.argsort(records.position[rows], kind="stable")]
            documents.append(
                {
                    "label": f"{topic_name} (document {int(doc_id)})",
                    "tokens": [id_to_token[token] for token in records.token_id[rows]],
                    "experts": records.experts[rows, layer, 0].tolist(),
                }
            )
    return documents


def file_stem(layer_name: str) -> str:
    """'block 0' -> 'block_0', for file names."""
    return re.sub(r"\W+", "_", layer_name).strip("_")


def write_routing_outputs(out_dir: Path, stats: dict, records: RoutingRecords, id_to_token: list[str]) -> list[Path]:
    """routing_stats.json/.csv, a topic x expert heatmap per layer, the NMI and specialization-index figures and a
    token page per layer.

    Returns the written paths, relative to out_dir.
    """
    write_json_atomic(out_dir / "routing_stats.json", stats)
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    writer.writerows(stats_csv_rows(stats))
    write_text_atomic(out_dir / "routing_stats.csv", buffer.getvalue())
    written = [Path("routing_stats.json"), Path("routing_stats.csv")]
    for layer in stats["layers"]:
        stem = file_stem(layer["layer"])
        figure = Path("figures") / f"topic_expert_heatmap_{stem}.png"
        plot_topic_expert_heatmap(
            stats["topics"],
            np.asarray(layer["topic_expert_counts"]),
            out_dir / figure,
            layer["layer"],
            finding=factor_finding(layer, stats) if layer.get("references") else None,
        )
        page = Path(f"tokens_{stem}.html")
        layer_axis = records.layer_names.index(layer["layer"])  # the layer's column in records.experts
        write_token_html(
            out_dir / page, sample_documents(records, id_to_token, layer_axis), layer["layer"], stats["n_experts"]
        )
        written += [figure, page]
    figure = Path("figures") / "nmi_per_layer.png"
    plot_nmi_per_layer(stats, out_dir / figure)
    written.append(figure)
    if any(layer.get("references") for layer in stats["layers"]):
        figure = Path("figures") / "specialization_index.png"
        plot_specialization_index(stats, out_dir / figure)
        written.append(figure)
    return written


METRIC_COLUMNS = [
    "group",
    "documents",
    "real_tokens",
    "masked_tokens",
    "mlm_loss",
    "accuracy",
    "perplexity",
    "majority_accuracy",
]


def write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def write_figures(
    tmp_dir: Path, run_name: str, expert_counts: dict, layer_names: list[str], file_stems: dict[str, str]
) -> None:
    """The expert-choice histograms: all layers pooled, and per group one bar per layer."""
    if not layer_names:  # a dense model (no MoE layer) has no routing to draw
        return
    plot_pooled_expert_histogram(
        expert_counts,
        tmp_dir / "figures" / "experts_all_layers.png",
        title=f"Expert choice, all MoE layers pooled ({run_name})",
    )
    for group, counts in expert_counts.items():
        figure = tmp_dir / "figures" / f"experts_per_layer_{file_stems[group]}.png"
        plot_topic_layer_histogram(group, counts, figure, layer_names=layer_names)


def write_analysis_files(
    tmp_dir: Path, routing: RoutingAnalysis | None, ablation: dict | None, layer_names: list[str]
) -> list[Path]:
    """The routing and ablation files and figures; returns the files written, relative to tmp_dir."""
    written = []
    if routing is not None:
        written = write_routing_outputs(tmp_dir, routing.stats, routing.records, routing.id_to_token)
        if routing.stats["saturation"]:
            plot_routing_saturation(routing.stats["saturation"], tmp_dir / "figures" / "routing_saturation.png")
    if ablation is not None:
        write_json_atomic(tmp_dir / "ablation.json", ablation)
        written.append(Path("ablation.json"))
        for layer in layer_names:
            plot_ablation(ablation, layer, tmp_dir / "figures" / f"ablation_{file_stem(layer)}.png")
    return written


def print_summary(
    out_dir: Path,
    metric_rows: list[dict],
    files: list[Path],
    stats: dict | None,
    ablation: dict | None,
    aim_line: str | None,
) -> None:
    """The metrics per group, where the files are, the routing table at a glance and a verdict per layer."""
    print(f"{'group':<16}{'docs':>7}{'mlm loss':>10}{'perplexity':>12}{'accuracy':>10}{'baseline':>10}")
    for row in metric_rows:
        print(
            f"{row['group']:<16}{row['documents']:>7}{row['mlm_loss']:>10.4f}{row['perplexity']:>12.2f}"
            f"{row['accuracy']:>10.3f}{row['majority_accuracy']:>10.3f}"
        )
    print(
        "(perplexity = exp(mlm loss); baseline: accuracy of always predicting the group's most frequent masked token)"
    )
    if stats is not None:
        print()
        for line in glance_lines(stats, ablation):
            print(line)
        print()
    n_figures = len({path.name for path in files if path.suffix == ".png"})
    others = sorted({path.name for path in files if path.suffix != ".png"} | {"metrics.csv", "expert_counts.csv"})
    print(
        f"wrote {out_dir}/: report.md (every number above in sentences, with the figures), {', '.join(others)}, "
        f"figures/ ({n_figures} PNG)"
    )
    if aim_line:
        print(aim_line)
