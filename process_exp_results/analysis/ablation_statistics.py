"""Statistics of the expert ablation (``ablation_statistics``; the losses come from ablation.py), per (layer, expert):

- per group, ``delta`` = mean cross-entropy over the group's masked tokens with e disabled minus the plain
  mean (a per-token mean: sum over documents of the loss sums over the sum of masked-token counts), with a
  95% document-bootstrap percentile interval (documents resampled with replacement; the same draws for every
  layer and expert of a group, seeded by (seed, group name));
- ``topic_p_value``: does the increase depend on the topic? Over the documents of ``topic_groups`` (default
  the test split, whose topics were seen in training), the statistic is the token-weighted between-topic
  variance of the per-topic deltas, sum_t n_t (delta_t - delta)^2 / sum_t n_t; the null shuffles the topic
  labels among those documents (a document keeps its tokens, so within-document dependence is respected);
- ``class_p_value``: does it depend on the kind of token? Each masked token gets the class of its true id
  (records.token_classes); the statistic is the same between-class variance over the masked tokens of
  ``topic_groups``. The null shuffles class labels among the masked tokens *within each document*: it keeps
  every document's class mix, so a document-level effect (a topic that e carries and that happens to be rich
  in, say, digits) cannot pass for a class effect, and the class totals (the weights n_c) stay fixed.
  Shuffling among all tokens would test "class or document", not class.

Expert choice: an expert's picks depend on the whole batch (capacity per forward pass), so batches are the
same in the plain and ablated runs, and a document's losses depend on its batch mates; the bootstrap still
resamples documents.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from process_exp_results.analysis.ablation import AblationLosses, GroupLosses
from process_exp_results.analysis.resampling import GroupShuffler, bootstrap_weights, p_value, percentile_ci, rng_for

_BOOTSTRAP, _TOPIC_PERM, _CLASS_PERM = 1, 2, 3  # rng_for purposes


def _finite(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _ratio(num, den):
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _between_variance(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Token-weighted variance of the per-level means. sums [..., levels, K], counts [..., levels] -> [..., K]."""
    total = counts.sum(axis=-1)[..., None]
    overall = sums.sum(axis=-2) / np.maximum(total, 1)
    means = _ratio(sums, counts[..., None])
    dev = np.where(counts[..., None] > 0, means - overall[..., None, :], 0.0)
    return (counts[..., None] * dev**2).sum(axis=-2) / np.maximum(total, 1)


def _level_test(codes: np.ndarray, values: np.ndarray, n_levels: int, permuted_codes) -> tuple[np.ndarray, np.ndarray]:
    """Observed per-level sums [L, K], and the permutation p-values [K] of the between-level variance.

    codes [n], values [n, K] (loss differences; counts are 1 per token or the token count per document passed
    as the last column of values). permuted_codes: iterable of [n] code arrays.
    """

    def stat(c):
        onehot = np.zeros((c.size, n_levels))
        onehot[np.arange(c.size), c] = 1.0
        sums = onehot.T @ values  # [levels, K+1]
        return sums, _between_variance(sums[:, :-1], sums[:, -1])

    sums, observed = stat(codes)
    null = np.array([stat(c)[1] for c in permuted_codes])  # [P, K]
    p = np.array([p_value(observed[k], null[:, k]) for k in range(observed.size)])
    return sums, p


def _cells(layers: Sequence[int], n_experts: int):
    """(block index, expert, k) for every ablated (layer, expert); k = layer position * n_experts + expert."""
    for li, b in enumerate(layers):
        for e in range(n_experts):
            yield b, e, li * n_experts + e


def _doc_differences(g: GroupLosses, k_all: int) -> np.ndarray:
    """Ablated minus plain loss sum per (layer, expert) and document: [K, n_docs]."""
    return (g.ablated_sum - g.plain_sum).reshape(k_all, -1)


def _bootstrap_deltas(name: str, g: GroupLosses, k_all: int, n_bootstrap: int, seed: int):
    """The group's per-token loss increase [K] and its document-bootstrap replicates [B, K].

    The draws depend on (seed, group name) only, so every layer and expert of a group sees the same ones.
    """
    diff = _doc_differences(g, k_all)
    n_tok = g.count.sum()
    delta = diff.sum(axis=1) / n_tok if n_tok > 0 else np.full(diff.shape[0], np.nan)
    rng = rng_for(seed, _BOOTSTRAP, zlib.crc32(name.encode()))
    weights = (
        np.stack([bootstrap_weights(rng, g.count.size) for _ in range(n_bootstrap)])
        if g.count.size
        else np.zeros((n_bootstrap, 0))
    )
    boot = _ratio(weights @ diff.T, (weights @ g.count.astype(np.float64))[:, None])  # [B, K]
    return delta, boot


def _group_deltas(result: dict, losses: AblationLosses, n_bootstrap: int, seed: int) -> dict:
    """Fills every group's delta and interval into ``result``; returns the plain losses per group."""
    k_all = len(losses.layers) * losses.n_experts
    plain = {}
    for name, g in losses.groups.items():
        delta, boot = _bootstrap_deltas(name, g, k_all, n_bootstrap, seed)
        for b, e, k in _cells(losses.layers, losses.n_experts):
            d = _finite(delta[k])
            result[f"block {b}"]["experts"][str(e)][name] = {
                "delta": d,
                "ci": percentile_ci(boot[:, k]) if d is not None else None,
            }
        n_tok = g.count.sum()
        plain[name] = {
            "loss": _finite(g.plain_sum.sum() / n_tok) if n_tok > 0 else None,
            "masked_tokens": int(n_tok),
            "documents": int(g.count.size),
        }
    return plain


