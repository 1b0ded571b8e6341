"""Expert ablation: how much the MLM loss of each group rises when one expert of one MoE layer is switched off.

For every MoE layer L and expert e the evaluation is rerun with e disabled in L only (models/router.py,
``LinearRouter.disabled_experts``): token choice sets e's router logit to -inf before the softmax and the
top-k, so its tokens go to their next choice (and the gate weights are the softmax over the remaining
experts); expert choice keeps every expert's picks but gives e's picks gate weight 0, as if e returned 0.
The masked positions are the dataset's own (``labels != -100``), the same as the plain evaluation
(train/evaluation.py).

Cost. The blocks below L do not see the ablation, so each batch is run once with the plain model, the input
of every MoE block is cached (a forward pre-hook; the model's own forward, so embeddings and all stay the
model's code), and only blocks L.. + final norm + MLM head are rerun per ablated expert:
``n_blocks + E * sum_L (n_blocks - L)`` block forwards per batch instead of ``n_blocks + E * n_L * n_blocks``
for E x n_L full passes. ``reuse_below=False`` runs the full passes (the reference the fast path is tested
against). Both counts and the wall time are in ``cost``.

Statistics (``ablation_statistics``), per (layer, expert):

- per group, ``delta`` = mean cross-entropy over the group's masked tokens with e disabled minus the plain
  mean (a per-token mean: sum over documents of the loss sums over the sum of masked-token counts), with a
  95% document-bootstrap percentile interval (documents resampled with replacement; the same draws for every
  layer and expert of a group, seeded by (seed, group name));
- ``topic_p_value``: does the increase depend on the topic? Over the documents of ``topic_groups`` (default
  the test split, whose topics were seen in training), the statistic is the token-weighted between-topic
  variance of the per-topic deltas, sum_t n_t (delta_t - delta)^2 / sum_t n_t; the null shuffles the topic
  labels among those documents (a document keeps its tokens, so within-document dependence is respected);
- ``class_p_value``: does it depend on the kind of token? Each masked token gets the class of its true id
  (routing_stats.token_classes); the statistic is the same between-class variance over the masked tokens of
  ``topic_groups``. The null shuffles class labels among the masked tokens *within each document*: it keeps
  every document's class mix, so a document-level effect (a topic that e carries and that happens to be rich
  in, say, digits) cannot pass for a class effect, and the class totals (the weights n_c) stay fixed.
  Shuffling among all tokens would test "class or document", not class.

Expert choice: an expert's picks depend on the whole batch (capacity per forward pass), so batches are the
same in the plain and ablated runs, and a document's losses depend on its batch mates; the bootstrap still
resamples documents.
"""
from __future__ import annotations

import contextlib
import math
import time
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from process_exp_results.formatting import format_number
from process_exp_results.resampling import GroupShuffler, bootstrap_weights, p_value, percentile_ci, rng_for

__all__ = [
    "AblationLosses",
    "GroupLosses",
    "ablation_losses",
    "ablation_statistics",
    "analyze_ablation",
    "disabled_experts",
    "plot_ablation",
]

IGNORE_INDEX = -100
_BOOTSTRAP, _TOPIC_PERM, _CLASS_PERM = 1, 2, 3  # rng_for purposes


# ----------------------------------------------------------------------------------------------------
# disabling experts
# ----------------------------------------------------------------------------------------------------


def _encoder(model):
    return model.encoder if hasattr(model, "lm_head") else model


def _router(model, block_index: int):
    blocks = _encoder(model).blocks
    if not 0 <= block_index < len(blocks) or not blocks[block_index].use_moe:
        raise ValueError(f"block {block_index} is not an MoE block of this model")
    ffn = blocks[block_index].ffn
    if not hasattr(ffn, "router"):
        raise ValueError(f"block {block_index} has no router (n_experts=1, the dense baseline): nothing to ablate")
    return ffn.router


@contextlib.contextmanager
def disabled_experts(model, block_index: int, experts: int | Iterable[int]):
    """Within the block, the given experts of MoE block ``block_index`` are switched off (see module doc).

    Token choice needs at least one expert left (all logits -inf would give NaN). Restores the previous state.
    """
    router = _router(model, block_index)
    experts = [experts] if isinstance(experts, int) else list(experts)
    if any(not 0 <= e < router.n_experts for e in experts):
        raise ValueError(f"experts {experts} out of range for {router.n_experts} experts")
    mask = torch.zeros(router.n_experts, dtype=torch.bool, device=router.linear.weight.device)
    mask[experts] = True
    if bool(mask.all()) and not hasattr(router, "capacity_factor"):
        raise ValueError("cannot disable every expert of a token-choice layer: its tokens would have nowhere to go")
    previous = router.disabled_experts
    router.disabled_experts = mask
    try:
        yield router
    finally:
        router.disabled_experts = previous


