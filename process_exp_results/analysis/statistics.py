"""Do MoE experts specialize, and on what?  Statistics over routing records, read against references.

Per MoE layer, on the top choice (column 0 of ``experts``; rows with -1 ignored), over the *seen* topics (the test
split's documents; ``pool_held_out`` adds the held-out topics' documents, the earlier study's pooled design):

* topic vs expert: NMI(topic; expert) = I / sqrt(H(topic) H(expert)) (bits), a document-level bootstrap interval
  (``resampling.basic_ci``) and a document-level permutation p-value (topic labels shuffled among documents,
  each document keeps its tokens and routing). Tokens of one document are not independent draws.
* Jensen-Shannon divergence (bits) of each topic's expert distribution from the pooled one, with intervals.
* token class vs expert (special, punctuation, digit, continuation "##" piece, function word, capitalized when the
  tokenizer keeps case, other word-initial piece): NMI, interval, and a permutation of the class labels within each
  document.
* token identity vs expert: NMI(token; expert), tokens seen fewer than ``min_token_count`` times pooled into one
  "rare" bucket (the plug-in MI of thousands of singletons is pure bias).
* I(expert; topic | token) over frequent tokens, against a null that shuffles topics among the occurrences of each
  token (a token's occurrences in one document move together, and trade topics only with as many occurrences of
  the same token in another document, so the shuffle keeps p(topic | token)). Reported as ``cmi_excess`` = observed - null mean,
  the part that is not estimator bias. ``explained_by``: "context beyond the token" when the excess interval is
  clear of 0 and p <= ALPHA; otherwise "token identity" when the topic test has p <= ALPHA; otherwise "neither".
* ``references`` (with a ``router_sample``; ``process_exp_results.analysis.references``): per factor the trained router's
  NMI on the sampled router inputs beside random routers, load-matched random routers and the best linear router,
  and the specialization index with its interval. A layer is called specialized on a factor only when the index
  interval is clear of 0 *and* the permutation test has p <= ALPHA: at tens of thousands of tokens every
  permutation test passes, so it is the second condition, never the headline.
* vocabulary (per expert the frequent tokens of highest lift P(expert | token) / P(expert)) and co-activation.

The held-out topics (unfamiliar words) get their own block, ``held_out_shift``: per topic and layer the JS
divergence of its expert mix from the seen documents' mix, and the share of its tokens that never occur in the
training split. Everything is vectorized numpy; seeded: same inputs and seed, same output.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from process_exp_results.analysis.held_out import held_out_shift, unseen_share
from process_exp_results.analysis.information import cmi, nmi
from process_exp_results.analysis.phases import Phases, no_phases
from process_exp_results.analysis.records import RoutingRecords
from process_exp_results.analysis.references import reference_settings, seen_references
from process_exp_results.analysis.resampling import (
    GroupShuffler,
    basic_ci,
    bootstrap_weights,
    p_value,
    percentile_ci,
    rng_for,
)
from process_exp_results.analysis.routers import RandomRouters, RouterSample
from process_exp_results.analysis.tables import LayerTables, SeenTables, prepared_records, seen_tables
from process_exp_results.analysis.verdicts import ALPHA
from process_exp_results.analysis.vocabulary import coactivation, expert_vocabulary


def topic_null(layers: list[LayerTables], doc_topic: np.ndarray, n_perm: int, seed: int) -> list[list[float]]:
    """Topic NMI with topic labels permuted among documents, per layer."""
    rng, nulls = rng_for(seed, 2), [[] for _ in layers]
    for _ in range(n_perm):
        permuted = doc_topic[rng.permutation(len(doc_topic))]
        for null, layer in zip(nulls, layers):
            K, _, _, E = layer.shape
            cells = layer.topic_cells
            index = permuted[cells.doc] * E + cells.index % E
            null.append(nmi(np.bincount(index, weights=cells.count, minlength=K * E).reshape(K, E)))
    return nulls


@dataclass
class ConditionalShuffle:
    """The conditional null's shuffle for layers that route the same rows: topics move among the units (a token's
    occurrences in one document) of the same token and size, so p(topic | token) stays as observed."""

    frequent: np.ndarray  # positions, among the layer's routed rows, of the frequent tokens' occurrences
    token: np.ndarray  # their frequent-token index
    unit_of: np.ndarray  # their unit
    unit_topic: np.ndarray  # per unit its document's topic
    shuffler: GroupShuffler  # over units, grouped by (token, size)
    movable: float  # the share of the occurrences the shuffle can move to another topic

    @classmethod
    def of(cls, layer: LayerTables, doc: np.ndarray, doc_topic: np.ndarray) -> ConditionalShuffle:
        """doc: per analysed row its document; layer: any of the layers routing the same rows."""
        D, F = len(doc_topic), layer.n_frequent
        frequent = np.flatnonzero(layer.token_index < F)
        f = layer.token_index[frequent]
        # a unit = a token's occurrences in one document; units trade topics only with units of the same token and
        # size, so the shuffle keeps p(topic | token) and the null mean is the plug-in bias, not a bit less
        units, unit_of, unit_size = np.unique(
            f * D + doc[layer.rows][frequent], return_inverse=True, return_counts=True
        )
        unit_group = units // D * (unit_size.max() + 1) + unit_size
        unit_topic = doc_topic[units % D]
        # a unit can move only if units of another topic share its (token, size)
        pairs = np.unique(np.stack([unit_group, unit_topic]), axis=1)
        groups_with_topics, topics_per_group = np.unique(pairs[0], return_counts=True)
        can_move = topics_per_group[np.searchsorted(groups_with_topics, unit_group)] >= 2
        movable = float(unit_size[can_move].sum() / unit_size.sum())
        return cls(frequent, f, unit_of, unit_topic, GroupShuffler(unit_group), movable)

    def permuted_topics(self, rng: np.random.Generator) -> np.ndarray:
        """One draw of the null: per frequent occurrence its shuffled topic."""
        return self.shuffler.shuffle(self.unit_topic, rng)[self.unit_of]

    def cmi(self, layer: LayerTables, topics: np.ndarray, row_weights: np.ndarray | None = None) -> float:
        """I(expert; topic | token) of the layer with these topics; row_weights: per routed row its document's
        bootstrap multiplicity (None: the plain data)."""
        K, _, F, E = layer.shape
        index = (self.token * K + topics) * E + layer.expert[self.frequent]
        weights = None if row_weights is None else row_weights[self.frequent]
        return cmi(np.bincount(index, weights=weights, minlength=F * K * E).reshape(F, K, E))


def same_rows(layers: list[LayerTables]) -> list[list[int]]:
    """The layers grouped by the rows they route (one group for token choice), in order: they share permutations."""
    groups: dict[bytes, list[int]] = {}
    for number, layer in enumerate(layers):
        groups.setdefault(layer.rows.tobytes(), []).append(number)
    return list(groups.values())


def conditional_shuffles(layers: list[LayerTables], doc: np.ndarray, doc_topic: np.ndarray) -> list:
    """Per group of same_rows the conditional null's shuffle (None without frequent tokens): built once, used by the
    permutation test and by every bootstrap draw."""
    return [
        ConditionalShuffle.of(layers[g[0]], doc, doc_topic) if layers[g[0]].n_frequent else None
        for g in same_rows(layers)
    ]


def within_document_nulls(
    layers: list[LayerTables],
    doc: np.ndarray,
    token_class: np.ndarray,
    shuffles: list[ConditionalShuffle | None],
    n_perm: int,
    seed: int,
) -> tuple[list[list[float]], list[list[float]], list[float | None]]:
    """Per layer: token-class NMI with classes permuted within documents, the conditional MI with topics permuted
    among the occurrences of each frequent token (a token's occurrences in one document move together), and the
    share of those occurrences that the shuffle can move to another topic (the rest keep theirs: a conservative
    null).

    Layers with the same routed rows (all of them, for token choice) share their permutations.
    """
    class_nulls, conditional_nulls, movable = [[] for _ in layers], [[] for _ in layers], [None] * len(layers)
    for group_number, (members, shuffle) in enumerate(zip(same_rows(layers), shuffles)):
        first = layers[members[0]]
        rows = first.rows
        shuffler, classes = GroupShuffler(doc[rows]), token_class[rows]
        rng = rng_for(seed, 3, group_number)
        for _ in range(n_perm):
            permuted = shuffler.shuffle(classes, rng)
            for number in members:
                _, C, _, E = layers[number].shape
                class_nulls[number].append(
                    nmi(np.bincount(permuted * E + layers[number].expert, minlength=C * E).reshape(C, E))
                )
        if shuffle is None:
            continue
        for number in members:
            movable[number] = shuffle.movable
        rng = rng_for(seed, 4, group_number)
        for _ in range(n_perm):
            topics = shuffle.permuted_topics(rng)
            for number in members:
                conditional_nulls[number].append(shuffle.cmi(layers[number], topics))
    return class_nulls, conditional_nulls, movable


def _bootstrap_measures(
    layers: list[LayerTables],
    doc: np.ndarray,
    n_docs: int,
    shuffles: list[ConditionalShuffle | None],
    n_boot: int,
    seed: int,
) -> list[list[dict]]:
    """Per layer the measures of n_boot document-bootstrap draws; one draw of document multiplicities serves every
    layer and measure. With frequent tokens each draw also has ``cmi_null``, its CMI under one shuffle of the
    conditional null: the draw's own plug-in bias (larger than the data's: duplicated documents), so that the
    excess over the null is corrected once in the estimate and once in each draw."""
    groups = same_rows(layers)
    null_rngs = [rng_for(seed, 6, number) for number in range(len(groups))]  # apart from the draws' own stream
    rng, draws = rng_for(seed, 1), [[] for _ in layers]
    for _ in range(n_boot):
        weights = bootstrap_weights(rng, n_docs)
        for members, shuffle, null_rng in zip(groups, shuffles, null_rngs):
            topics = shuffle.permuted_topics(null_rng) if shuffle is not None else None
            for number in members:
                measures = layers[number].measures(weights)
                if shuffle is not None:
                    measures["cmi_null"] = shuffle.cmi(layers[number], topics, weights[doc[layers[number].rows]])
                draws[number].append(measures)
    return draws


@dataclass
class _Resampled:
    """Per layer the document-bootstrap draws of its measures and its permutation nulls."""

    draws: list[list[dict]]
    topic_nulls: list[list[float]]
    class_nulls: list[list[float]]
    conditional_nulls: list[list[float]]
    movable: list[float | None]  # the share of the conditional null's occurrences that can change topic


def _resample(seen: SeenTables, n_boot: int, n_perm: int, seed: int) -> _Resampled:
    layers = seen.layers
    shuffles = conditional_shuffles(layers, seen.doc, seen.doc_topic)
    draws = _bootstrap_measures(layers, seen.doc, len(seen.doc_topic), shuffles, n_boot, seed)
    topic_nulls = topic_null(layers, seen.doc_topic, n_perm, seed)
    class_nulls, conditional_nulls, movable = within_document_nulls(
        layers, seen.doc, seen.token_class, shuffles, n_perm, seed
    )
    return _Resampled(draws, topic_nulls, class_nulls, conditional_nulls, movable)


def _layer_entry(
    seen: SeenTables,
    li: int,
    resampled: _Resampled,
    reference: dict | None,
    n_experts: int,
    k: int,
    class_names: list[str],
    id_to_token: list[str],
) -> dict:
    """One layer's block of the output: its measures, co-activation (k >= 2) and references (when drawn)."""
    layer = seen.layers[li]
    result = _layer_result(
        layer,
        layer.measures(),
        resampled.draws[li],
        resampled.topic_nulls[li],
        resampled.class_nulls[li],
        resampled.conditional_nulls[li],
        seen.topics,
        class_names,
        id_to_token,
    )
    result["conditional_topic"]["null_movable_share"] = resampled.movable[li]
    entry = {
        "layer": layer.name,
        "layer_index": li,
        **result,
        "coactivation": coactivation(seen.seen.experts[:, li, :], n_experts) if k >= 2 else None,
    }
    if reference is not None:
        entry["references"] = reference
    return entry


