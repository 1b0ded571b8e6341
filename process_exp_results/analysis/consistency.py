"""Local routing consistency: do neighbouring tokens go to the same expert more often than chance?

Mixtral (section 5) finds that consecutive tokens share their expert far more often than chance; in an encoder the
natural extra question is about the pieces of one word. Per MoE layer, over the routing records:

* a *pair* is two real tokens of one document at positions p and p+1, both routed in that layer (top choice >= 0).
  Pairs never cross documents; special tokens ([CLS], [SEP]) are real tokens and take part.
* ``top1_rate``: the share of pairs whose two tokens have the same top-1 expert; for k >= 2 ``topk_overlap``: the
  mean of |top-k set of p  ∩  top-k set of p+1| / k over the same pairs.
* ``chance``: sum over experts of the squared top-1 load share, the share computed over the pairs' endpoints (each
  pair contributes both its tokens, so a token inside a document counts twice, a document's first and last routed
  token once): what two tokens drawn independently from the layer's load give. ``topk_chance`` is the analogue,
  sum_e pi_e^2 / k with pi_e the share of endpoints whose top-k set holds e (the expected intersection of two
  independent sets is sum_e P(e in A) P(e in B)).
* ``within_document_chance`` (and ``topk_within_document_chance``): the exact expected rate when the experts of each
  document's routed tokens are shuffled among its routed positions, sum_d pairs_d sum_e c_de (c_de - 1) /
  (n_d (n_d - 1)) / sum_d pairs_d. It keeps each document's expert mix, so a router that follows the topic but not
  the neighbourhood reaches it and not more; the gap ``top1_rate - within_document_chance`` is the local part.
  On documents that share one expert distribution it equals ``chance`` up to O(1/n) terms.
* ``word_piece_rate``: the same rate over the pairs whose second token is a WordPiece continuation ("##" followed by
  at least one character, the rule of ``records.token_classes``), and ``word_piece_chance``, the squared load
  shares over those pairs' endpoints.
* intervals: 95% document-bootstrap percentile intervals (``resampling.bootstrap_weights``; a rate is a ratio of
  per-document sums, not a biased plug-in measure, so the plain percentiles serve); ``top1_excess_ci`` resamples
  ``top1_rate - chance`` with both recomputed per draw.
* ``random_reference``: the same top-1 rate for random routers applied to the same hidden states (the router sample
  of ``process_exp_results.analysis.references``, the routers of ``layer_references``: same seed, same routers), on the
  pairs whose two tokens are both in the sample. The sample is a uniform subset of token positions, independent of
  the routing, so the rate on the sampled pairs estimates the rate on all pairs without bias; a sample of a share
  f of the tokens keeps about f^2 of the pairs (every pair when step 4 keeps all tokens, as on the demo).

The held-out topics are left out unless ``pool_held_out``, as in ``statistics.analyze_routing``. Vectorized
numpy; seeded: same inputs and seed, same output.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from process_exp_results.analysis.records import RoutingRecords
from process_exp_results.analysis.references import Band
from process_exp_results.analysis.resampling import Cells, bootstrap_weights, percentile_ci, rng_for
from process_exp_results.analysis.routers import RandomRouters, RouterSample, draw_random_routers

__all__ = [
    "analysed_mask",
    "analyze_consistency",
    "consecutive_pairs",
    "consecutive_rate",
    "continuation_ids",
    "random_router_reference",
    "reference_from_choices",
]

BOOTSTRAP_PURPOSE = 30  # rng_for(seed, 30): this module's bootstrap; statistics.py uses 1-5, references.py 20-22


def consecutive_pairs(doc_id: np.ndarray, position: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (first, second) of every pair of tokens of one document at positions p and p+1, in document
    order. Rows need not be sorted; a gap in positions (a token left out) breaks the chain."""
    order = np.lexsort((position, doc_id))
    d, p = np.asarray(doc_id)[order], np.asarray(position, dtype=np.int64)[order]
    adjacent = np.flatnonzero((d[1:] == d[:-1]) & (p[1:] == p[:-1] + 1))
    return order[adjacent], order[adjacent + 1]


