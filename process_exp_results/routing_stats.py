"""Do MoE experts specialize, and on what?  Statistics over routing records, with uncertainty.

Every number here could have come out the other way: each association is reported with a
document-level bootstrap interval and, where a null hypothesis makes sense, a permutation p-value.

Measures, per MoE layer, on the top choice (column 0 of ``experts``; rows with -1 ignored):

* topic vs expert: NMI(topic; expert) = I / sqrt(H(topic) H(expert)) (bits), document-level bootstrap
  interval (resample documents with replacement, all tokens of a drawn document come along; 2.5/97.5
  percentiles, re-centred on the estimate, see ``_ci``), document-level permutation p-value (topic labels
  shuffled among documents, each document keeps its tokens and routing),
  p = (1 + #{null >= observed}) / (1 + n_perm).  Tokens of one document are not independent draws; a
  token-level test would treat a few documents with idiosyncratic routing as thousands of independent
  observations.
* Jensen-Shannon divergence (bits, in [0, 1]) of each topic's expert distribution from the pooled one,
  with bootstrap intervals.
* token class vs expert (special, punctuation, digit, continuation "##" piece, function word,
  capitalized when the tokenizer keeps case, other word-initial piece): NMI, bootstrap interval, and a
  permutation p-value from a permutation of the class labels *within each document* (keeps each
  document's expert mix and class mix, breaks only the class-expert link inside documents).
* token identity vs expert: NMI(token; expert) where tokens with fewer than ``min_token_count``
  occurrences are pooled into one "rare" bucket (the plug-in MI of thousands of singletons is pure bias).
* I(expert; topic | token) over tokens with >= ``min_token_count`` occurrences: does the topic tell
  anything about the expert once the token is known?  Null: topic labels shuffled among the occurrences
  of each token, where the occurrences of a token inside one document move together (they share the
  document's topic and, often, its routing quirks; shuffling single occurrences would mistake a few
  idiosyncratic documents for a topic effect).  ``null_mean`` is the plug-in bias to compare against.
  ``explained_by``: "context beyond the token" if the conditional test is significant (p <= 0.01);
  otherwise "token identity" if the topic test is significant; otherwise "neither".
* vocabulary: per expert the frequent tokens with the highest lift P(expert | token) / P(expert);
  token consistency (share of a frequent token's occurrences that go to its most common expert).
* co-activation (k >= 2): how often experts i and j are chosen for the same token.

Everything is vectorized numpy: contingency tables are ``np.bincount`` over combined indices; a bootstrap
draw reweights precomputed per-document cells by the document multiplicities; within-group permutations
sort by (group, random key).  Seeded: same inputs and seed, same output.
"""

from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass

import numpy as np

__all__ = [
    "FUNCTION_WORDS",
    "RoutingRecords",
    "analyze_routing",
    "stats_csv_rows",
    "token_classes",
]

ALPHA = 0.01  # significance level for the plain-language verdicts and "explained_by"

# Frequent English function words (articles, pronouns, prepositions, conjunctions, auxiliaries).
FUNCTION_WORDS = frozenset("""
a an the this that these those
i me my mine we us our ours you your yours he him his she her hers it its they them their theirs
who whom whose which what
of in on at by for with from to into onto over under about after before between through during without
within against among across up down out off than as like
and or but nor so yet if because while although though whether
is am are was were be been being have has had having do does did doing
will would shall should can could may might must
not no there here then also just only very too
""".split())

CLASS_ORDER = ("special", "punctuation", "digit", "continuation", "function word", "capitalized",
               "word-initial")


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
    keeps_case = any(tok is not None and i not in special and any(ch.isupper() for ch in tok)
                     for i, tok in enumerate(tokens))
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
# information measures (bits)


def _entropy(counts: np.ndarray) -> float:
    counts = np.asarray(counts, dtype=np.float64).ravel()
    total = counts.sum()
    if total <= 0:
        return 0.0
    nz = counts[counts > 0]
    return max(float(math.log2(total) - (nz * np.log2(nz)).sum() / total), 0.0)


_TINY = 1e-12  # entropy differences below this are rounding noise


