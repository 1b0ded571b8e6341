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
* ``references`` (with a ``router_sample``; ``process_exp_results.references``): per factor the trained router's
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

import math
import unicodedata
from dataclasses import dataclass, replace

import numpy as np
import torch

from process_exp_results.information import cmi, js_rows, nmi
from process_exp_results.phases import Phases, no_phases
from process_exp_results.references import (
    LOAD_FIT_TOKENS,
    PROBE_FIT_TOKENS,
    Factor,
    RandomRouters,
    RouterSample,
    layer_references,
)
from process_exp_results.resampling import Cells, GroupShuffler, basic_ci, bootstrap_weights, p_value, rng_for

__all__ = [
    "ALPHA",
    "FUNCTION_WORDS",
    "RoutingRecords",
    "analyze_routing",
    "is_specialized",
    "permutations_needed",
    "token_classes",
]

ALPHA = 0.01  # significance level for the plain-language verdicts and "explained_by"


def permutations_needed(alpha: float = ALPHA) -> int:
    """The fewest permutations whose smallest p-value, 1 / (n_perm + 1), reaches alpha."""
    return math.ceil(1.0 / alpha - 1.0 - 1e-9)


def is_specialized(reference: dict | None, p_value: float | None, alpha: float = ALPHA) -> bool:
    """A layer is specialized on a factor when its index interval is clear of 0 (more than routers that learned
    nothing) and its permutation test has p <= alpha (the second condition: at scale it always passes)."""
    ci = (reference or {}).get("index_ci")
    return ci is not None and ci[0] > 0 and p_value is not None and p_value <= alpha


# Frequent English function words (articles, pronouns, prepositions, conjunctions, auxiliaries).
FUNCTION_WORDS = frozenset(
    """
a an the this that these those
i me my mine we us our ours you your yours he him his she her hers it its they them their theirs
who whom whose which what
of in on at by for with from to into onto over under about after before between through during without
within against among across up down out off than as like
and or but nor so yet if because while although though whether
is am are was were be been being have has had having do does did doing
will would shall should can could may might must
not no there here then also just only very too
""".split()
)

CLASS_ORDER = ("special", "punctuation", "digit", "continuation", "function word", "capitalized", "word-initial")


@dataclass
class RoutingRecords:
    """One row per real (non-padding) token; special tokens are included (they are a token class)."""

    doc_id: np.ndarray  # [n] int64, unique per document
    topic: np.ndarray  # [n] int64, index into topic_names: the topic label of the token's document
    topic_names: list[str]
    token_id: np.ndarray  # [n] int64 (the UNMASKED token id)
    position: np.ndarray  # [n] int32, position in its sequence
    experts: np.ndarray  # [n, n_layers, k] int64; column 0 = the top choice; -1 = no expert
    layer_names: list[str]
    n_experts: int
    held_out: np.ndarray | None = None  # [n] bool: the document's topic was held out of training (None: none was)

    def subset(self, rows: np.ndarray) -> RoutingRecords:
        held_out = None if self.held_out is None else self.held_out[rows]
        return RoutingRecords(
            self.doc_id[rows],
            self.topic[rows],
            self.topic_names,
            self.token_id[rows],
            self.position[rows],
            self.experts[rows],
            self.layer_names,
            self.n_experts,
            held_out,
        )


# ----------------------------------------------------------------------------------------------------
# token classes


def _is_punctuation(text: str) -> bool:
    return bool(text) and all(unicodedata.category(ch)[0] in "PS" for ch in text)