# ----------------------------------------------------------------------------------------------------
# losses
# ----------------------------------------------------------------------------------------------------


@dataclass
class GroupLosses:
    """One group's masked-token losses. Documents are the dataset's rows, in order; tokens in batch order."""

    doc_id: np.ndarray  # [n_docs] (the dataset's doc_id, else the row index)
    topic: np.ndarray  # [n_docs] str ("" without a topic column)
    count: np.ndarray  # [n_docs] int64, masked tokens
    plain_sum: np.ndarray  # [n_docs] float64, sum of cross-entropy over the document's masked tokens
    ablated_sum: np.ndarray  # [n_layers, n_experts, n_docs] float64, the same with expert e of layer l disabled
    token_doc: np.ndarray  # [n_tokens] int64, row of each masked token's document
    token_id: np.ndarray  # [n_tokens] int64, its true id (the label)
    token_plain: np.ndarray  # [n_tokens] float32
    token_ablated: np.ndarray  # [n_layers, n_experts, n_tokens] float32


@dataclass
class AblationLosses:
    layers: list[int]  # block indices of the MoE layers, in order
    n_experts: int
    groups: dict[str, GroupLosses]
    cost: dict = field(default_factory=dict)


def _suffix_token_losses(model, x, real_mask, start: int, is_masked, targets) -> torch.Tensor:
    """Blocks start.. + final norm + MLM head on the masked positions: per-token cross-entropy."""
    encoder = _encoder(model)
    for block in encoder.blocks[start:]:
        x, _ = block(x, real_mask)
    logits = model.lm_head(encoder.final_norm(x)[is_masked])
    return F.cross_entropy(logits.float(), targets, reduction="none")


def _full_token_losses(model, batch, is_masked, targets) -> torch.Tensor:
    output = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                   masked_logits_only=True)
    return F.cross_entropy(output.logits.float(), targets, reduction="none")