def _mi_nmi(table: np.ndarray) -> tuple[float, float]:
    """Plug-in I(X;Y) in bits and NMI = I / sqrt(H(X) H(Y)) (0 when either entropy is 0) of a count table."""
    hx, hy, hxy = _entropy(table.sum(1)), _entropy(table.sum(0)), _entropy(table)
    mi = hx + hy - hxy
    mi = mi if mi > _TINY else 0.0
    if hx <= 0 or hy <= 0:
        return mi, 0.0
    return mi, min(mi / math.sqrt(hx * hy), 1.0)


def _nmi(table: np.ndarray) -> float:
    return _mi_nmi(table)[1]


def _js_rows(table: np.ndarray) -> np.ndarray:
    """JS divergence (bits) of each row's distribution from the pooled distribution; NaN for empty rows."""
    table = np.asarray(table, dtype=np.float64)
    rows = table.sum(1, keepdims=True)
    total = table.sum()
    if total <= 0:
        return np.full(table.shape[0], np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = table / rows
        q = np.broadcast_to(table.sum(0) / total, p.shape)
        m = (p + q) / 2
        kl_p = np.where(p > 0, p * np.log2(p / m), 0.0).sum(1)
        kl_q = np.where(q > 0, q * np.log2(q / m), 0.0).sum(1)
    js = np.clip(0.5 * (kl_p + kl_q), 0.0, 1.0)
    js[rows[:, 0] <= 0] = np.nan
    return js


def _cmi_parts(t3: np.ndarray) -> tuple[float, float, float, float]:
    """H(T), H(T,K), H(T,E), H(T,K,E) of a [token, topic, expert] count table."""
    return (_entropy(t3.sum((1, 2))), _entropy(t3.sum(2)), _entropy(t3.sum(1)), _entropy(t3))


def _cmi(t3: np.ndarray) -> float:
    """I(E; K | T) = H(T,K) + H(T,E) - H(T,K,E) - H(T) = sum_t p(t) I(E; K | T=t)."""
    h_t, h_tk, h_te, h_tke = _cmi_parts(t3)
    cmi = h_tk + h_te - h_tke - h_t
    return cmi if cmi > _TINY else 0.0


# ----------------------------------------------------------------------------------------------------
# resampling helpers


class _Cells:
    """Per-document sparse contingency cells: (document, table index, count).

    A document-level bootstrap draw with multiplicities w[doc] is the table
    ``bincount(index, weights=w[doc] * count)``; the plain table is w = 1.
    """

    def __init__(self, doc: np.ndarray, index: np.ndarray, size: int):
        self.size = int(size)
        combined = doc.astype(np.int64) * self.size + index.astype(np.int64)
        uniq, counts = np.unique(combined, return_counts=True)
        self.doc = uniq // self.size
        self.index = uniq % self.size
        self.count = counts.astype(np.float64)

    def table(self, weights: np.ndarray | None = None) -> np.ndarray:
        w = self.count if weights is None else self.count * weights[self.doc]
        return np.bincount(self.index, weights=w, minlength=self.size)


class _GroupShuffler:
    """Random permutations of labels within groups, vectorized: sort by (group, random key)."""

    def __init__(self, groups: np.ndarray):
        self.order = np.argsort(groups, kind="stable")
        self.sorted_groups = groups[self.order].astype(np.float64)

    def shuffle(self, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        perm = np.argsort(self.sorted_groups + rng.random(self.sorted_groups.size))
        out = np.empty_like(labels)
        out[self.order] = labels[self.order[perm]]
        return out


def _ci(samples: list[float] | np.ndarray, estimate: float) -> list[float] | None:
    """95% document-bootstrap interval: 2.5/97.5 percentiles of the bootstrap distribution, re-centred so
    that its median sits on the point estimate, clipped at 0 (all measures here are >= 0).

    Plug-in information measures are biased upwards, and more so on a bootstrap sample (duplicated
    documents mean fewer distinct observations), so the raw percentile interval of a sparse table can lie
    entirely above the estimate it is meant to describe.  The re-centred interval keeps the bootstrap
    spread and shape; the bias itself is what the permutation nulls (and ``null_mean``) are for.
    """
    samples = np.asarray(samples, dtype=np.float64)
    samples = samples[np.isfinite(samples)]
    if samples.size == 0 or estimate is None or not np.isfinite(estimate):
        return None
    low, mid, high = np.percentile(samples, [2.5, 50.0, 97.5])
    shift = float(estimate) - mid
    return [max(float(low + shift), 0.0), max(float(high + shift), 0.0)]


def _p_value(observed: float, null: list[float] | np.ndarray) -> float:
    null = np.asarray(null, dtype=np.float64)
    # a tiny tolerance so that ties (exactly equal statistics computed in another summation order) count
    return float((1 + np.sum(null >= observed - 1e-12)) / (1 + null.size))


def _rng(seed: int, *parts: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), *parts])