def continuation_ids(id_to_token: list[str]) -> np.ndarray:
    """[vocab] bool: the token is a WordPiece continuation ("##" and at least one more character)."""
    return np.array([tok is not None and tok.startswith("##") and len(tok) > 2 for tok in id_to_token], dtype=bool)


def consecutive_rate(
    choices: np.ndarray, doc_id: np.ndarray, position: np.ndarray, n_experts: int | None = None
) -> np.ndarray | float:
    """The share of consecutive pairs that share their top-1 expert, for one router ([n] choices -> float) or many
    ([R, n] -> [R]). A choice < 0 or >= n_experts (expert choice's "no expert", E in references.SelectionRule)
    takes its pairs out. For step 4: the top-1 choices of random routers for all tokens of some documents."""
    choices = np.asarray(choices)
    single = choices.ndim == 1
    choices = np.atleast_2d(choices)
    first, second = consecutive_pairs(doc_id, position)
    a, b = choices[:, first], choices[:, second]
    ok = (a >= 0) & (b >= 0)
    if n_experts is not None:
        ok &= (a < n_experts) & (b < n_experts)
    n_pairs = ok.sum(1)
    rates = np.where(n_pairs > 0, ((a == b) & ok).sum(1) / np.maximum(n_pairs, 1), np.nan)
    return float(rates[0]) if single else rates


def _load_chance(table: np.ndarray, n_endpoints: float, k: int = 1) -> float | None:
    """sum_e (share of endpoints holding e)^2 / k; for k = 1 the squared top-1 load shares."""
    return float(np.sum((table / n_endpoints) ** 2) / k) if n_endpoints > 0 else None


def _within_document_chance(
    doc: np.ndarray,
    holds: np.ndarray,
    routed: np.ndarray,
    pairs_per_doc: np.ndarray,
    n_docs: int,
    n_experts: int,
    k: int,
) -> float | None:
    """Expected pair rate (overlap / k) when each document's routed tokens are shuffled among its routed positions.

    holds: [n, E] bool, the token's (top-1 or top-k) set holds the expert; routed: [n] bool."""
    if pairs_per_doc.sum() == 0:
        return None
    d = doc[routed]
    n_routed = np.bincount(d, minlength=n_docs).astype(np.float64)
    counts = np.zeros((n_docs, n_experts))
    np.add.at(counts, d, holds[routed].astype(np.float64))
    same = (counts * (counts - 1)).sum(1) / np.maximum(n_routed * (n_routed - 1), 1)
    return float((pairs_per_doc * same).sum() / pairs_per_doc.sum() / k)


def _doc_sums(doc_of_pair: np.ndarray, values: np.ndarray, n_docs: int) -> np.ndarray:
    return np.bincount(doc_of_pair, weights=values.astype(np.float64), minlength=n_docs)


def _ratio(numerator: np.ndarray, denominator: np.ndarray, weights: np.ndarray | None = None) -> float:
    num, den = (numerator.sum(), denominator.sum()) if weights is None else (weights @ numerator, weights @ denominator)
    return float(num / den) if den > 0 else np.nan


def _none_if_nan(value: float | None) -> float | None:
    return None if value is None or not np.isfinite(value) else float(value)


@dataclass
class _Pairs:
    """One layer's consecutive pairs whose two tokens both have an expert."""

    first: np.ndarray  # row of each pair's first token
    second: np.ndarray  # row of its second token
    doc: np.ndarray  # the pair's document
    word_piece: np.ndarray  # bool: the second token is a WordPiece continuation
    same: np.ndarray  # bool: the two tokens share their top-1 expert
    per_doc: np.ndarray  # [n_docs] pairs per document


def _routed_pairs(
    top1: np.ndarray,
    routed: np.ndarray,
    doc: np.ndarray,
    first: np.ndarray,
    second: np.ndarray,
    continuation_pair: np.ndarray,
    n_docs: int,
) -> _Pairs:
    keep = routed[first] & routed[second]
    a, b, pair_doc = first[keep], second[keep], doc[first[keep]]
    per_doc = _doc_sums(pair_doc, np.ones(len(a)), n_docs)
    return _Pairs(a, b, pair_doc, continuation_pair[keep], top1[a] == top1[b], per_doc)