def _topic_groups(records: RoutingRecords, held_out: np.ndarray, pool_held_out: bool) -> dict:
    return {
        "seen": sorted({records.topic_names[t] for t in np.unique(records.topic[~held_out])}),
        "held_out": sorted({records.topic_names[t] for t in np.unique(records.topic[held_out])}),
        "pooled": bool(pool_held_out),
    }


def _settings(
    n_boot: int, n_perm: int, seed: int, min_token_count: int, router_sample: RouterSample | None, n_random_routers: int
) -> dict:
    settings = {
        "n_boot": int(n_boot),
        "n_perm": int(n_perm),
        "seed": int(seed),
        "min_token_count": int(min_token_count),
    }
    if router_sample is not None:
        settings["references"] = reference_settings(router_sample, n_random_routers)
    return settings


def analyze_routing(
    records: RoutingRecords,
    token_class_of_id: np.ndarray,
    class_names: list[str],
    id_to_token: list[str],
    n_boot: int = 200,
    n_perm: int = 200,
    seed: int = 0,
    min_token_count: int = 20,
    min_topic_docs: int = 5,
    router_sample: RouterSample | None = None,
    n_random_routers: int = 50,
    train_token_ids: np.ndarray | None = None,
    pool_held_out: bool = False,
    random_routers: list[RandomRouters] | None = None,
    phases: Phases | None = None,
) -> dict:
    """Routing statistics per layer as a JSON-ready dict (the layout is in docs/routing-analysis.md).

    router_sample: the sampled router inputs for the references (None: no references);
    train_token_ids: the token ids that occur in the training split (for the held-out topics' unfamiliar pieces);
    pool_held_out: analyse the held-out topics together with the seen ones, as the earlier study did;
    random_routers: per layer the random routers already drawn on the sample (references.draw_random_routers with
    this seed and n_random_routers; None: drawn here); phases: times "statistics" and "references" (step 4).
    """
    phases = phases or no_phases()
    with phases("statistics", total=3) as bar:
        records, token_class_of_id, held_out = prepared_records(records, token_class_of_id)
        k = records.experts.shape[2]
        seen = seen_tables(
            records, held_out, token_class_of_id, len(class_names), min_token_count, min_topic_docs, pool_held_out
        )
        bar.update()
        resampled = _resample(seen, n_boot, n_perm, seed)
        bar.update()
    references = seen_references(
        seen, router_sample, len(class_names), min_token_count, n_random_routers, n_boot, seed, random_routers, phases
    )
    with phases("statistics") as bar:
        stats = _assembled(records, seen, held_out, pool_held_out, resampled, references, k, class_names, id_to_token)
        stats["settings"] = _settings(n_boot, n_perm, seed, min_token_count, router_sample, n_random_routers)
        stats["held_out_shift"] = held_out_shift(records, held_out, train_token_ids, n_boot, seed)
        if train_token_ids is not None:
            stats["seen_unseen_piece_share"] = unseen_share(records.token_id[~held_out], train_token_ids)
        bar.update()
    return stats