# ----------------------------------------------------------------------------------------------------
# main analysis


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


def _fmt(x: float) -> str:
    if x is None or not np.isfinite(x):
        return "n/a"
    if x == 0:
        return "0"
    return f"{x:.2g}" if abs(x) < 0.001 else f"{x:.3f}"


def _fmt_ci(ci) -> str:
    return "no interval" if ci is None else f"95% CI {_fmt(ci[0])}-{_fmt(ci[1])}"


def _fmt_p(p: float, n_perm: int) -> str:
    if n_perm == 0:
        return "no permutation test"
    if p <= 1.0 / (1 + n_perm) + 1e-12:
        return f"p<={p:.2g}"
    return f"p={p:.2g}"


def analyze_routing(records: RoutingRecords, token_class_of_id: np.ndarray, class_names: list[str],
                    id_to_token: list[str], n_boot: int = 200, n_perm: int = 200, seed: int = 0,
                    min_token_count: int = 20, min_topic_docs: int = 5) -> dict:
    """Routing statistics per layer as a JSON-ready dict (layout in the module docstring / issue 5 spec)."""
    experts = np.asarray(records.experts, dtype=np.int64)
    if experts.ndim == 2:
        experts = experts[:, :, None]
    n_tokens, n_layers, k = experts.shape
    E = int(records.n_experts)
    doc_raw = np.asarray(records.doc_id, dtype=np.int64)
    topic_raw = np.asarray(records.topic, dtype=np.int64)
    token_id = np.asarray(records.token_id, dtype=np.int64)
    token_class_of_id = np.asarray(token_class_of_id, dtype=np.int64)
    if not (doc_raw.shape == topic_raw.shape == token_id.shape == (n_tokens,)):
        raise ValueError("doc_id, topic, token_id and experts must have the same number of rows")
    if len(records.layer_names) != n_layers:
        raise ValueError(f"{len(records.layer_names)} layer names for {n_layers} layers")
    if n_tokens and (topic_raw.min() < 0 or topic_raw.max() >= len(records.topic_names)):
        raise ValueError("topic index out of range of topic_names")
    if n_tokens and (token_id.min() < 0 or token_id.max() >= len(token_class_of_id)):
        raise ValueError("token id out of range of token_class_of_id")
    if n_tokens and experts.max() >= E:
        raise ValueError(f"expert index >= n_experts ({E})")

    doc_keys, doc = np.unique(doc_raw, return_inverse=True)
    D = len(doc_keys)
    doc_topic_raw = np.zeros(D, dtype=np.int64)
    doc_topic_raw[doc] = topic_raw
    if np.any(doc_topic_raw[doc] != topic_raw):
        raise ValueError("tokens of one document carry different topics")
    doc_topic, topics = _merge_topics(doc_topic_raw, list(records.topic_names), min_topic_docs)
    K = len(topics)
    topic = doc_topic[doc]
    cls_all = token_class_of_id[token_id]
    C = len(class_names)

    # ---- per-layer preparation: observed tables and sparse per-document cells
    layers = []
    for li in range(n_layers):
        e_all = experts[:, li, 0]
        valid = e_all >= 0
        idx = np.flatnonzero(valid)
        e = e_all[idx]
        d = doc[idx]
        tok = token_id[idx]
        uniq_tok, tok_inv, tok_count = np.unique(tok, return_inverse=True, return_counts=True)
        frequent = tok_count >= min_token_count
        F = int(frequent.sum())
        freq_index = np.full(len(uniq_tok), F, dtype=np.int64)  # rare tokens -> bucket F
        freq_index[frequent] = np.arange(F)
        f = freq_index[tok_inv]
        is_freq = f < F
        L = {
            "li": li, "idx": idx, "e": e, "valid_key": valid.tobytes(), "F": F,
            "freq_ids": uniq_tok[frequent], "freq_counts": tok_count[frequent],
            "topic_cells": _Cells(d, doc_topic[d] * E + e, K * E),
            "class_cells": _Cells(d, cls_all[idx] * E + e, C * E),
            "tok_cells": _Cells(d, f * E + e, (F + 1) * E),
            "cmi_cells": _Cells(d[is_freq], (f[is_freq] * K + topic[idx][is_freq]) * E + e[is_freq], F * K * E),
            "freq_pos": np.flatnonzero(is_freq), "f_freq": f[is_freq],
        }
        L["topic_table"] = L["topic_cells"].table().reshape(K, E)
        L["class_table"] = L["class_cells"].table().reshape(C, E)
        L["tok_table"] = L["tok_cells"].table().reshape(F + 1, E)
        L["cmi_table"] = L["cmi_cells"].table().reshape(F, K, E)
        L["nmi"] = _nmi(L["topic_table"])
        L["js"] = _js_rows(L["topic_table"])
        L["class_nmi"] = _nmi(L["class_table"])
        L["tok_nmi"] = _nmi(L["tok_table"])
        L["cmi"] = _cmi(L["cmi_table"])
        L["boot"] = {"nmi": [], "js": [], "class_nmi": [], "tok_nmi": [], "cmi": []}
        L["null"] = {"nmi": [], "class_nmi": [], "cmi": []}
        layers.append(L)

    # ---- document-level bootstrap: one draw of document multiplicities serves every layer and measure
    rng = _rng(seed, 1)
    for _ in range(n_boot):
        w = np.bincount(rng.integers(0, D, size=D), minlength=D).astype(np.float64) if D else np.zeros(0)
        for L in layers:
            tt = L["topic_cells"].table(w).reshape(K, E)
            L["boot"]["nmi"].append(_nmi(tt))
            L["boot"]["js"].append(_js_rows(tt))
            L["boot"]["class_nmi"].append(_nmi(L["class_cells"].table(w).reshape(C, E)))
            L["boot"]["tok_nmi"].append(_nmi(L["tok_cells"].table(w).reshape(L["F"] + 1, E)))
            if L["F"]:
                L["boot"]["cmi"].append(_cmi(L["cmi_cells"].table(w).reshape(L["F"], K, E)))

    # ---- topic test: topic labels permuted among documents
    rng = _rng(seed, 2)
    for _ in range(n_perm):
        perm_topic = doc_topic[rng.permutation(D)]
        for L in layers:
            cells = L["topic_cells"]
            index = perm_topic[cells.doc] * E + cells.index % E
            L["null"]["nmi"].append(_nmi(np.bincount(index, weights=cells.count, minlength=K * E).reshape(K, E)))

    # ---- layers with the same set of routed tokens share their within-group permutations
    groups: dict[bytes, list[dict]] = {}
    for L in layers:
        groups.setdefault(L["valid_key"], []).append(L)
    for gi, group in enumerate(groups.values()):
        first = group[0]
        idx = first["idx"]
        # token class test: class labels permuted within each document
        shuffler = _GroupShuffler(doc[idx])
        cls_valid = cls_all[idx]
        rng = _rng(seed, 3, gi)
        for _ in range(n_perm):
            cls_perm = shuffler.shuffle(cls_valid, rng)
            for L in group:
                L["null"]["class_nmi"].append(
                    _nmi(np.bincount(cls_perm * E + L["e"], minlength=C * E).reshape(C, E)))
        # conditional MI test: topic labels permuted among the occurrences of each frequent token, moving
        # the occurrences of a token within one document together (a document's tokens are not independent)
        if first["F"] == 0:
            continue
        pos = first["freq_pos"]
        f_freq = first["f_freq"]
        units, unit_of = np.unique(f_freq * D + doc[idx][pos], return_inverse=True)
        unit_topic = doc_topic[units % D]
        shuffler = _GroupShuffler(units // D)
        base = f_freq * K
        rng = _rng(seed, 4, gi)
        for _ in range(n_perm):
            tp = shuffler.shuffle(unit_topic, rng)[unit_of]
            for L in group:
                # units differ in size, so the shuffle changes H(T,K) too: recompute every term
                t3 = np.bincount((base + tp) * E + L["e"][pos], minlength=L["F"] * K * E)
                L["null"]["cmi"].append(_cmi(t3.reshape(L["F"], K, E)))

    # ---- assemble
    out_layers, summary = [], []
    for L in layers:
        li = L["li"]
        name = records.layer_names[li]
        p_topic = _p_value(L["nmi"], L["null"]["nmi"])
        p_class = _p_value(L["class_nmi"], L["null"]["class_nmi"])
        if L["F"]:
            p_cmi = _p_value(L["cmi"], L["null"]["cmi"])
            null_mean = float(np.mean(L["null"]["cmi"])) if L["null"]["cmi"] else 0.0
        else:
            p_cmi, null_mean = 1.0, 0.0
        if p_cmi <= ALPHA:
            explained_by = "context beyond the token"
        elif p_topic <= ALPHA:
            explained_by = "token identity"
        else:
            explained_by = "neither"
        js_boot = np.array(L["boot"]["js"]).reshape(-1, K)
        layer = {
            "layer": name,
            "layer_index": li,
            "nmi": float(L["nmi"]),
            "nmi_ci": _ci(L["boot"]["nmi"], L["nmi"]),
            "p_value": p_topic,
            "js": {t: float(np.nan_to_num(L["js"][i])) for i, t in enumerate(topics)},
            "js_ci": {t: _ci(js_boot[:, i], L["js"][i]) for i, t in enumerate(topics)},
            "topic_expert_counts": L["topic_table"].astype(np.int64).tolist(),
            "token_class": {
                "classes": list(class_names),
                "nmi": float(L["class_nmi"]),
                "nmi_ci": _ci(L["boot"]["class_nmi"], L["class_nmi"]),
                "p_value": p_class,
                "expert_counts": L["class_table"].astype(np.int64).tolist(),
            },
            "token_id": {"nmi": float(L["tok_nmi"]), "nmi_ci": _ci(L["boot"]["tok_nmi"], L["tok_nmi"])},
            "conditional_topic": {
                "cmi": float(L["cmi"]),
                "cmi_ci": _ci(L["boot"]["cmi"], L["cmi"]),
                "p_value": p_cmi,
                "null_mean": null_mean,
                "explained_by": explained_by,
            },
            "vocabulary": _vocabulary(L, E, id_to_token),
            "coactivation": _coactivation(experts[:, li, :], E) if k >= 2 else None,
        }
        out_layers.append(layer)
        summary.append(_summary_sentence(layer, topics, n_perm))

    return {
        "n_tokens": int(n_tokens),
        "n_documents": int(D),
        "topics": topics,
        "n_experts": E,
        "k": int(k),
        "settings": {"n_boot": int(n_boot), "n_perm": int(n_perm), "seed": int(seed),
                     "min_token_count": int(min_token_count)},
        "layers": out_layers,
        "summary": summary,
    }


def _vocabulary(L: dict, E: int, id_to_token: list[str]) -> dict:
    """Lift top-10 per expert ([token, lift, occurrences of the token routed to that expert]) and consistency."""
    F = L["F"]
    table = L["tok_table"][:F]  # frequent tokens x experts
    total = L["tok_table"].sum()
    p_e = L["tok_table"].sum(0) / total if total > 0 else np.zeros(E)

    def name(i: int) -> str:
        tid = int(L["freq_ids"][i])
        return str(id_to_token[tid]) if tid < len(id_to_token) else str(tid)

    lift_top = {}
    n_t = L["freq_counts"].astype(np.float64)
    for ex in range(E):
        if F == 0 or p_e[ex] <= 0:
            lift_top[str(ex)] = []
            continue
        lift = table[:, ex] / n_t / p_e[ex]
        order = np.lexsort((L["freq_ids"], -table[:, ex], -lift))
        order = [i for i in order[:10] if table[i, ex] > 0]
        lift_top[str(ex)] = [[name(i), float(lift[i]), int(table[i, ex])] for i in order]
    if F:
        share = table.max(1) / n_t
        consistency = float((share * n_t).sum() / n_t.sum())
        order = np.lexsort((L["freq_ids"], -n_t, -share))[:10]
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


def _summary_sentence(layer: dict, topics: list[str], n_perm: int) -> str:
    name = layer["layer"]
    ct = layer["conditional_topic"]
    tc = layer["token_class"]
    significant = layer["p_value"] <= ALPHA
    if 1 / (n_perm + 1) > ALPHA:  # too few permutations to call anything significant
        finding = "expert choice vs topic"
    else:
        finding = f"expert choice {'depends' if significant else 'shows no significant dependence'} on topic"
    parts = [
        f"{name}: {finding} (NMI {_fmt(layer['nmi'])}, {_fmt_ci(layer['nmi_ci'])}, document-permutation "
        f"{_fmt_p(layer['p_value'], n_perm)})",
    ]
    if len(topics) > 1 and layer["js"]:
        top = max(layer["js"], key=layer["js"].get)
        parts.append(f"the most distinct topic is {top} (JS divergence {_fmt(layer['js'][top])} bits, "
                     f"{_fmt_ci(layer['js_ci'][top])})")
    parts.append(
        f"on token class NMI {_fmt(tc['nmi'])} ({_fmt_ci(tc['nmi_ci'])}, within-document permutation "
        f"{_fmt_p(tc['p_value'], n_perm)})")
    parts.append(f"on token identity NMI {_fmt(layer['token_id']['nmi'])} ({_fmt_ci(layer['token_id']['nmi_ci'])})")
    sentence = "; ".join(parts)
    sentence += (f"; given the token, topic adds I={_fmt(ct['cmi'])} bits ({_fmt_ci(ct['cmi_ci'])}; "
                 f"within-token null {_fmt(ct['null_mean'])}, {_fmt_p(ct['p_value'], n_perm)})")
    if 1 / (n_perm + 1) > ALPHA:  # the smallest reachable p-value is above the threshold: no test can pass
        return (f"{sentence}: with {n_perm} permutations no p-value can reach {ALPHA}, so nothing is "
                f"decided; rerun with at least {int(round(1 / ALPHA)) * 2} permutations.")
    verdict = {
        "token identity": "the topic signal is explained by token identity",
        "context beyond the token": ("the topic signal goes beyond token identity" if layer["p_value"] <= ALPHA
                                     else "given the token, topic still predicts the expert, although the "
                                          "overall topic dependence is not significant"),
        "neither": "there is no document-level topic signal to explain",
    }[ct["explained_by"]]
    return f"{sentence}: {verdict}."


def stats_csv_rows(stats: dict) -> list[dict]:
    """Flat rows {"layer", "measure", "value", "ci_low", "ci_high", "p_value"} (None where not defined)."""
    rows = []

    def row(layer, measure, value, ci, p):
        rows.append({"layer": layer, "measure": measure, "value": value,
                     "ci_low": None if ci is None else ci[0], "ci_high": None if ci is None else ci[1],
                     "p_value": p})

    for layer in stats["layers"]:
        name = layer["layer"]
        row(name, "topic_nmi", layer["nmi"], layer["nmi_ci"], layer["p_value"])
        tc = layer["token_class"]
        row(name, "token_class_nmi", tc["nmi"], tc["nmi_ci"], tc["p_value"])
        row(name, "token_id_nmi", layer["token_id"]["nmi"], layer["token_id"]["nmi_ci"], None)
        ct = layer["conditional_topic"]
        row(name, "conditional_topic_mi", ct["cmi"], ct["cmi_ci"], ct["p_value"])
        for topic, value in layer["js"].items():
            row(name, f"js:{topic}", value, layer["js_ci"].get(topic), None)
    return rows