def _endpoint_cells(pairs: _Pairs, top1: np.ndarray, n_experts: int, only: np.ndarray | None = None) -> Cells:
    """Per-document top-1 expert cells of the pairs' endpoints, each pair contributing both its tokens; only: a
    mask of the pairs to take (None: all)."""
    end_doc, end_expert = np.r_[pairs.doc, pairs.doc], np.r_[top1[pairs.first], top1[pairs.second]]
    if only is not None:
        end_only = np.r_[only, only]
        end_doc, end_expert = end_doc[end_only], end_expert[end_only]
    return Cells(end_doc, end_expert, n_experts)


def _endpoint_chance(cells: Cells, weights: np.ndarray | None = None) -> float | None:
    """The load chance of the endpoints, plain (weights None) or for one bootstrap draw of documents."""
    table = cells.table(weights)
    return _load_chance(table, table.sum())


def _top1_holds(top1: np.ndarray, routed: np.ndarray, n_experts: int) -> np.ndarray:
    """[n, E] bool: the token's top-1 expert is e."""
    holds = np.zeros((len(top1), n_experts), dtype=bool)
    holds[np.flatnonzero(routed), top1[routed]] = True
    return holds


def _topk_holds(experts: np.ndarray, n_experts: int) -> np.ndarray:
    """[n, E] bool: the token's top-k set holds e (a -1 slot holds none)."""
    n, k = experts.shape
    holds = np.zeros((n, n_experts + 1), dtype=bool)  # column E collects the -1 slots, then dropped
    holds[np.repeat(np.arange(n), k), np.where(experts >= 0, experts, n_experts).ravel()] = True
    return holds[:, :n_experts]


def _top1_consistency(
    top1: np.ndarray,
    routed: np.ndarray,
    doc: np.ndarray,
    pairs: _Pairs,
    n_docs: int,
    n_experts: int,
    boot: list[np.ndarray],
) -> dict:
    """The top-1 rate, its load and within-document chances, and its excess over the load chance, with intervals."""
    same_d = _doc_sums(pairs.doc, pairs.same, n_docs)
    endpoints = _endpoint_cells(pairs, top1, n_experts)
    rate, base = _ratio(same_d, pairs.per_doc), _endpoint_chance(endpoints)
    rate_draws = [_ratio(same_d, pairs.per_doc, w) for w in boot]
    excess_draws = [r - (_endpoint_chance(endpoints, w) or np.nan) for r, w in zip(rate_draws, boot)]
    holds = _top1_holds(top1, routed, n_experts)
    return {
        "top1_rate": _none_if_nan(rate),
        "top1_rate_ci": percentile_ci(rate_draws),
        "chance": base,
        "within_document_chance": _within_document_chance(doc, holds, routed, pairs.per_doc, n_docs, n_experts, 1),
        "top1_excess": _none_if_nan(rate - base) if base is not None else None,
        "top1_excess_ci": percentile_ci(excess_draws),
    }


def _topk_consistency(
    experts: np.ndarray,
    routed: np.ndarray,
    doc: np.ndarray,
    pairs: _Pairs,
    n_docs: int,
    n_experts: int,
    boot: list[np.ndarray],
) -> dict:
    """The top-k overlap / k with its interval, load chance and within-document chance; all None for k = 1."""
    k = experts.shape[1]
    if k < 2:
        return {"topk_overlap": None, "topk_overlap_ci": None, "topk_chance": None, "topk_within_document_chance": None}
    ea, eb = experts[pairs.first], experts[pairs.second]  # [m, k]; the k experts of one token are distinct
    overlap = ((ea[:, :, None] == eb[:, None, :]) & (ea[:, :, None] >= 0)).sum((1, 2)) / k
    overlap_d = _doc_sums(pairs.doc, overlap, n_docs)
    holds = _topk_holds(experts, n_experts)
    end_holds = np.r_[holds[pairs.first], holds[pairs.second]].sum(0).astype(np.float64)
    return {
        "topk_overlap": _none_if_nan(_ratio(overlap_d, pairs.per_doc)),
        "topk_overlap_ci": percentile_ci([_ratio(overlap_d, pairs.per_doc, w) for w in boot]),
        "topk_chance": _load_chance(end_holds, 2.0 * len(pairs.first), k),
        "topk_within_document_chance": _within_document_chance(doc, holds, routed, pairs.per_doc, n_docs, n_experts, k),
    }