def token_classes(tokenizer) -> tuple[np.ndarray, list[str]]:
    """Class index per token id ([len(tokenizer)] int64) and the class names.

    Classes, first match wins: "special" (``tokenizer.all_special_ids``), "punctuation" (all characters
    are Unicode punctuation or symbols, a leading "##" ignored), "digit" (all characters are digits),
    "continuation" ("##" WordPiece pieces), "function word" (``FUNCTION_WORDS``, case-insensitive),
    "capitalized" (first letter upper-case; only when the tokenizer keeps case, i.e. some non-special
    vocabulary entry has an upper-case letter — otherwise the class is left out of the names),
    "word-initial" (everything else).
    """
    n = len(tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(list(range(n)))
    special = {int(i) for i in tokenizer.all_special_ids}
    keeps_case = any(
        tok is not None and i not in special and any(ch.isupper() for ch in tok) for i, tok in enumerate(tokens)
    )
    names = [c for c in CLASS_ORDER if keeps_case or c != "capitalized"]
    index = {c: i for i, c in enumerate(names)}
    out = np.empty(n, dtype=np.int64)
    for i, tok in enumerate(tokens):
        tok = "" if tok is None else tok
        continuation = tok.startswith("##") and len(tok) > 2
        body = tok[2:] if continuation else tok.lstrip("\u2581\u0120")  # also SentencePiece / byte-BPE marks
        if i in special:
            cls = "special"
        elif _is_punctuation(body):
            cls = "punctuation"
        elif body and all(ch.isdigit() for ch in body):
            cls = "digit"
        elif continuation:
            cls = "continuation"
        elif body.lower() in FUNCTION_WORDS:
            cls = "function word"
        elif keeps_case and body[:1].isupper():
            cls = "capitalized"
        else:
            cls = "word-initial"
        out[i] = index[cls]
    return out, names


# ----------------------------------------------------------------------------------------------------
# one layer's tables


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


# ----------------------------------------------------------------------------------------------------
# permutation nulls


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


def within_document_nulls(
    layers: list[LayerTables], doc: np.ndarray, doc_topic: np.ndarray, token_class: np.ndarray, n_perm: int, seed: int
) -> tuple[list[list[float]], list[list[float]], list[float | None]]:
    """Per layer: token-class NMI with classes permuted within documents, the conditional MI with topics permuted
    among the occurrences of each frequent token (a token's occurrences in one document move together), and the
    share of those occurrences that the shuffle can move to another topic (the rest keep theirs: a conservative
    null).

    Layers with the same routed rows (all of them, for token choice) share their permutations.
    """
    class_nulls, conditional_nulls, movable = [[] for _ in layers], [[] for _ in layers], [None] * len(layers)
    groups: dict[bytes, list[int]] = {}
    for number, layer in enumerate(layers):
        groups.setdefault(layer.rows.tobytes(), []).append(number)
    D = len(doc_topic)
    for group_number, members in enumerate(groups.values()):
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
        K, _, F, E = first.shape
        if F == 0:
            continue
        frequent = np.flatnonzero(first.token_index < F)
        f = first.token_index[frequent]
        # a unit = a token's occurrences in one document; units trade topics only with units of the same token and
        # size, so the shuffle keeps p(topic | token) and the null mean is the plug-in bias, not a bit less
        units, unit_of, unit_size = np.unique(f * D + doc[rows][frequent], return_inverse=True, return_counts=True)
        unit_group = units // D * (unit_size.max() + 1) + unit_size
        shuffler, unit_topic = GroupShuffler(unit_group), doc_topic[units % D]
        # a unit can move only if units of another topic share its (token, size)
        pairs = np.unique(np.stack([unit_group, unit_topic]), axis=1)
        groups_with_topics, topics_per_group = np.unique(pairs[0], return_counts=True)
        can_move = topics_per_group[np.searchsorted(groups_with_topics, unit_group)] >= 2
        for number in members:
            movable[number] = float(unit_size[can_move].sum() / unit_size.sum())
        rng = rng_for(seed, 4, group_number)
        for _ in range(n_perm):
            permuted = shuffler.shuffle(unit_topic, rng)[unit_of]
            for number in members:
                t3 = np.bincount((f * K + permuted) * E + layers[number].expert[frequent], minlength=F * K * E)
                conditional_nulls[number].append(cmi(t3.reshape(F, K, E)))
    return class_nulls, conditional_nulls, movable


# ----------------------------------------------------------------------------------------------------
# the analysis


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


def _documents(doc_id: np.ndarray, topic: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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
class _SeenTables:
    """The analysed rows (the seen topics, or all with pool_held_out) as documents and per-layer tables."""

    rows: np.ndarray  # analysed rows of the records
    seen: RoutingRecords  # those rows
    doc: np.ndarray  # per row its document index
    doc_topic: np.ndarray  # per document its (merged) topic index
    topics: list[str]
    topic: np.ndarray  # per row its (merged) topic index
    token_class: np.ndarray  # per row its token class
    layers: list[LayerTables]


def _seen_tables(
    records: RoutingRecords,
    held_out: np.ndarray,
    token_class_of_id: np.ndarray,
    n_classes: int,
    min_token_count: int,
    min_topic_docs: int,
    pool_held_out: bool,
) -> _SeenTables:
    rows = np.arange(len(held_out)) if pool_held_out else np.flatnonzero(~held_out)
    seen = records.subset(rows)
    doc, doc_topic_raw = _documents(seen.doc_id, seen.topic)
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
    return _SeenTables(rows, seen, doc, doc_topic, topics, topic, token_class, layers)


def _bootstrap_measures(layers: list[LayerTables], n_docs: int, n_boot: int, seed: int) -> list[list[dict]]:
    """Per layer the measures of n_boot document-bootstrap draws; one draw of document multiplicities serves every
    layer and measure."""
    rng, draws = rng_for(seed, 1), [[] for _ in layers]
    for _ in range(n_boot):
        weights = bootstrap_weights(rng, n_docs)
        for layer_draws, layer in zip(draws, layers):
            layer_draws.append(layer.measures(weights))
    return draws


def _reference_settings(sample: RouterSample, n_random_routers: int) -> dict:
    return {
        "n_random_routers": int(n_random_routers),
        "max_router_inputs": int(sample.max_tokens),
        "n_router_inputs": int(len(sample.rows)),
        "n_candidate_tokens": int(sample.n_candidates),
        "selection": sample.rule.router_type,
        "load_fit_tokens": LOAD_FIT_TOKENS,  # the load-matching biases' seeded subsample (then checked on all)
        "probe_fit_tokens": PROBE_FIT_TOKENS,  # the cap on each probe half's L-BFGS fit
    }


def _prepared_records(
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


@dataclass
class _Resampled:
    """Per layer the document-bootstrap draws of its measures and its permutation nulls."""

    draws: list[list[dict]]
    topic_nulls: list[list[float]]
    class_nulls: list[list[float]]
    conditional_nulls: list[list[float]]
    movable: list[float | None]  # the share of the conditional null's occurrences that can change topic


def _resample(seen: _SeenTables, n_boot: int, n_perm: int, seed: int) -> _Resampled:
    layers = seen.layers
    draws = _bootstrap_measures(layers, len(seen.doc_topic), n_boot, seed)
    topic_nulls = topic_null(layers, seen.doc_topic, n_perm, seed)
    class_nulls, conditional_nulls, movable = within_document_nulls(
        layers, seen.doc, seen.doc_topic, seen.token_class, n_perm, seed
    )
    return _Resampled(draws, topic_nulls, class_nulls, conditional_nulls, movable)


def _seen_references(
    seen: _SeenTables,
    router_sample: RouterSample | None,
    n_classes: int,
    min_token_count: int,
    n_random_routers: int,
    n_boot: int,
    seed: int,
    random_routers: list[RandomRouters] | None,
    phases: Phases,
) -> list[dict | None]:
    """Per layer the references on the sampled router inputs of the analysed rows (None without a sample)."""
    if router_sample is None:
        return [None] * len(seen.layers)
    with phases("references", total=len(seen.layers)) as bar:
        return _references(
            router_sample,
            seen.rows,
            seen.doc,
            seen.doc_topic,
            seen.topic,
            seen.token_class,
            seen.seen.token_id,
            len(seen.topics),
            n_classes,
            min_token_count,
            n_random_routers,
            n_boot,
            seed,
            random_routers,
            bar.update,
        )


def _layer_entry(
    seen: _SeenTables,
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
        "coactivation": _coactivation(seen.seen.experts[:, li, :], n_experts) if k >= 2 else None,
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
        settings["references"] = _reference_settings(router_sample, n_random_routers)
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
    """Routing statistics per layer as a JSON-ready dict (the layout is the README's "Routing analysis").

    router_sample: the sampled router inputs for the references (None: no references);
    train_token_ids: the token ids that occur in the training split (for the held-out topics' unfamiliar pieces);
    pool_held_out: analyse the held-out topics together with the seen ones, as the earlier study did;
    random_routers: per layer the random routers already drawn on the sample (references.draw_random_routers with
    this seed and n_random_routers; None: drawn here); phases: times "statistics" and "references" (step 4).
    """
    phases = phases or no_phases()
    with phases("statistics", total=3) as bar:
        records, token_class_of_id, held_out = _prepared_records(records, token_class_of_id)
        k = records.experts.shape[2]
        seen = _seen_tables(
            records, held_out, token_class_of_id, len(class_names), min_token_count, min_topic_docs, pool_held_out
        )
        bar.update()
        resampled = _resample(seen, n_boot, n_perm, seed)
        bar.update()
    references = _seen_references(
        seen, router_sample, len(class_names), min_token_count, n_random_routers, n_boot, seed, random_routers, phases
    )
    with phases("statistics") as bar:
        stats = _assembled(records, seen, held_out, pool_held_out, resampled, references, k, class_names, id_to_token)
        stats["settings"] = _settings(n_boot, n_perm, seed, min_token_count, router_sample, n_random_routers)
        stats["held_out_shift"] = _held_out_shift(records, held_out, train_token_ids, n_boot, seed)
        if train_token_ids is not None:
            stats["seen_unseen_piece_share"] = _unseen_share(records.token_id[~held_out], train_token_ids)
        bar.update()
    return stats


def _assembled(
    records: RoutingRecords,
    seen: _SeenTables,
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
    excess_ci = basic_ci(boot["cmi"], cmi_value, clip_at_zero=False)
    excess_ci = None if excess_ci is None else [excess_ci[0] - null_mean, excess_ci[1] - null_mean]
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
            "explained_by": explained_by,
        },
        "vocabulary": _vocabulary(layer, tables["token"], id_to_token),
    }


def _references(
    sample: RouterSample,
    analysed_rows: np.ndarray,
    doc: np.ndarray,
    doc_topic: np.ndarray,
    topic: np.ndarray,
    token_class: np.ndarray,
    token_id: np.ndarray,
    n_topics: int,
    n_classes: int,
    min_token_count: int,
    n_random: int,
    n_boot: int,
    seed: int,
    random_routers: list[RandomRouters] | None = None,
    progress=None,
) -> list[dict]:
    """layer_references for every layer, on the sampled tokens that are among the analysed rows (random_routers:
    the layers' random routers already drawn on them, else drawn here; progress: called once per layer)."""
    position = np.minimum(np.searchsorted(analysed_rows, sample.rows), max(len(analysed_rows) - 1, 0))
    keep = analysed_rows[position] == sample.rows if len(analysed_rows) else np.zeros(len(sample.rows), bool)
    rows = position[keep]
    token_index, frequent_ids, _ = frequent_token_index(token_id, min_token_count)
    F = len(frequent_ids)
    f = token_index[rows]
    factors = [
        Factor("topic", topic[rows], n_topics),
        Factor("token_class", token_class[rows], n_classes),
        Factor("token_id", f, F + 1, probe=False),
    ]
    conditional = (
        {"token": np.where(f < F, f, -1), "n_tokens": F, "topic": topic[rows], "n_topics": n_topics} if F else None
    )
    out = []
    for li, (inputs, weight) in enumerate(zip(sample.inputs, sample.weights)):
        random = random_routers[li] if random_routers is not None else None
        if random is not None and not np.array_equal(random.keep, keep):
            raise ValueError("random_routers were drawn on other tokens than the analysed ones")
        out.append(
            layer_references(
                torch.from_numpy(np.ascontiguousarray(inputs[keep], dtype=np.float32)),
                weight,
                sample.rule,
                sample.batch[keep],
                doc[rows],
                doc_topic,
                factors,
                conditional,
                n_random,
                n_boot,
                seed,
                li,
                random,
            )
        )
        if progress is not None:
            progress()
    return out


def _unseen_share(token_id: np.ndarray, train_token_ids: np.ndarray) -> float:
    return float(np.mean(~np.isin(token_id, train_token_ids))) if len(token_id) else 0.0


def _held_out_shift(
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
    doc, doc_group = _documents(records.doc_id, group)
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
            out[records.topic_names[t]]["unseen_piece_share"] = _unseen_share(
                records.token_id[held_out & (records.topic == t)], train_token_ids
            )
    return out


def _vocabulary(layer: LayerTables, token_table: np.ndarray, id_to_token: list[str]) -> dict:
    """Lift top-10 per expert ([token, lift, occurrences of the token routed to that expert]) and consistency."""
    F, E = layer.n_frequent, layer.shape[3]
    table = token_table[:F]  # frequent tokens x experts
    total = token_table.sum()
    p_e = token_table.sum(0) / total if total > 0 else np.zeros(E)

    def name(i: int) -> str:
        tid = int(layer.frequent_ids[i])
        return str(id_to_token[tid]) if tid < len(id_to_token) else str(tid)

    lift_top = {}
    n_t = layer.frequent_counts.astype(np.float64)
    for ex in range(E):
        if F == 0 or p_e[ex] <= 0:
            lift_top[str(ex)] = []
            continue
        lift = table[:, ex] / n_t / p_e[ex]
        order = np.lexsort((layer.frequent_ids, -table[:, ex], -lift))
        order = [i for i in order[:10] if table[i, ex] > 0]
        lift_top[str(ex)] = [[name(i), float(lift[i]), int(table[i, ex])] for i in order]
    if F:
        share = table.max(1) / n_t
        consistency = float((share * n_t).sum() / n_t.sum())
        order = np.lexsort((layer.frequent_ids, -n_t, -share))[:10]
        most = [[name(i), float(share[i]), int(n_t[i])] for i in order]
    else:
        consistency, most = 0.0, []
    return {"lift_top": lift_top, "consistency": consistency, "most_consistent": most}


def _coactivation(choices: np.ndarray, E: int) -> list[list[int]]:
    """E x E: off-diagonal [i][j] = tokens for which both i and j are among the chosen experts;
    diagonal [i][i] = tokens for which i is chosen at all."""
    k = choices.shape[1]
    co = np.zeros(E * E, dtype=np.int64)
    for a in range(k):
        ca = choices[:, a]
        for b in range(a + 1, k):
            cb = choices[:, b]
            ok = (ca >= 0) & (cb >= 0) & (ca != cb)
            co += np.bincount(ca[ok] * E + cb[ok], minlength=E * E)
    co = co.reshape(E, E)
    co = co + co.T
    # diagonal: tokens choosing expert i (a token listing i twice counts once)
    for i in range(E):
        co[i, i] = int(np.any(choices == i, axis=1).sum())
    return co.tolist()
