"""The held-out topics' own block: per topic and layer how far its expert mix moves from the seen documents' (JS
divergence, an interval, and the JS of an equally small random set of seen documents: the plug-in JS of a small group
is biased upward), and the share of its pieces that never occur in the training split.
"""

from __future__ import annotations

import numpy as np

from process_exp_results.analysis.information import js_rows
from process_exp_results.analysis.records import RoutingRecords
from process_exp_results.analysis.resampling import basic_ci, bootstrap_weights, rng_for
from process_exp_results.analysis.tables import document_index


def unseen_share(token_id: np.ndarray, train_token_ids: np.ndarray) -> float:
    return float(np.mean(~np.isin(token_id, train_token_ids))) if len(token_id) else 0.0


def held_out_shift(
    records: RoutingRecords,
    held_out: np.ndarray,
    train_token_ids: np.ndarray | None,
    n_boot: int,
    seed: int,
    n_null: int = 50,
) -> dict:
    """Per held-out topic and layer: the JS divergence of its expert mix from the seen documents' mix, with an
    interval (each group's documents resampled on their own) and ``js_null``, the mean JS between a random set of
    as many seen documents and the other seen documents (plug-in JS of a small group is biased upward); and the
    share of its tokens absent from the training split."""
    if not held_out.any() or held_out.all():
        return {}
    E = records.n_experts
    held_topics = np.unique(records.topic[held_out])
    group = np.where(held_out, 1 + np.searchsorted(held_topics, records.topic), 0)  # 0 = seen
    doc, doc_group = document_index(records.doc_id, group)
    members = [np.flatnonzero(doc_group == g) for g in range(len(held_topics) + 1)]
    seen_docs = members[0]
    rng = rng_for(seed, 5)
    boot = [[bootstrap_weights(rng, len(docs)) for docs in members] for _ in range(n_boot)]
    null_sets = [
        [rng.permutation(len(seen_docs))[: min(len(docs), len(seen_docs) // 2)] for _ in range(n_null)]
        for docs in members[1:]
    ]
    out = {
        records.topic_names[t]: {
            "js": {},
            "js_ci": {},
            "js_null": {},
            "n_documents": int(len(members[1 + i])),
            "n_tokens": int(np.sum(records.topic[held_out] == t)),
        }
        for i, t in enumerate(held_topics)
    }
    for li, name in enumerate(records.layer_names):
        e = records.experts[:, li, 0]
        routed = e >= 0
        doc_table = np.bincount(doc[routed] * E + e[routed], minlength=len(doc_group) * E).reshape(-1, E)
        seen_table = doc_table[seen_docs]
        for i, t in enumerate(held_topics):
            topic_table = doc_table[members[1 + i]]
            observed = js_rows(topic_table.sum(0)[None], reference=seen_table.sum(0))[0]
            draws = [js_rows((w[1 + i] @ topic_table)[None], reference=w[0] @ seen_table)[0] for w in boot]
            null = [
                js_rows(seen_table[chosen].sum(0)[None], reference=seen_table.sum(0) - seen_table[chosen].sum(0))[0]
                for chosen in null_sets[i]
            ]
            entry = out[records.topic_names[t]]
            entry["js"][name] = float(np.nan_to_num(observed))
            entry["js_ci"][name] = basic_ci(draws, observed)
            entry["js_null"][name] = float(np.nanmean(null)) if null else None
    if train_token_ids is not None:
        for t in held_topics:
            out[records.topic_names[t]]["unseen_piece_share"] = unseen_share(
                records.token_id[held_out & (records.topic == t)], train_token_ids
            )
    return out