def _word_piece_consistency(
    top1: np.ndarray, pairs: _Pairs, n_docs: int, n_experts: int, boot: list[np.ndarray]
) -> dict:
    """The top-1 rate over the pairs whose second token continues a word, its interval and its load chance."""
    piece = pairs.word_piece
    piece_d, piece_same_d = _doc_sums(pairs.doc, piece, n_docs), _doc_sums(pairs.doc, pairs.same & piece, n_docs)
    return {
        "word_piece_rate": _none_if_nan(_ratio(piece_same_d, piece_d)),
        "word_piece_rate_ci": percentile_ci([_ratio(piece_same_d, piece_d, w) for w in boot]),
        "word_piece_chance": _endpoint_chance(_endpoint_cells(pairs, top1, n_experts, only=piece)),
    }


def _layer_consistency(
    experts: np.ndarray,
    doc: np.ndarray,
    first: np.ndarray,
    second: np.ndarray,
    continuation_pair: np.ndarray,
    n_docs: int,
    n_experts: int,
    boot: list[np.ndarray],
) -> dict:
    """One layer. experts: [n, k] (-1 = none); first/second: the consecutive pairs (rows); boot: weight draws."""
    top1 = experts[:, 0]
    routed = top1 >= 0
    pairs = _routed_pairs(top1, routed, doc, first, second, continuation_pair, n_docs)
    return {
        **_top1_consistency(top1, routed, doc, pairs, n_docs, n_experts, boot),
        **_topk_consistency(experts, routed, doc, pairs, n_docs, n_experts, boot),
        **_word_piece_consistency(top1, pairs, n_docs, n_experts, boot),
        "n_pairs": int(len(pairs.first)),
        "n_word_piece_pairs": int(pairs.word_piece.sum()),
        "random_reference": None,
    }


def _analysed_rows(records: RoutingRecords, pool_held_out: bool) -> np.ndarray:
    n = len(records.doc_id)
    if pool_held_out or records.held_out is None:
        return np.arange(n)
    return np.flatnonzero(~np.asarray(records.held_out, bool))


def analysed_mask(records: RoutingRecords, pool_held_out: bool = False) -> np.ndarray:
    """[n_records] bool: the rows the analysis reads (the held-out topics' rows left out unless pooled)."""
    mask = np.zeros(len(records.doc_id), bool)
    mask[_analysed_rows(records, pool_held_out)] = True
    return mask


def analyze_consistency(
    records: RoutingRecords,
    id_to_token: list[str],
    n_boot: int = 200,
    seed: int = 0,
    pool_held_out: bool = False,
    router_sample: RouterSample | None = None,
    n_random_routers: int = 50,
    random_routers: list[RandomRouters] | None = None,
    progress=None,
) -> dict[str, dict]:
    """Per layer name ("block 0") the consistency measures of the module docstring, JSON-ready.

    router_sample: the sampled router inputs (None: ``random_reference`` is None); the random routers are
    ``layer_references``' own (same seed and n_random_routers give the same routers). random_routers: those routers
    already drawn (references.draw_random_routers, as step 4 does for the references), so none is drawn again.
    progress: called once per layer."""
    experts = np.asarray(records.experts, dtype=np.int64)
    if experts.ndim == 2:
        experts = experts[:, :, None]
    rows = _analysed_rows(records, pool_held_out)
    _, doc = np.unique(records.doc_id[rows], return_inverse=True)
    n_docs = int(doc.max()) + 1 if len(doc) else 0
    first, second = consecutive_pairs(records.doc_id[rows], records.position[rows])
    is_piece = continuation_ids(id_to_token)
    token = records.token_id[rows]
    continuation_pair = np.zeros(len(second), bool)
    known = token[second] < len(is_piece)
    continuation_pair[known] = is_piece[token[second][known]]
    rng = rng_for(seed, BOOTSTRAP_PURPOSE)
    boot = [bootstrap_weights(rng, n_docs) for _ in range(n_boot)]  # one set of draws for every layer
    out = {}
    for li, name in enumerate(records.layer_names):
        out[name] = _layer_consistency(
            experts[rows, li, :], doc, first, second, continuation_pair, n_docs, int(records.n_experts), boot
        )
        if router_sample is not None and random_routers is not None:
            out[name]["random_reference"] = _reference_from_drawn(
                records, router_sample, random_routers[li], pool_held_out
            )
        elif router_sample is not None:
            out[name]["random_reference"] = random_router_reference(
                records, router_sample, li, n_random_routers, seed, pool_held_out
            )
        if progress is not None:
            progress()
    return out