@dataclass
class _LevelTest:
    """One level test (topic or token class) for every (layer, expert)."""

    names: Sequence  # the levels
    sums: np.ndarray | None  # [levels, K+1]: loss differences per level, then the level's token count
    p: np.ndarray  # [K], NaN where not tested

    def deltas(self, k: int) -> dict:
        """Level -> mean loss increase of (layer, expert) k, over the levels with tokens."""
        if self.sums is None:
            return {}
        return {
            str(self.names[i]): _finite(self.sums[i, k] / self.sums[i, -1])
            for i in range(len(self.names))
            if self.sums[i, -1] > 0
        }


def _topic_test(pooled: Sequence[GroupLosses], k_all: int, n_permutations: int, seed: int) -> _LevelTest:
    """Between-topic variance of the deltas; the null shuffles topic labels among the pooled documents."""
    topics = np.concatenate([g.topic for g in pooled]) if pooled else np.zeros(0, str)
    topic_names, topic_codes = np.unique(topics, return_inverse=True)
    doc_diff = np.concatenate([_doc_differences(g, k_all).T for g in pooled]) if pooled else np.zeros((0, k_all))
    doc_count = np.concatenate([g.count for g in pooled]).astype(np.float64) if pooled else np.zeros(0)
    test = _LevelTest(topic_names, None, np.full(k_all, np.nan))
    if len(topic_names) >= 1 and doc_count.size:
        rng = rng_for(seed, _TOPIC_PERM)
        perms = (rng.permutation(topic_codes) for _ in range(n_permutations))
        test.sums, p = _level_test(topic_codes, np.column_stack([doc_diff, doc_count]), len(topic_names), perms)
        if len(topic_names) >= 2:
            test.p = p
    return test


def _class_test(
    pooled: Sequence[GroupLosses], k_all: int, token_class, class_names, n_permutations: int, seed: int
) -> _LevelTest:
    """Between-class variance of the deltas; the null shuffles class labels among masked tokens within documents."""
    test = _LevelTest([], None, np.full(k_all, np.nan))
    if token_class is None or not pooled:
        return test
    token_class = np.asarray(token_class)
    test.names = list(class_names) if class_names is not None else [str(c) for c in range(token_class.max() + 1)]
    docs, tok_diff, offset = [], [], 0
    for g in pooled:
        docs.append(g.token_doc + offset)
        offset += g.count.size
        tok_diff.append((g.token_ablated.astype(np.float64) - g.token_plain).reshape(k_all, -1).T)
    docs = np.concatenate(docs)
    tok_diff = np.concatenate(tok_diff)
    tok_ids = np.concatenate([g.token_id for g in pooled])
    codes = token_class[tok_ids] if tok_ids.size else np.zeros(0, np.int64)
    if codes.size:
        shuffler = GroupShuffler(docs)
        rng = rng_for(seed, _CLASS_PERM)
        perms = (shuffler.shuffle(codes, rng) for _ in range(n_permutations))
        test.sums, p = _level_test(codes, np.column_stack([tok_diff, np.ones(codes.size)]), len(test.names), perms)
        if np.count_nonzero(test.sums[:, -1]) >= 2:
            test.p = p
    return test


def _fill_level_tests(
    result: dict, layers: Sequence[int], n_experts: int, topic: _LevelTest, token_class: _LevelTest
) -> None:
    """Per layer: the topic and class p-values and per-level deltas of every expert."""
    for b in layers:
        entry = result[f"block {b}"]
        entry["topic_p_value"], entry["topic_deltas"] = {}, {}
        entry["class_p_value"], entry["class_deltas"] = {}, {}
    for b, e, k in _cells(layers, n_experts):
        entry = result[f"block {b}"]
        entry["topic_p_value"][str(e)] = _finite(topic.p[k])
        entry["topic_deltas"][str(e)] = topic.deltas(k)
        entry["class_p_value"][str(e)] = _finite(token_class.p[k])
        entry["class_deltas"][str(e)] = token_class.deltas(k)


def ablation_statistics(
    losses: AblationLosses,
    token_class: np.ndarray | None = None,
    class_names: Sequence[str] | None = None,
    *,
    topic_groups: Sequence[str] = ("test",),
    n_bootstrap: int = 1000,
    n_permutations: int = 1000,
    seed: int = 0,
) -> dict:
    """The JSON-ready ablation result (see the module doc for the statistics).

    ``{"block L": {"experts": {"e": {group: {"delta", "ci"}}}, "topic_p_value": {"e": p}, "topic_deltas":
    {"e": {topic: delta}}, "class_p_value": {"e": p}, "class_deltas": {"e": {class: delta}}}, ...,
    "cost": {...}, "plain": {group: {"loss", "masked_tokens", "documents"}}, "settings": {...}}``.
    delta/ci are None for a group without masked tokens; a p-value is None with fewer than two topics (classes).
    token_class: class index per token id (records.token_classes); None skips the class test.
    """
    layers, n_experts = losses.layers, losses.n_experts
    k_all = len(layers) * n_experts
    result: dict = {f"block {b}": {"experts": {str(e): {} for e in range(n_experts)}} for b in layers}
    plain = _group_deltas(result, losses, n_bootstrap, seed)
    pooled = [losses.groups[n] for n in topic_groups if n in losses.groups]
    topic = _topic_test(pooled, k_all, n_permutations, seed)
    by_class = _class_test(pooled, k_all, token_class, class_names, n_permutations, seed)
    _fill_level_tests(result, layers, n_experts, topic, by_class)
    result["cost"] = dict(losses.cost)
    result["plain"] = plain
    result["settings"] = {
        "topic_groups": [n for n in topic_groups if n in losses.groups],
        "n_bootstrap": n_bootstrap,
        "n_permutations": n_permutations,
        "seed": seed,
        "statistic": "token-weighted between-level variance of the per-level loss increases",
    }
    return result
