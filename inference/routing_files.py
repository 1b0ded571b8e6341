"""The files step 4 makes from the routing records and their statistics (process_exp_results.routing_stats):
routing_stats.json / .csv, a topic x expert heatmap and a token page per MoE layer, the NMI and
specialization-index figures.
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import numpy as np

from config_utils import write_json_atomic, write_text_atomic
from process_exp_results.plots import plot_nmi_per_layer, plot_specialization_index, plot_topic_expert_heatmap
from process_exp_results.report import stats_csv_rows, write_token_html
from process_exp_results.routing_stats import RoutingRecords

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
            stats["topics"], np.asarray(layer["topic_expert_counts"]), out_dir / figure, layer["layer"]
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