def _reference_from_drawn(
    records: RoutingRecords, sample: RouterSample, routers: RandomRouters, pool_held_out: bool
) -> dict:
    """random_router_reference from routers already drawn on the sample's analysed tokens."""
    if not np.array_equal(routers.keep, analysed_mask(records, pool_held_out)[sample.rows]):
        raise ValueError("random_routers were drawn on other tokens than the analysed ones")
    n_experts = sample.weights[0].shape[0]
    return reference_from_choices(
        records,
        sample.rows[routers.keep],
        routers.trained.numpy(),
        routers.plain.numpy(),
        routers.matched.numpy(),
        n_experts,
        pool_held_out,
    )


def reference_from_choices(
    records: RoutingRecords,
    rows: np.ndarray,
    trained: np.ndarray,
    plain: np.ndarray,
    matched: np.ndarray,
    n_experts: int,
    pool_held_out: bool = False,
) -> dict:
    """The random-router reference from top-1 choices already computed on some rows of the records.

    rows: [n] record rows (e.g. RouterSample.rows); trained [n], plain [R, n], matched [R, n]: top experts of the
    trained router and of R random / load-matched random routers on them (as references.random_choices returns;
    a value outside 0..n_experts-1 = no expert). Pairs: consecutive tokens with both rows given (and analysed).
    Returns {"trained", "random": Band, "random_load_matched": Band, "n_pairs", "sampled_pair_share"}, the rates
    None (and the bands null) without a sampled pair."""
    rows = np.asarray(rows, dtype=np.int64)
    analysed = np.zeros(len(records.doc_id), bool)
    analysed[_analysed_rows(records, pool_held_out)] = True
    keep = analysed[rows]
    rows = rows[keep]
    trained, plain, matched = (np.asarray(c)[..., keep] for c in (trained, plain, matched))
    doc_id, position = records.doc_id[rows], records.position[rows]
    first, second = consecutive_pairs(doc_id, position)
    all_first, _ = consecutive_pairs(records.doc_id[analysed], records.position[analysed])
    stacked = np.concatenate([trained[None], plain, matched])
    a, b = stacked[0, first], stacked[0, second]
    n_pairs = int(np.sum((a >= 0) & (a < n_experts) & (b >= 0) & (b < n_experts)))  # the trained router's pairs
    rates = consecutive_rate(stacked, doc_id, position, n_experts)
    share = float(len(first) / len(all_first)) if len(all_first) else None
    if not np.isfinite(rates[0]):
        return {"trained": None, "random": None, "random_load_matched": None, "n_pairs": 0, "sampled_pair_share": share}

    def band(values: np.ndarray) -> dict | None:
        values = values[np.isfinite(values)]
        return asdict(Band.of(values, float(rates[0]))) if values.size else None

    n_plain = plain.shape[0]
    return {
        "trained": float(rates[0]),
        "random": band(rates[1 : 1 + n_plain]),
        "random_load_matched": band(rates[1 + n_plain :]),
        "n_pairs": n_pairs,
        "sampled_pair_share": share,
    }


def random_router_reference(
    records: RoutingRecords,
    sample: RouterSample,
    layer: int,
    n_random: int = 50,
    seed: int = 0,
    pool_held_out: bool = False,
) -> dict:
    """The consecutive top-1 rate of random routers (plain and load-matched) on the sampled router inputs of one
    layer, beside the trained router's on the same pairs: ``reference_from_choices`` of ``references.random_choices``
    with layer_references' generator, so these are the routers its NMI references use. Costs one more draw and load
    fit of the R routers; step 4 passes analyze_consistency the routers the references drew instead."""
    routers = draw_random_routers(sample, analysed_mask(records, pool_held_out), n_random, seed, layer)
    return _reference_from_drawn(records, sample, routers, pool_held_out)
