"""Routing records for step 4: which expert each real token went to, per MoE layer, and the files made from them.

collect_routing runs the encoder over step 2's *unmasked* ids (the analysis asks where real text goes, not where
[MASK] goes) and keeps one row per real token: its document, topic, token id, position and experts per layer, and
the router inputs of a seeded sample of tokens (the references of process_exp_results.references).
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
from models import MoELayer
from process_exp_results.plots import plot_nmi_per_layer, plot_specialization_index, plot_topic_expert_heatmap
from process_exp_results.references import RouterSample, SelectionRule
from process_exp_results.report import stats_csv_rows, write_token_html
from process_exp_results.routing_stats import RoutingRecords

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


def _sample_positions(groups: dict, sampled: set[str], max_tokens: int, seed: int, batch_size: int,
                      whole_passes: bool) -> tuple[np.ndarray, int]:
    """Sorted positions, among the real tokens of the `sampled` groups taken in order, of a seeded uniform sample
    of at most max_tokens; and the number of candidates. whole_passes (expert choice, whose experts compete for
    the tokens of one forward pass): whole forward passes of batch_size documents, drawn at random up to the cap."""
    pass_tokens = []  # real tokens of each forward pass of the sampled groups, in order
    for name, dataset in groups.items():
        if name in sampled:
            per_doc = np.asarray(dataset.with_format("numpy", columns=["attention_mask"])[:]["attention_mask"]).sum(1)
            pass_tokens += [int(per_doc[i:i + batch_size].sum()) for i in range(0, len(per_doc), batch_size)]
    n_real = sum(pass_tokens)
    rng = np.random.default_rng([seed, 7])
    if not whole_passes:
        return np.sort(rng.choice(n_real, size=min(max_tokens, n_real), replace=False)), n_real
    starts, kept, total = np.cumsum([0] + pass_tokens[:-1]), [], 0
    for index in rng.permutation(len(pass_tokens)):
        if total + pass_tokens[index] <= max_tokens:
            kept.append(np.arange(starts[index], starts[index] + pass_tokens[index]))
            total += pass_tokens[index]
    return np.sort(np.concatenate(kept)) if kept else np.zeros(0, np.int64), n_real


class _RouterInputs:
    """Forward hooks that keep each router's input ([real tokens, d]) of the current forward pass."""

    def __init__(self, routers: list[torch.nn.Module]):
        self.current: list[torch.Tensor | None] = [None] * len(routers)
        self.handles = [router.register_forward_hook(self._keep(i)) for i, router in enumerate(routers)]

    def _keep(self, index: int):
        def hook(module, inputs, output):
            self.current[index] = inputs[0].detach()
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@torch.no_grad()
def collect_routing(model, groups: dict, device, batch_size: int = 64, max_docs_per_group: int | None = 2000,
                    held_out_groups: tuple[str, ...] = (), max_router_inputs: int = 200_000,
                    sample_held_out: bool = False, seed: int = 0) -> tuple[RoutingRecords, RouterSample | None]:
    """Encoder forward passes (no MLM head: the analysis needs the routing only) over each group's `unmasked_ids`
    with attention_mask, in eval mode, no grad; one record per real token; topic = the document's own `topic`
    column value (so the test split contributes its several topics, and each held-out topic set its own).

    Also keeps the router inputs of a seeded sample of at most max_router_inputs real tokens of the seen groups
    (and of held_out_groups with sample_held_out), for the references: tokens drawn uniformly, or for expert
    choice whole forward passes; None for a model without routers or with max_router_inputs 0.
    """
    was_training = model.training
    model.eval()
    groups = {name: first_documents(dataset, max_docs_per_group) for name, dataset in groups.items()}
    topic_names = topic_names_of(groups)
    topic_index = {name: index for index, name in enumerate(topic_names)}
    n_layers = len(model.config.moe_layer_indices)
    routers = [module.router for module in model.modules() if isinstance(module, MoELayer) and hasattr(module, "router")]
    sampled = {name for name in groups if sample_held_out or name not in held_out_groups}
    keep_inputs = bool(routers) and max_router_inputs > 0
    whole_passes = model.config.router_type == "expert_choice"
    positions, n_candidates = (_sample_positions(groups, sampled, max_router_inputs, seed, batch_size, whole_passes)
                               if keep_inputs else (None, 0))
    hooks = _RouterInputs(routers) if keep_inputs else None
    parts: dict[str, list[np.ndarray]] = {key: [] for key in ("doc_id", "topic", "token_id", "position", "experts",
                                                              "held_out")}
    sample = {"rows": [], "batch": [], "inputs": [[] for _ in routers]}
    n_rows = n_seen = n_batches = 0  # records so far; real tokens of the sampled groups so far; forward passes
    try:
        for name, dataset in groups.items():
            topics = np.array([topic_index[topic] for topic in dataset["topic"]], dtype=np.int64)
            start = 0
            for batch in dataset.with_format("numpy", columns=ROUTING_COLUMNS).iter(batch_size=batch_size):
                ids = torch.as_tensor(batch["unmasked_ids"], dtype=torch.long, device=device)
                real = torch.as_tensor(batch["attention_mask"], device=device).bool()
                output = model.encoder(input_ids=ids, attention_mask=real)
                n_docs, seq_len = ids.shape
                if n_layers:
                    experts = torch.stack(output.expert_indices, dim=2)  # [B, T, n_layers, k]
                else:
                    experts = torch.full((n_docs, seq_len, 0, 1), -1, dtype=torch.long, device=device)
                real_cpu = real.cpu().numpy()
                n_real = int(real_cpu.sum())
                parts["experts"].append(experts[real].cpu().numpy().astype(np.int64))
                parts["token_id"].append(ids[real].cpu().numpy().astype(np.int64))
                parts["position"].append(np.nonzero(real_cpu)[1].astype(np.int32))
                rows = np.nonzero(real_cpu)[0]
                parts["doc_id"].append(np.asarray(batch["doc_id"], dtype=np.int64)[rows])
                parts["topic"].append(topics[start:start + n_docs][rows])
                parts["held_out"].append(np.full(n_real, name in held_out_groups))
                if hooks is not None and name in sampled:
                    # the sampled positions in this pass, as indices into its real tokens (the router's row order)
                    here = positions[np.searchsorted(positions, n_seen):np.searchsorted(positions, n_seen + n_real)]
                    local = torch.as_tensor(here - n_seen, dtype=torch.long, device=device)
                    for kept, current in zip(sample["inputs"], hooks.current):
                        kept.append(current.index_select(0, local).float().cpu().numpy())
                    sample["rows"].append(n_rows + here - n_seen)
                    sample["batch"].append(np.full(len(here), n_batches))
                    n_seen += n_real
                start += n_docs
                n_rows += n_real
                n_batches += 1
    finally:
        if hooks is not None:
            hooks.remove()
        model.train(was_training)
    k = parts["experts"][0].shape[-1] if parts["experts"] else model.config.top_k_experts
    empty = {"doc_id": np.zeros(0, np.int64), "topic": np.zeros(0, np.int64), "token_id": np.zeros(0, np.int64),
             "position": np.zeros(0, np.int32), "experts": np.zeros((0, n_layers, k), np.int64),
             "held_out": np.zeros(0, bool)}
    columns = {key: np.concatenate(values) if values else empty[key] for key, values in parts.items()}
    records = RoutingRecords(**columns, topic_names=topic_names,
                             layer_names=[f"block {index}" for index in model.config.moe_layer_indices],
                             n_experts=model.config.n_experts)
    if hooks is None:
        return records, None
    d_model = model.config.embedding_dim
    router_sample = RouterSample(
        rows=np.concatenate(sample["rows"]) if sample["rows"] else np.zeros(0, np.int64),
        batch=np.concatenate(sample["batch"]) if sample["batch"] else np.zeros(0, np.int64),
        inputs=[np.concatenate(kept) if kept else np.zeros((0, d_model), np.float32) for kept in sample["inputs"]],
        weights=[router.linear.weight.detach().float().cpu().numpy() for router in routers],
        rule=SelectionRule(model.config.router_type, model.config.top_k_experts, model.config.capacity_factor),
        n_candidates=n_candidates, max_tokens=max_router_inputs)
    return records, router_sample


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
    """routing_stats.json/.csv, a topic x expert heatmap per layer, the NMI and specialization-index figures and a
    token page per layer.

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
    written.append(figure)
    if any(layer.get("references") for layer in stats["layers"]):
        figure = Path("figures") / "specialization_index.png"
        plot_specialization_index(stats, out_dir / figure)
        written.append(figure)
    return written
