"""Stage 2 of the routing analysis: the analysed rows (the seen topics, or all with pool_held_out) as documents, and
per MoE layer the per-document contingency cells (topic x expert, class x expert, token x expert with a rare bucket,
token x topic x expert over frequent tokens) that every measure, bootstrap draw and permutation reads.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from process_exp_results.analysis.information import cmi, js_rows, nmi
from process_exp_results.analysis.records import RoutingRecords
from process_exp_results.analysis.resampling import Cells


def frequent_token_index(token_id: np.ndarray, min_count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row the index of its token among the tokens seen >= min_count times (F for the rare bucket), and the
    frequent tokens' ids and counts (F of them)."""
    uniq, inverse, counts = np.unique(token_id, return_inverse=True, return_counts=True)
    frequent = counts >= min_count
    index = np.full(len(uniq), int(frequent.sum()), dtype=np.int64)
    index[frequent] = np.arange(int(frequent.sum()))
    return index[inverse], uniq[frequent], counts[frequent]


@dataclass
class LayerTables:
    """One MoE layer's routed tokens and their per-document contingency cells (tables: topic x expert,
    class x expert, token x expert with a rare bucket, token x topic x expert over frequent tokens)."""

    name: str
    rows: np.ndarray  # analysed rows with an expert
    expert: np.ndarray  # their top expert
    token_index: np.ndarray  # frequent-token index per row, F = rare
    frequent_ids: np.ndarray
    frequent_counts: np.ndarray
    topic_cells: Cells
    class_cells: Cells
    token_cells: Cells
    conditional_cells: Cells
    shape: tuple[int, int, int, int]  # topics K, classes C, frequent tokens F, experts E

    @classmethod
    def build(
        cls,
        name: str,
        experts: np.ndarray,
        doc: np.ndarray,
        topic: np.ndarray,
        token_class: np.ndarray,
        token_id: np.ndarray,
        n_topics: int,
        n_classes: int,
        n_experts: int,
        min_count: int,
    ) -> LayerTables:
        rows = np.flatnonzero(experts >= 0)
        e, d, t = experts[rows], doc[rows], topic[rows]
        f, frequent_ids, frequent_counts = frequent_token_index(token_id[rows], min_count)
        F = len(frequent_ids)
        frequent = f < F
        K, C, E = n_topics, n_classes, n_experts
        return cls(
            name,
            rows,
            e,
            f,
            frequent_ids,
            frequent_counts,
            Cells(d, t * E + e, K * E),
            Cells(d, token_class[rows] * E + e, C * E),
            Cells(d, f * E + e, (F + 1) * E),
            Cells(d[frequent], (f[frequent] * K + t[frequent]) * E + e[frequent], F * K * E),
            (K, C, F, E),
        )

    @property
    def n_frequent(self) -> int:
        return self.shape[2]

    def tables(self, weights: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """The four tables, for the plain data (weights None) or one bootstrap draw of documents."""
        K, C, F, E = self.shape
        return {
            "topic": self.topic_cells.table(weights).reshape(K, E),
            "class": self.class_cells.table(weights).reshape(C, E),
            "token": self.token_cells.table(weights).reshape(F + 1, E),
            "conditional": self.conditional_cells.table(weights).reshape(F, K, E),
        }

    def measures(self, weights: np.ndarray | None = None) -> dict:
        tables = self.tables(weights)
        return {
            "nmi": nmi(tables["topic"]),
            "js": js_rows(tables["topic"]),
            "class_nmi": nmi(tables["class"]),
            "token_nmi": nmi(tables["token"]),
            "cmi": cmi(tables["conditional"]) if self.n_frequent else np.nan,
        }


def _merge_topics(doc_topic: np.ndarray, topic_names: list[str], min_topic_docs: int):
    """Drop topics without documents; merge topics with fewer than min_topic_docs documents into "other"."""
    n_docs = np.bincount(doc_topic, minlength=len(topic_names))
    keep = [t for t in range(len(topic_names)) if n_docs[t] >= min_topic_docs]
    small = [t for t in range(len(topic_names)) if 0 < n_docs[t] < min_topic_docs]
    names = [topic_names[t] for t in keep]
    mapping = np.full(len(topic_names), -1, dtype=np.int64)
    mapping[keep] = np.arange(len(keep))
    if small:
        mapping[small] = len(names)
        names.append("other (merged: " + ", ".join(topic_names[t] for t in small) + ")")
    return mapping[doc_topic], names


def document_index(doc_id: np.ndarray, topic: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dense document index per row, and each document's topic (every token of a document must carry it)."""
    doc_keys, doc = np.unique(doc_id, return_inverse=True)
    doc_topic = np.zeros(len(doc_keys), dtype=np.int64)
    doc_topic[doc] = topic
    if np.any(doc_topic[doc] != topic):
        raise ValueError("tokens of one document carry different topics")
    return doc, doc_topic


def _check(records: RoutingRecords, experts: np.ndarray, token_class_of_id: np.ndarray) -> None:
    n_tokens, n_layers, _ = experts.shape
    if not (records.doc_id.shape == records.topic.shape == records.token_id.shape == (n_tokens,)):
        raise ValueError("doc_id, topic, token_id and experts must have the same number of rows")
    if len(records.layer_names) != n_layers:
        raise ValueError(f"{len(records.layer_names)} layer names for {n_layers} layers")
    if n_tokens and (records.topic.min() < 0 or records.topic.max() >= len(records.topic_names)):
        raise ValueError("topic index out of range of topic_names")
    if n_tokens and (records.token_id.min() < 0 or records.token_id.max() >= len(token_class_of_id)):
        raise ValueError("token id out of range of token_class_of_id")
    if n_tokens and experts.max() >= records.n_experts:
        raise ValueError(f"expert index >= n_experts ({records.n_experts})")


@dataclass
class SeenTables:
    """The analysed rows (the seen topics, or all with pool_held_out) as documents and per-layer tables."""

    rows: np.ndarray  # analysed rows of the records
    seen: RoutingRecords  # those rows
    doc: np.ndarray  # per row its document index
    doc_topic: np.ndarray  # per document its (merged) topic index
    topics: list[str]
    topic: np.ndarray  # per row its (merged) topic index
    token_class: np.ndarray  # per row its token class
    layers: list[LayerTables]


def seen_tables(
    records: RoutingRecords,
    held_out: np.ndarray,
    token_class_of_id: np.ndarray,
    n_classes: int,
    min_token_count: int,
    min_topic_docs: int,
    pool_held_out: bool,
) -> SeenTables:
    rows = np.arange(len(held_out)) if pool_held_out else np.flatnonzero(~held_out)
    seen = records.subset(rows)
    doc, doc_topic_raw = document_index(seen.doc_id, seen.topic)
    doc_topic, topics = _merge_topics(doc_topic_raw, list(records.topic_names), min_topic_docs)
    topic, token_class = doc_topic[doc], token_class_of_id[seen.token_id]
    layers = [
        LayerTables.build(
            name,
            seen.experts[:, li, 0],
            doc,
            topic,
            token_class,
            seen.token_id,
            len(topics),
            n_classes,
            records.n_experts,
            min_token_count,
        )
        for li, name in enumerate(records.layer_names)
    ]
    return SeenTables(rows, seen, doc, doc_topic, topics, topic, token_class, layers)


def prepared_records(
    records: RoutingRecords, token_class_of_id: np.ndarray
) -> tuple[RoutingRecords, np.ndarray, np.ndarray]:
    """The records with experts as [n, layers, k] int64, the class table as int64, both checked, and the held-out
    mask per row (all False when no topic was held out)."""
    experts = np.asarray(records.experts, dtype=np.int64)
    records = replace(records, experts=experts[:, :, None] if experts.ndim == 2 else experts)
    token_class_of_id = np.asarray(token_class_of_id, dtype=np.int64)
    _check(records, records.experts, token_class_of_id)
    n_tokens = records.experts.shape[0]
    held_out = np.zeros(n_tokens, bool) if records.held_out is None else np.asarray(records.held_out, bool)
    return records, token_class_of_id, held_out