@torch.no_grad()
def ablation_losses(model, groups: Mapping, device, batch_size: int, *, reuse_below: bool = True,
                    layers: Sequence[int] | None = None, progress: bool = False) -> AblationLosses:
    """Per document of every group: masked-token loss sums, plain and with each expert of each MoE layer disabled.

    model: MoEEncoderForMaskedLM (put on ``device`` by the caller; run in eval mode, restored after).
    groups: name -> datasets.Dataset with input_ids, attention_mask, labels (-100 = not masked) and optionally
    topic, doc_id (step 2's files). layers: block indices to ablate (default every MoE layer).
    reuse_below: cache each MoE block's input from the plain pass and rerun only the blocks from there
    (False: E full passes per layer, the reference).
    """
    from tqdm.auto import tqdm

    from train.evaluation import mlm_loader

    device = torch.device(device)
    encoder = _encoder(model)
    n_blocks = len(encoder.blocks)
    layers = list(model.config.moe_layer_indices if layers is None else layers)
    for block_index in layers:
        _router(model, block_index)  # fails early on a non-MoE block or the dense baseline
    n_experts = int(model.config.n_experts)
    was_training = model.training
    model.eval()

    cached: dict[int, tuple] = {}
    capturing = [False]  # only the plain pass fills the cache (the suffix reruns call the same blocks)
    hooks = []
    if reuse_below:
        for block_index in layers:
            def keep_input(module, args, block_index=block_index):
                if capturing[0]:
                    cached[block_index] = (args[0], args[1])
            hooks.append(encoder.blocks[block_index].register_forward_pre_hook(keep_input))

    out: dict[str, GroupLosses] = {}
    n_batches = 0
    plain_seconds = ablation_seconds = 0.0
    try:
        for name, dataset in groups.items():
            n_docs = len(dataset)
            columns = set(dataset.column_names)
            doc_id = np.asarray(dataset["doc_id"]) if "doc_id" in columns else np.arange(n_docs)
            topic = np.asarray([str(t) for t in dataset["topic"]] if "topic" in columns else [""] * n_docs)
            token_doc, token_id, token_plain = [], [], []
            token_ablated = [[[] for _ in range(n_experts)] for _ in layers]
            row0 = 0
            loader = mlm_loader(dataset, batch_size)
            for batch in tqdm(loader, desc=f"ablation {name}", leave=False, disable=not progress):
                batch = {key: value.to(device) for key, value in batch.items()}
                labels = batch["labels"]
                is_masked = labels != IGNORE_INDEX
                targets = labels[is_masked]
                rows = is_masked.nonzero()[:, 0]
                started = time.perf_counter()
                cached.clear()
                capturing[0] = True
                token_plain.append(_full_token_losses(model, batch, is_masked, targets).cpu())
                capturing[0] = False
                plain_seconds += time.perf_counter() - started
                started = time.perf_counter()
                for li, block_index in enumerate(layers):
                    for expert in range(n_experts):
                        with disabled_experts(model, block_index, expert):
                            if reuse_below:
                                x, real_mask = cached[block_index]
                                losses = _suffix_token_losses(model, x, real_mask, block_index, is_masked, targets)
                            else:
                                losses = _full_token_losses(model, batch, is_masked, targets)
                        token_ablated[li][expert].append(losses.cpu())
                ablation_seconds += time.perf_counter() - started
                token_doc.append(rows.cpu() + row0)
                token_id.append(targets.cpu())
                row0 += labels.shape[0]
                n_batches += 1

            def cat(parts, dtype):
                return torch.cat(parts).numpy().astype(dtype) if parts else np.zeros(0, dtype)

            t_doc, t_id, t_plain = cat(token_doc, np.int64), cat(token_id, np.int64), cat(token_plain, np.float32)
            t_abl = np.zeros((len(layers), n_experts, t_doc.size), np.float32)
            for li in range(len(layers)):
                for expert in range(n_experts):
                    t_abl[li, expert] = cat(token_ablated[li][expert], np.float32)
            count = np.bincount(t_doc, minlength=n_docs).astype(np.int64)
            plain_sum = np.bincount(t_doc, weights=t_plain.astype(np.float64), minlength=n_docs)
            ablated_sum = np.zeros((len(layers), n_experts, n_docs))
            for li in range(len(layers)):
                for expert in range(n_experts):
                    ablated_sum[li, expert] = np.bincount(t_doc, weights=t_abl[li, expert].astype(np.float64),
                                                          minlength=n_docs)
            out[name] = GroupLosses(doc_id=doc_id, topic=topic, count=count, plain_sum=plain_sum,
                                    ablated_sum=ablated_sum, token_doc=t_doc, token_id=t_id, token_plain=t_plain,
                                    token_ablated=t_abl)
    finally:
        for hook in hooks:
            hook.remove()
        cached.clear()
        capturing[0] = False
        model.train(was_training)

    suffix_blocks = sum(n_blocks - block_index for block_index in layers)
    per_batch = n_blocks + n_experts * (suffix_blocks if reuse_below else len(layers) * n_blocks)
    naive_per_batch = n_blocks + n_experts * len(layers) * n_blocks
    cost = {
        "reuse_below": bool(reuse_below),
        "n_batches": n_batches,
        "n_blocks": n_blocks,
        "n_moe_layers": len(layers),
        "n_experts": n_experts,
        "block_forwards": per_batch * n_batches,
        "naive_block_forwards": naive_per_batch * n_batches,  # plain pass + E x n_layers full passes
        "block_forward_ratio": per_batch / naive_per_batch,
        "plain_seconds": plain_seconds,
        "ablation_seconds": ablation_seconds,
        "seconds": plain_seconds + ablation_seconds,
    }
    return AblationLosses(layers=layers, n_experts=n_experts, groups=out, cost=cost)


# ----------------------------------------------------------------------------------------------------
# statistics
# ----------------------------------------------------------------------------------------------------


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
    return (counts[..., None] * dev ** 2).sum(axis=-2) / np.maximum(total, 1)


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


