"""Information measures of count tables, in bits: entropy, mutual information, NMI, JS divergence, conditional MI.

Plug-in estimates (counts / total). The ``*_many`` forms take a stack of tables ([..., X, Y]) and return one value
per table, so R random routers or B bootstrap draws cost one call.
"""

from __future__ import annotations

import math

import numpy as np

TINY = 1e-12  # entropy differences below this are rounding noise


def entropy(counts: np.ndarray) -> float:
    counts = np.asarray(counts, dtype=np.float64).ravel()
    total = counts.sum()
    if total <= 0:
        return 0.0
    nz = counts[counts > 0]
    return max(float(math.log2(total) - (nz * np.log2(nz)).sum() / total), 0.0)


def mi_nmi(table: np.ndarray) -> tuple[float, float]:
    """Plug-in I(X;Y) in bits and NMI = I / sqrt(H(X) H(Y)) (0 when either entropy is 0) of a count table."""
    hx, hy, hxy = entropy(table.sum(1)), entropy(table.sum(0)), entropy(table)
    mi = hx + hy - hxy
    mi = mi if mi > TINY else 0.0
    if hx <= 0 or hy <= 0:
        return mi, 0.0
    return mi, min(mi / math.sqrt(hx * hy), 1.0)


def nmi(table: np.ndarray) -> float:
    return mi_nmi(table)[1]


def _entropy_many(counts: np.ndarray) -> np.ndarray:
    """Entropy of each row of [..., n] counts (0 for an empty row)."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum(-1)
    safe_counts = np.where(counts > 0, counts, 1.0)  # log2(1) = 0: empty cells add nothing
    safe_total = np.where(total > 0, total, 1.0)
    return np.maximum(np.log2(safe_total) - (counts * np.log2(safe_counts)).sum(-1) / safe_total, 0.0)


def nmi_many(tables: np.ndarray) -> np.ndarray:
    """NMI of each [X, Y] table in a [..., X, Y] stack (the same definition as ``nmi``)."""
    tables = np.asarray(tables, dtype=np.float64)
    hx, hy = _entropy_many(tables.sum(-1)), _entropy_many(tables.sum(-2))
    mi = hx + hy - _entropy_many(tables.reshape(*tables.shape[:-2], -1))
    mi = np.where(mi > TINY, mi, 0.0)
    denominator = np.sqrt(hx * hy)
    return np.where(denominator > 0, np.minimum(mi / np.where(denominator > 0, denominator, 1.0), 1.0), 0.0)


def js_rows(table: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
    """JS divergence (bits) of each row's distribution from `reference`'s (default: the pooled rows); NaN for
    empty rows."""
    table = np.asarray(table, dtype=np.float64)
    rows = table.sum(1, keepdims=True)
    reference = table.sum(0) if reference is None else np.asarray(reference, dtype=np.float64)
    if reference.sum() <= 0:
        return np.full(table.shape[0], np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = table / rows
        q = np.broadcast_to(reference / reference.sum(), p.shape)
        m = (p + q) / 2
        kl_p = np.where(p > 0, p * np.log2(p / m), 0.0).sum(1)
        kl_q = np.where(q > 0, q * np.log2(q / m), 0.0).sum(1)
    js = np.clip(0.5 * (kl_p + kl_q), 0.0, 1.0)
    js[rows[:, 0] <= 0] = np.nan
    return js


def cmi(t3: np.ndarray) -> float:
    """I(E; K | T) = H(T,K) + H(T,E) - H(T,K,E) - H(T) = sum_t p(t) I(E; K | T=t) of a [token, topic, expert] table."""
    h_t, h_tk, h_te, h_tke = entropy(t3.sum((1, 2))), entropy(t3.sum(2)), entropy(t3.sum(1)), entropy(t3)
    value = h_tk + h_te - h_tke - h_t
    return value if value > TINY else 0.0


def cmi_many(tables: np.ndarray) -> np.ndarray:
    """I(E; K | T) of each [T, K, E] table in a [..., T, K, E] stack (the same definition as ``cmi``)."""
    tables = np.asarray(tables, dtype=np.float64)
    lead = tables.shape[:-3]
    h_t = _entropy_many(tables.sum((-1, -2)))
    h_tk = _entropy_many(tables.sum(-1).reshape(*lead, -1))
    h_te = _entropy_many(tables.sum(-2).reshape(*lead, -1))
    value = h_tk + h_te - _entropy_many(tables.reshape(*lead, -1)) - h_t
    return np.where(value > TINY, value, 0.0)