def _assembled(
    records: RoutingRecords,
    seen: SeenTables,
    held_out: np.ndarray,
    pool_held_out: bool,
    resampled: _Resampled,
    references: list[dict | None],
    k: int,
    class_names: list[str],
    id_to_token: list[str],
) -> dict:
    """The JSON of analyze_routing, its settings and held-out blocks left to fill (kept in the file's key order)."""
    layers = [
        _layer_entry(seen, li, resampled, references[li], records.n_experts, k, class_names, id_to_token)
        for li in range(len(seen.layers))
    ]
    return {
        "n_tokens": int(len(seen.rows)),
        "n_documents": int(len(seen.doc_topic)),
        "topics": seen.topics,
        "groups": _topic_groups(records, held_out, pool_held_out),
        "n_experts": int(records.n_experts),
        "k": int(k),
        "settings": None,
        "layers": layers,
        "held_out_shift": None,
    }


def _excess_interval(excess: float, draws: list[dict]) -> tuple[list[float] | None, float | None]:
    """The excess over the null's 95% interval: the spread of each bootstrap draw's own excess (its CMI minus its
    own null's, the same statistic as the estimate), placed at the estimate; and how far the draws' median sits from
    the estimate. A basic interval of the raw CMI shifted by the null mean removed the plug-in bias twice and lay
    below its own estimate on 20 Newsgroups. The draws sit a little below the estimate when the routing has
    structure (the shuffled table's bias is larger than a structured one's, and more so with duplicated documents):
    the shift says by how much, and that the estimate errs low."""
    values = np.array([draw["cmi"] - draw["cmi_null"] for draw in draws if "cmi_null" in draw])
    spread = percentile_ci(values)
    if spread is None:
        return None, None
    median = float(np.median(values[np.isfinite(values)]))
    return [excess + spread[0] - median, excess + spread[1] - median], median - excess