def ablation_statistics(losses: AblationLosses, token_class: np.ndarray | None = None,
                        class_names: Sequence[str] | None = None, *, topic_groups: Sequence[str] = ("test",),
                        n_bootstrap: int = 1000, n_permutations: int = 1000, seed: int = 0) -> dict:
    """The JSON-ready ablation result (see the module doc for the statistics).

    ``{"block L": {"experts": {"e": {group: {"delta", "ci"}}}, "topic_p_value": {"e": p}, "topic_deltas":
    {"e": {topic: delta}}, "class_p_value": {"e": p}, "class_deltas": {"e": {class: delta}}}, ...,
    "cost": {...}, "plain": {group: {"loss", "masked_tokens", "documents"}}, "settings": {...}}``.
    delta/ci are None for a group without masked tokens; a p-value is None with fewer than two topics (classes).
    token_class: class index per token id (routing_stats.token_classes); None skips the class test.
    """
    layers, n_experts = losses.layers, losses.n_experts
    n_l = len(layers)
    result: dict = {f"block {b}": {"experts": {str(e): {} for e in range(n_experts)}} for b in layers}

    # per group: delta and bootstrap interval (same draws for every layer and expert)
    plain = {}
    for name, g in losses.groups.items():
        diff = (g.ablated_sum - g.plain_sum).reshape(n_l * n_experts, -1)  # [K, n_docs]
        n_tok = g.count.sum()
        delta = diff.sum(axis=1) / n_tok if n_tok > 0 else np.full(diff.shape[0], np.nan)
        rng = rng_for(seed, _BOOTSTRAP, zlib.crc32(name.encode()))
        weights = np.stack([bootstrap_weights(rng, g.count.size) for _ in range(n_bootstrap)]) \
            if g.count.size else np.zeros((n_bootstrap, 0))
        boot = _ratio(weights @ diff.T, (weights @ g.count.astype(np.float64))[:, None])  # [B, K]
        for li, b in enumerate(layers):
            for e in range(n_experts):
                k = li * n_experts + e
                d = _finite(delta[k])
                result[f"block {b}"]["experts"][str(e)][name] = {
                    "delta": d, "ci": percentile_ci(boot[:, k]) if d is not None else None}
        plain[name] = {"loss": _finite(g.plain_sum.sum() / n_tok) if n_tok > 0 else None,
                       "masked_tokens": int(n_tok), "documents": int(g.count.size)}

    pooled = [losses.groups[n] for n in topic_groups if n in losses.groups]
    k_all = n_l * n_experts

    # topic: shuffle topic labels among documents
    topics = np.concatenate([g.topic for g in pooled]) if pooled else np.zeros(0, str)
    topic_names, topic_codes = np.unique(topics, return_inverse=True)
    doc_diff = np.concatenate([(g.ablated_sum - g.plain_sum).reshape(k_all, -1).T for g in pooled]) \
        if pooled else np.zeros((0, k_all))
    doc_count = np.concatenate([g.count for g in pooled]).astype(np.float64) if pooled else np.zeros(0)
    topic_p = np.full(k_all, np.nan)
    topic_sums = None
    if len(topic_names) >= 1 and doc_count.size:
        rng = rng_for(seed, _TOPIC_PERM)
        perms = (rng.permutation(topic_codes) for _ in range(n_permutations))
        topic_sums, p = _level_test(topic_codes, np.column_stack([doc_diff, doc_count]), len(topic_names), perms)
        if len(topic_names) >= 2:
            topic_p = p

    # token class: shuffle class labels among masked tokens within documents
    class_p = np.full(k_all, np.nan)
    class_sums = None
    if token_class is not None and pooled:
        token_class = np.asarray(token_class)
        names = list(class_names) if class_names is not None else [str(c) for c in range(token_class.max() + 1)]
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
            class_sums, p = _level_test(codes, np.column_stack([tok_diff, np.ones(codes.size)]), len(names), perms)
            if np.count_nonzero(class_sums[:, -1]) >= 2:
                class_p = p

    def level_deltas(sums, level_names, k):
        if sums is None:
            return {}
        return {str(level_names[i]): _finite(sums[i, k] / sums[i, -1]) for i in range(len(level_names))
                if sums[i, -1] > 0}

    for li, b in enumerate(layers):
        entry = result[f"block {b}"]
        entry["topic_p_value"], entry["topic_deltas"] = {}, {}
        entry["class_p_value"], entry["class_deltas"] = {}, {}
        for e in range(n_experts):
            k = li * n_experts + e
            entry["topic_p_value"][str(e)] = _finite(topic_p[k])
            entry["topic_deltas"][str(e)] = level_deltas(topic_sums, topic_names, k)
            entry["class_p_value"][str(e)] = _finite(class_p[k])
            entry["class_deltas"][str(e)] = level_deltas(class_sums, names, k) if class_sums is not None else {}

    result["cost"] = dict(losses.cost)
    result["plain"] = plain
    result["settings"] = {"topic_groups": [n for n in topic_groups if n in losses.groups],
                          "n_bootstrap": n_bootstrap, "n_permutations": n_permutations, "seed": seed,
                          "statistic": "token-weighted between-level variance of the per-level loss increases"}
    return result


