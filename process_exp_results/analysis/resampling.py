"""Resampling for the routing statistics: document-level bootstrap tables, within-group permutations, intervals.

Tokens of one document are not independent draws, so every resampling unit here is a document (or a token's
occurrences within one document). A bootstrap draw reweights precomputed per-document cells by the documents'
multiplicities; a within-group permutation sorts by (group, random key). Seeded: same seed, same draws.
"""

from __future__ import annotations

import numpy as np


def rng_for(seed: int, *parts: int) -> np.random.Generator:
    """One independent generator per (seed, purpose, ...): adding a statistic never shifts another's draws."""
    return np.random.default_rng([int(seed), *(int(part) for part in parts)])


class Cells:
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


class GroupShuffler:
    """Random permutations of labels within groups, vectorized: sort by (group, random key)."""

    def __init__(self, groups: np.ndarray):
        self.order = np.argsort(groups, kind="stable")
        self.sorted_groups = groups[self.order].astype(np.float64)

    def shuffle(self, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        perm = np.argsort(self.sorted_groups + rng.random(self.sorted_groups.size))
        out = np.empty_like(labels)
        out[self.order] = labels[self.order[perm]]
        return out


def bootstrap_weights(rng: np.random.Generator, n_docs: int) -> np.ndarray:
    """Multiplicity of each of n_docs documents in one draw of n_docs documents with replacement."""
    if n_docs == 0:
        return np.zeros(0)
    return np.bincount(rng.integers(0, n_docs, size=n_docs), minlength=n_docs).astype(np.float64)


def basic_ci(samples, estimate: float | None, clip_at_zero: bool = True) -> list[float] | None:
    """95% basic bootstrap interval [2 estimate - q97.5, 2 estimate - q2.5] of the bootstrap draws' quantiles q;
    the lower end clipped at 0 for measures that are >= 0 (``clip_at_zero``).

    For the plug-in information measures (NMI, JS, conditional MI): they are biased upwards, and a bootstrap draw
    (duplicated documents, fewer distinct observations) inflates them about as much again, so the draws sit above
    the estimate by about the estimator's bias. The basic interval reflects the draws about the estimate, which
    subtracts that bias; the percentile interval would add it a second time (on small tables it can lie entirely
    above the true value). Either can exclude the estimate itself.
    """
    samples = np.asarray(samples, dtype=np.float64)
    samples = samples[np.isfinite(samples)]
    if samples.size == 0 or estimate is None or not np.isfinite(estimate):
        return None
    low, high = np.percentile(samples, [2.5, 97.5])
    low, high = 2.0 * float(estimate) - float(high), 2.0 * float(estimate) - float(low)
    return [max(low, 0.0), max(high, 0.0)] if clip_at_zero else [low, high]


def percentile_ci(samples) -> list[float] | None:
    """95% percentile interval (2.5/97.5 percentiles) of finite samples; None without any."""
    samples = np.asarray(samples, dtype=np.float64)
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return None
    low, high = np.percentile(samples, [2.5, 97.5])
    return [float(low), float(high)]


def p_value(observed: float, null) -> float:
    """Permutation p-value (1 + #{null >= observed}) / (1 + n)."""
    null = np.asarray(null, dtype=np.float64)
    # a tiny tolerance so that ties (exactly equal statistics computed in another summation order) count
    return float((1 + np.sum(null >= observed - 1e-12)) / (1 + null.size))