def _layer_result(
    layer: LayerTables,
    observed: dict,
    draws: list[dict],
    topic_null_values,
    class_null_values,
    conditional_null_values,
    topics: list[str],
    class_names: list[str],
    id_to_token: list[str],
) -> dict:
    boot = {key: [draw[key] for draw in draws] for key in observed}
    js_boot = np.array(boot["js"]).reshape(-1, len(topics))
    p_topic = p_value(observed["nmi"], topic_null_values)
    tables = layer.tables()
    if layer.n_frequent:
        p_cmi = p_value(observed["cmi"], conditional_null_values)
        null_mean = float(np.mean(conditional_null_values)) if conditional_null_values else 0.0
        cmi_value = float(observed["cmi"])
    else:
        p_cmi, null_mean, cmi_value = 1.0, 0.0, 0.0
    excess_ci, excess_shift = _excess_interval(cmi_value - null_mean, draws)
    if excess_ci is not None and excess_ci[0] > 0 and p_cmi <= ALPHA:
        explained_by = "context beyond the token"
    elif p_topic <= ALPHA:
        explained_by = "token identity"
    else:
        explained_by = "neither"
    return {
        "nmi": float(observed["nmi"]),
        "nmi_ci": basic_ci(boot["nmi"], observed["nmi"]),
        "p_value": p_topic,
        "js": {t: float(np.nan_to_num(observed["js"][i])) for i, t in enumerate(topics)},
        "js_ci": {t: basic_ci(js_boot[:, i], observed["js"][i]) for i, t in enumerate(topics)},
        "topic_expert_counts": tables["topic"].astype(np.int64).tolist(),
        "token_class": {
            "classes": list(class_names),
            "nmi": float(observed["class_nmi"]),
            "nmi_ci": basic_ci(boot["class_nmi"], observed["class_nmi"]),
            "p_value": p_value(observed["class_nmi"], class_null_values),
            "expert_counts": tables["class"].astype(np.int64).tolist(),
        },
        "token_id": {"nmi": float(observed["token_nmi"]), "nmi_ci": basic_ci(boot["token_nmi"], observed["token_nmi"])},
        "conditional_topic": {
            "cmi": cmi_value,
            "cmi_ci": basic_ci(boot["cmi"], cmi_value),
            "p_value": p_cmi,
            "null_mean": null_mean,
            "cmi_excess": cmi_value - null_mean,
            "cmi_excess_ci": excess_ci,
            "cmi_excess_resample_shift": excess_shift,
            "explained_by": explained_by,
        },
        "vocabulary": expert_vocabulary(layer, tables["token"], id_to_token),
    }
