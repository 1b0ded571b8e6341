"""Routing records for step 4: which expert each real token went to, per MoE layer, and the files made from them.

collect_routing runs the model over step 2's *unmasked* ids (the analysis asks where real text goes, not where
[MASK] goes) and keeps one row per real token: its document, topic, token id, position and experts per layer.
write_routing_outputs turns the statistics of process_exp_results.routing_stats into JSON, CSV, figures and
token pages.
"""
from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import torch

from config_utils import write_json_atomic
from process_exp_results.plots import plot_nmi_per_layer, plot_topic_expert_heatmap
from process_exp_results.report import write_token_html
from process_exp_results.routing_stats import RoutingRecords, stats_csv_rows

ROUTING_COLUMNS = ["doc_id", "unmasked_ids", "attention_mask"]
CSV_COLUMNS = ["layer", "measure", "value", "ci_low", "ci_high", "p_value"]


def first_documents(dataset, max_docs: int | None):
    """The first max_docs documents: step 1 writes each split in a seeded random order, so this is a random sample."""
    return dataset if max_docs is None or len(dataset) <= max_docs else dataset.select(range(max_docs))


def topic_names_of(groups: dict) -> list[str]:
    """Topics in order of first appearance: the test split's topics (sorted), then each held-out topic."""
    names: list[str] = []
    for dataset in groups.values():
        names += [topic for topic in sorted(set(dataset["topic"])) if topic not in names]
    return names


@torch.no_grad()
def collect_routing(model, groups: dict, device, batch_size: int = 64,
                    max_docs_per_group: int | None = 2000) -> RoutingRecords:
    """Forward pass over each group's `unmasked_ids` with attention_mask, in eval mode, no grad; one record per
    real token; topic = the document's own `topic` column value (so the test split contributes its several
    topics, and each held-out topic set its own)."""
    was_training = model.training
    model.eval()
    groups = {name: first_documents(dataset, max_docs_per_group) for name, dataset in groups.items()}
    topic_names = topic_names_of(groups)
    topic_index = {name: index for index, name in enumerate(topic_names)}
    n_layers = len(model.config.moe_layer_indices)
    parts: dict[str, list[np.ndarray]] = {key: [] for key in ("doc_id", "topic", "token_id", "position", "experts")}
    for dataset in groups.values():
        topics = np.array([topic_index[topic] for topic in dataset["topic"]], dtype=np.int64)
        start = 0
        for batch in dataset.with_format("numpy", columns=ROUTING_COLUMNS).iter(batch_size=batch_size):
            ids = torch.as_tensor(batch["unmasked_ids"], dtype=torch.long, device=device)
            real = torch.as_tensor(batch["attention_mask"], device=device).bool()
            output = model(input_ids=ids, attention_mask=real)
            n_docs, seq_len = ids.shape
            if n_layers:
                experts = torch.stack(output.expert_indices, dim=2)  # [B, T, n_layers, k]
            else:
                experts = torch.full((n_docs, seq_len, 0, 1), -1, dtype=torch.long, device=device)
            real_cpu = real.cpu().numpy()
            parts["experts"].append(experts[real].cpu().numpy().astype(np.int64))
            parts["token_id"].append(ids[real].cpu().numpy().astype(np.int64))
            parts["position"].append(np.nonzero(real_cpu)[1].astype(np.int32))
            rows = np.nonzero(real_cpu)[0]
            parts["doc_id"].append(np.asarray(batch["doc_id"], dtype=np.int64)[rows])
            parts["topic"].append(topics[start:start + n_docs][rows])
            start += n_docs
    model.train(was_training)
    k = parts["experts"][0].shape[-1] if parts["experts"] else model.config.top_k_experts
    empty = {"doc_id": np.zeros(0, np.int64), "topic": np.zeros(0, np.int64), "token_id": np.zeros(0, np.int64),
             "position": np.zeros(0, np.int32), "experts": np.zeros((0, n_layers, k), np.int64)}
    columns = {key: np.concatenate(values) if values else empty[key] for key, values in parts.items()}
    return RoutingRecords(**columns, topic_names=topic_names,
                          layer_names=[f"block {index}" for index in model.config.moe_layer_indices],
                          n_experts=model.config.n_experts)


def sample_documents(records: RoutingRecords, id_to_token: list[str], layer: int, per_topic: int = 2,
                     seed: int = 0) -> list[dict]:
    """A few documents per topic for the token page: {"label", "tokens", "experts"} with the layer's top choice."""
    rng = np.random.default_rng(seed)
    documents = []
    for topic, topic_name in enumerate(records.topic_names):
        doc_ids = np.unique(records.doc_id[records.topic == topic])
        for doc_id in np.sort(rng.choice(doc_ids, size=min(per_topic, len(doc_ids)), replace=False)):
            rows = np.flatnonzero(records.doc_id == doc_id)
            rows = rows[np.argsort(records.position[rows], kind="stable")]
            documents.append({"label": f"{topic_name} (document {int(doc_id)})",
                              "tokens": [id_to_token[token] for token in records.token_id[rows]],
                              "experts": records.experts[rows, layer, 0].tolist()})
    return documents


def file_stem(layer_name: str) -> str:
    """'block 0' -> 'block_0', for file names."""
    return re.sub(r"\W+", "_", layer_name).strip("_")


def write_routing_outputs(out_dir: Path, stats: dict, records: RoutingRecords, id_to_token: list[str]) -> list[Path]:
    """routing_stats.json/.csv, a topic x expert heatmap per layer, the NMI figure and a token page per layer.

    Returns the written paths, relative to out_dir.
    """
    write_json_atomic(out_dir / "routing_stats.json", stats)
    with open(out_dir / "routing_stats.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(stats_csv_rows(stats))
    written = [Path("routing_stats.json"), Path("routing_stats.csv")]
    for layer in stats["layers"]:
        stem = file_stem(layer["layer"])
        figure = Path("figures") / f"topic_expert_heatmap_{stem}.png"
        plot_topic_expert_heatmap(stats["topics"], np.asarray(layer["topic_expert_counts"]), out_dir / figure,
                                  layer["layer"])
        page = Path(f"tokens_{stem}.html")
        layer_axis = records.layer_names.index(layer["layer"])  # the layer's column in records.experts
        write_token_html(out_dir / page, sample_documents(records, id_to_token, layer_axis),
                         layer["layer"], stats["n_experts"])
        written += [figure, page]
    figure = Path("figures") / "nmi_per_layer.png"
    plot_nmi_per_layer(stats, out_dir / figure)
    return written + [figure]