def analyze_ablation(model, groups: Mapping, device, batch_size: int, tokenizer=None, *,
                     topic_groups: Sequence[str] = ("test",), n_bootstrap: int = 1000, n_permutations: int = 1000,
                     seed: int = 0, reuse_below: bool = True, progress: bool = False) -> dict:
    """ablation_losses + ablation_statistics, with the token classes of ``tokenizer`` (None: no class test)."""
    losses = ablation_losses(model, groups, device, batch_size, reuse_below=reuse_below, progress=progress)
    token_class = class_names = None
    if tokenizer is not None:
        from process_exp_results.routing_stats import token_classes

        token_class, class_names = token_classes(tokenizer)
    return ablation_statistics(losses, token_class, class_names, topic_groups=topic_groups,
                               n_bootstrap=n_bootstrap, n_permutations=n_permutations, seed=seed)


# ----------------------------------------------------------------------------------------------------
# figure
# ----------------------------------------------------------------------------------------------------


def plot_ablation(ablation: Mapping, layer: str, path) -> Path:
    """Heatmap for one layer ("block 0"): rows = groups (then the seen topics of the topic test, "test: <topic>"),
    columns = experts, cell = loss increase (nats per masked token) when that expert is disabled, written in
    the cell. Diverging colours centred at 0 (red = loss rises, blue = falls), symmetric limits (so vmin <
    0 < vmax even when all values are equal, zero or of one sign); grey = no masked tokens."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure

    from process_exp_results.plots import DPI, save_figure_atomic

    entry = ablation[layer]
    experts = sorted(entry["experts"], key=int)
    groups = list(entry["experts"][experts[0]]) if experts else []
    rows = [(g, [entry["experts"][e][g]["delta"] for e in experts]) for g in groups]
    topic_deltas = entry.get("topic_deltas") or {}
    topics = sorted({t for e in experts for t in topic_deltas.get(e, {})})
    if len(topics) >= 2:
        rows += [(f"test: {t}", [topic_deltas.get(e, {}).get(t) for e in experts]) for t in topics]
    values = np.array([[np.nan if v is None else float(v) for v in r] for _, r in rows], dtype=float)
    values = values.reshape(len(rows), len(experts))
    finite = values[np.isfinite(values)]
    limit = float(np.abs(finite).max()) if finite.size else 0.0
    if not limit > 0:
        limit = 1.0  # all zero (or nothing): any symmetric range keeps vmin < vcenter < vmax
    norm = TwoSlopeNorm(vmin=-limit, vcenter=0.0, vmax=limit)
    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="0.85")

    n_rows, n_cols = max(len(rows), 1), max(len(experts), 1)
    cell_in = 0.62 if n_cols <= 12 else 0.5
    label_in = 0.3 + 0.075 * max([len(r[0]) for r in rows] + [4])
    fig_w = max(6.0, label_in + cell_in * n_cols + 1.8)
    fig_h = 1.5 + 0.42 * n_rows
    fig = Figure(figsize=(fig_w, fig_h), dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((label_in / fig_w, 0.75 / fig_h, cell_in * n_cols / fig_w, 0.42 * n_rows / fig_h))
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    fontsize = 8.0 if n_cols <= 8 else 6.5
    for r in range(len(rows)):
        for c in range(len(experts)):
            value = values[r, c]
            rgba = cmap(norm(value)) if np.isfinite(value) else (0.85, 0.85, 0.85, 1.0)
            dark = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2] < 0.5
            ax.text(c, r, format_number(value, 2, signed=True), ha="center", va="center", fontsize=fontsize,
                    color="white" if dark else "0.1")
    ax.set_xticks(np.arange(len(experts)))
    ax.set_xticklabels(experts, fontsize=9)
    ax.set_xlabel("disabled expert", fontsize=10)
    ax.set_yticks(np.arange(len(rows)))
    ax.set_yticklabels([r[0] for r in rows], fontsize=9)
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    cax = fig.add_axes(((label_in + cell_in * n_cols + 0.2) / fig_w, 0.75 / fig_h, 0.18 / fig_w, 0.42 * n_rows / fig_h))
    bar = fig.colorbar(image, cax=cax)
    bar.set_ticks([-limit, 0.0, limit], labels=[f"{-limit:.2g}", "0", f"{limit:.2g}"])
    bar.ax.tick_params(labelsize=8)
    bar.set_label("loss increase\n(nats / masked token)", fontsize=8.5)
    fig.suptitle(f"Expert ablation, {layer}: MLM loss increase when one expert is disabled",
                 fontsize=11.5, fontweight="bold", x=0.02, ha="left", y=1.0 - 0.12 / fig_h, va="top")
    fig.text(0.02, 1.0 - 0.45 / fig_h, "red = loss rises without the expert, blue = it falls; white = no change",
             fontsize=8.5, color="0.3", ha="left", va="top")
    return save_figure_atomic(fig, path)
