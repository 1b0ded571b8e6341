"""Expert ablation: how much the MLM loss of each group rises when one expert of one MoE layer is switched off.

For every MoE layer L and expert e the evaluation is rerun with e disabled in L only (models/router.py,
``LinearRouter.disabled_experts``): token choice sets e's router logit to -inf before the softmax and the
top-k, so its tokens go to their next choice (and the gate weights are the softmax over the remaining
experts); expert choice keeps every expert's picks but gives e's picks gate weight 0, as if e returned 0.
The masked positions are the dataset's own (``labels != -100``), the same as the plain evaluation
(train/evaluation.py).

Cost. The blocks below L, and block L's attention, do not see the ablation, so each batch is run once with the
plain model, the attention output of every MoE block is cached (forward pre-hooks; the model's own forward, so
embeddings and all stay the model's code), and only block L's feed-forward half, blocks L+1.. + final norm + MLM
head are rerun per ablated expert: ``n_blocks + E * sum_L (n_blocks - L)`` block forwards per batch (one
attention fewer in each) instead of ``n_blocks + E * n_L * n_blocks`` for E x n_L full passes.
``reuse_below=False`` runs the full passes (the reference the fast path is tested against). Both counts and the
wall time are in ``cost``.

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
import functools
import math
import time
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models.losses import count_assignments
from process_exp_results.formatting import format_number
from process_exp_results.resampling import GroupShuffler, bootstrap_weights, p_value, percentile_ci, rng_for
from train.precision import autocast

__all__ = [
    "AblationLosses",
    "GroupLosses",
    "ablation_losses",
    "ablation_statistics",
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
    evaluations: dict = field(default_factory=dict)  # group -> train.evaluation.EvalResult of the plain pass


class _EvalTally:
    """The plain pass's MLM evaluation, summed as train/evaluation.evaluate_mlm sums it (loss, accuracy, masked and
    real tokens, the most frequent label, expert counts over real tokens), so step 4 need not run that pass again."""

    def __init__(self, config, device):
        self.n_experts = config.n_experts
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros((), dtype=torch.long, device=device)
        self.masked = torch.zeros((), dtype=torch.long, device=device)
        self.real = torch.zeros((), dtype=torch.long, device=device)
        self.label_counts = torch.zeros(config.vocab_size, dtype=torch.long, device=device)
        self.expert_counts = torch.zeros(
            len(config.moe_layer_indices), config.n_experts, dtype=torch.long, device=device
        )

    def add(self, output, batch, token_losses: torch.Tensor, targets: torch.Tensor) -> None:
        self.loss_sum += token_losses.sum().double()
        self.correct += (output.logits.argmax(-1) == targets).sum()
        self.masked += targets.numel()
        self.real += batch["attention_mask"].sum()
        self.label_counts += torch.bincount(targets, minlength=self.label_counts.numel())
        for row, expert_index in enumerate(output.expert_indices):  # each token's expert(s); -1 skipped
            self.expert_counts[row] += count_assignments(expert_index, self.n_experts)

    def result(self):
        from train.evaluation import EvalResult

        n_masked = max(int(self.masked), 1)
        return EvalResult(
            mlm_loss=float(self.loss_sum) / n_masked,
            accuracy=int(self.correct) / n_masked,
            masked_tokens=int(self.masked),
            real_tokens=int(self.real),
            expert_counts=self.expert_counts.cpu(),
            majority_accuracy=int(self.label_counts.max()) / n_masked,
        )


def _suffix_token_losses(model, attended, real, start: int, is_masked, targets) -> torch.Tensor:
    """Block start's feed-forward half on its attention output, blocks start+1.. + final norm + MLM head on the
    masked positions: per-token cross-entropy."""
    encoder = _encoder(model)
    x, _ = encoder.blocks[start].feed_forward(attended, real)
    for block in encoder.blocks[start + 1 :]:
        x, _ = block(x, real)
    logits = model.lm_head(encoder.final_norm(x)[is_masked])
    return F.cross_entropy(logits.float(), targets, reduction="none")


def _full_forward(model, batch):
    """The model's own forward on the batch, logits at the masked positions only (as the MLM evaluation)."""
    return model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        labels=batch["labels"],
        masked_logits_only=True,
    )


def _full_token_losses(model, batch, is_masked, targets) -> torch.Tensor:
    return F.cross_entropy(_full_forward(model, batch).logits.float(), targets, reduction="none")


@dataclass
class _TokenParts:
    """One group's per-batch CPU tensors, in batch order, before they are joined into a GroupLosses."""

    doc: list = field(default_factory=list)  # row of each masked token's document
    id: list = field(default_factory=list)  # its true id
    plain: list = field(default_factory=list)
    ablated: list = field(default_factory=list)  # [layer][expert] -> per-batch tensors


class _BlockInputs:
    """Per ablated MoE block, what its feed-forward half reads: the attention's residual output (the input of the
    block's ln2) and the RealTokens; kept by forward pre-hooks on the block and its ln2 (the model's own forward).

    Only the plain pass fills it (``capturing``): the suffix reruns call the same modules. Without ``enabled``
    (reuse_below=False) no hook is registered.
    """

    def __init__(self, encoder, layers: Sequence[int], enabled: bool):
        self.inputs: dict[int, tuple] = {}  # block index -> (attention output, RealTokens)
        self._real: dict[int, object] = {}
        self.capturing = False
        self._hooks = []
        if enabled:
            for block_index in layers:
                block = encoder.blocks[block_index]
                self._hooks.append(block.register_forward_pre_hook(functools.partial(self._keep_real, block_index)))
                self._hooks.append(block.ln2.register_forward_pre_hook(functools.partial(self._keep, block_index)))

    def _keep_real(self, block_index: int, module, args) -> None:
        if self.capturing:
            self._real[block_index] = args[1]

    def _keep(self, block_index: int, module, args) -> None:
        if self.capturing:
            self.inputs[block_index] = (args[0], self._real[block_index])

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self.inputs.clear()
        self._real.clear()
        self.capturing = False


@dataclass
class _AblationRun:
    """What every batch of one ablation_losses call shares, and the batch count and wall times for ``cost``."""

    model: object
    device: torch.device
    layers: list[int]
    n_experts: int
    reuse_below: bool
    block_inputs: _BlockInputs
    bf16: bool = False
    n_batches: int = 0
    plain_seconds: float = 0.0
    ablation_seconds: float = 0.0


def _ablated_layers(model, layers: Sequence[int] | None) -> list[int]:
    """The block indices to ablate (default every MoE layer); fails early on a non-MoE block or the dense baseline."""
    layers = list(model.config.moe_layer_indices if layers is None else layers)
    for block_index in layers:
        _router(model, block_index)
    return layers


def _plain_pass(run: _AblationRun, batch, targets, tally: _EvalTally) -> torch.Tensor:
    """The plain per-token losses (CPU), added to the evaluation tally; fills ``run.block_inputs`` on the way."""
    run.block_inputs.inputs.clear()
    run.block_inputs.capturing = True
    output = _full_forward(run.model, batch)
    run.block_inputs.capturing = False
    losses = F.cross_entropy(output.logits.float(), targets, reduction="none")
    tally.add(output, batch, losses, targets)
    return losses.cpu()


def _ablated_passes(run: _AblationRun, batch, is_masked, targets) -> list[list[torch.Tensor]]:
    """Per-token losses (CPU) with each expert of each layer disabled in turn: [layer][expert] -> [n_masked]."""
    model = run.model
    out = []
    for block_index in run.layers:
        per_expert = []
        for expert in range(run.n_experts):
            with disabled_experts(model, block_index, expert):
                if run.reuse_below:
                    attended, real = run.block_inputs.inputs[block_index]
                    losses = _suffix_token_losses(model, attended, real, block_index, is_masked, targets)
                else:
                    losses = _full_token_losses(model, batch, is_masked, targets)
            per_expert.append(losses.cpu())
        out.append(per_expert)
    return out


def _group_token_parts(
    run: _AblationRun, dataset, name: str, batch_size: int, progress: bool, on_batch=None
) -> tuple[_TokenParts, _EvalTally]:
    """Run one group batch by batch: each masked token's document, id and losses, plain and ablated; and the
    plain pass's evaluation. on_batch: called after every batch (step 4's progress bar)."""
    from tqdm.auto import tqdm

    from train.evaluation import mlm_loader

    parts = _TokenParts(ablated=[[[] for _ in range(run.n_experts)] for _ in run.layers])
    tally = _EvalTally(run.model.config, run.device)
    row0 = 0
    loader = mlm_loader(dataset, batch_size)
    for batch in tqdm(loader, desc=f"ablation {name}", leave=False, disable=not progress):
        batch = {key: value.to(run.device) for key, value in batch.items()}
        labels = batch["labels"]
        is_masked = labels != IGNORE_INDEX
        targets = labels[is_masked]
        rows = is_masked.nonzero()[:, 0]
        started = time.perf_counter()
        with autocast(run.device, run.bf16):
            parts.plain.append(_plain_pass(run, batch, targets, tally))
        run.plain_seconds += time.perf_counter() - started
        started = time.perf_counter()
        with autocast(run.device, run.bf16):
            ablated = _ablated_passes(run, batch, is_masked, targets)
        run.ablation_seconds += time.perf_counter() - started
        for li, per_expert in enumerate(ablated):
            for expert, losses in enumerate(per_expert):
                parts.ablated[li][expert].append(losses)
        parts.doc.append(rows.cpu() + row0)
        parts.id.append(targets.cpu())
        row0 += labels.shape[0]
        run.n_batches += 1
        if on_batch is not None:
            on_batch()
    return parts, tally


def _joined(parts, dtype) -> np.ndarray:
    """Per-batch tensors as one array (empty for a group without batches)."""
    return torch.cat(parts).numpy().astype(dtype) if parts else np.zeros(0, dtype)


def _document_sums(token_doc: np.ndarray, token_losses: np.ndarray, n_docs: int) -> np.ndarray:
    """Per document, the float64 sum of its masked tokens' losses."""
    return np.bincount(token_doc, weights=token_losses.astype(np.float64), minlength=n_docs)


def _group_losses(dataset, parts: _TokenParts, n_layers: int, n_experts: int) -> GroupLosses:
    """The token parts joined, and summed per document (the dataset's rows, in order)."""
    n_docs = len(dataset)
    columns = set(dataset.column_names)
    doc_id = np.asarray(dataset["doc_id"]) if "doc_id" in columns else np.arange(n_docs)
    topic = np.asarray([str(t) for t in dataset["topic"]] if "topic" in columns else [""] * n_docs)
    t_doc, t_id, t_plain = _joined(parts.doc, np.int64), _joined(parts.id, np.int64), _joined(parts.plain, np.float32)
    t_abl = np.zeros((n_layers, n_experts, t_doc.size), np.float32)
    ablated_sum = np.zeros((n_layers, n_experts, n_docs))
    for li in range(n_layers):
        for expert in range(n_experts):
            t_abl[li, expert] = _joined(parts.ablated[li][expert], np.float32)
            ablated_sum[li, expert] = _document_sums(t_doc, t_abl[li, expert], n_docs)
    return GroupLosses(
        doc_id=doc_id,
        topic=topic,
        count=np.bincount(t_doc, minlength=n_docs).astype(np.int64),
        plain_sum=_document_sums(t_doc, t_plain, n_docs),
        ablated_sum=ablated_sum,
        token_doc=t_doc,
        token_id=t_id,
        token_plain=t_plain,
        token_ablated=t_abl,
    )


def _ablation_cost(run: _AblationRun, n_blocks: int) -> dict:
    """Block forwards of this run against the naive plain pass + E x n_layers full passes, and the wall times."""
    layers, n_experts = run.layers, run.n_experts
    suffix_blocks = sum(n_blocks - block_index for block_index in layers)
    per_batch = n_blocks + n_experts * (suffix_blocks if run.reuse_below else len(layers) * n_blocks)
    naive_per_batch = n_blocks + n_experts * len(layers) * n_blocks
    return {
        "reuse_below": bool(run.reuse_below),
        "precision": "bf16" if run.bf16 else "fp32",
        "n_batches": run.n_batches,
        "n_blocks": n_blocks,
        "n_moe_layers": len(layers),
        "n_experts": n_experts,
        "block_forwards": per_batch * run.n_batches,
        "naive_block_forwards": naive_per_batch * run.n_batches,  # plain pass + E x n_layers full passes
        "block_forward_ratio": per_batch / naive_per_batch,
        "plain_seconds": run.plain_seconds,
        "ablation_seconds": run.ablation_seconds,
        "seconds": run.plain_seconds + run.ablation_seconds,
    }


@torch.no_grad()
def ablation_losses(
    model,
    groups: Mapping,
    device,
    batch_size: int,
    *,
    reuse_below: bool = True,
    layers: Sequence[int] | None = None,
    progress: bool = False,
    bf16: bool = False,
    on_batch=None,
) -> AblationLosses:
    """Per document of every group: masked-token loss sums, plain and with each expert of each MoE layer disabled.

    model: MoEEncoderForMaskedLM (put on ``device`` by the caller; run in eval mode, restored after).
    groups: name -> datasets.Dataset with input_ids, attention_mask, labels (-100 = not masked) and optionally
    topic, doc_id (step 2's files). layers: block indices to ablate (default every MoE layer).
    reuse_below: cache each MoE block's input from the plain pass and rerun only the blocks from there
    (False: E full passes per layer, the reference). bf16: bfloat16 autocast (the losses are float32).
    progress: a tqdm bar per group; on_batch: called after every batch. ``evaluations`` holds each group's MLM
    evaluation from the plain pass.
    """
    encoder = _encoder(model)
    layers = _ablated_layers(model, layers)
    n_experts = int(model.config.n_experts)
    was_training = model.training
    model.eval()
    block_inputs = _BlockInputs(encoder, layers, reuse_below)
    run = _AblationRun(model, torch.device(device), layers, n_experts, reuse_below, block_inputs, bf16)
    out: dict[str, GroupLosses] = {}
    evaluations = {}
    try:
        for name, dataset in groups.items():
            parts, tally = _group_token_parts(run, dataset, name, batch_size, progress, on_batch)
            out[name] = _group_losses(dataset, parts, len(layers), n_experts)
            evaluations[name] = tally.result()
    finally:
        run.block_inputs.close()
        model.train(was_training)
    cost = _ablation_cost(run, len(encoder.blocks))
    return AblationLosses(layers=layers, n_experts=n_experts, groups=out, cost=cost, evaluations=evaluations)


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
    token_class: class index per token id (routing_stats.token_classes); None skips the class test.
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


# ----------------------------------------------------------------------------------------------------
# figure
# ----------------------------------------------------------------------------------------------------


def _ablation_table(entry: Mapping) -> tuple[list[str], list[str], np.ndarray]:
    """Experts (columns), row labels (the groups, then "test: <topic>" with two or more topics) and the deltas."""
    experts = sorted(entry["experts"], key=int)
    groups = list(entry["experts"][experts[0]]) if experts else []
    rows = [(g, [entry["experts"][e][g]["delta"] for e in experts]) for g in groups]
    topic_deltas = entry.get("topic_deltas") or {}
    topics = sorted({t for e in experts for t in topic_deltas.get(e, {})})
    if len(topics) >= 2:
        rows += [(f"test: {t}", [topic_deltas.get(e, {}).get(t) for e in experts]) for t in topics]
    values = np.array([[np.nan if v is None else float(v) for v in r] for _, r in rows], dtype=float)
    return experts, [r[0] for r in rows], values.reshape(len(rows), len(experts))


def _symmetric_limit(values: np.ndarray) -> float:
    """The largest |delta|; 1 when all are zero (or none is finite), so that vmin < vcenter < vmax."""
    finite = values[np.isfinite(values)]
    limit = float(np.abs(finite).max()) if finite.size else 0.0
    return limit if limit > 0 else 1.0


def _heatmap_layout(row_labels: Sequence[str], n_experts: int):
    n_rows, n_cols = max(len(row_labels), 1), max(n_experts, 1)
    cell_in = 0.62 if n_cols <= 12 else 0.5
    label_in = 0.3 + 0.075 * max([len(label) for label in row_labels] + [4])
    fig_w = max(6.0, label_in + cell_in * n_cols + 1.8)
    from process_exp_results.plots import HeatmapLayout  # matplotlib only where a figure is drawn

    return HeatmapLayout(fig_w, 1.5 + 0.42 * n_rows, label_in, cell_in, n_rows, n_cols)


def _write_cell_values(ax, values: np.ndarray, cmap, norm, fontsize: float) -> None:
    """Each delta in its cell, white on dark colours."""
    for r in range(values.shape[0]):
        for c in range(values.shape[1]):
            value = values[r, c]
            rgba = cmap(norm(value)) if np.isfinite(value) else (0.85, 0.85, 0.85, 1.0)
            dark = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2] < 0.5
            ax.text(
                c,
                r,
                format_number(value, 2, signed=True),
                ha="center",
                va="center",
                fontsize=fontsize,
                color="white" if dark else "0.1",
            )


def _style_heatmap_axes(ax, experts: Sequence[str], row_labels: Sequence[str]) -> None:
    ax.set_xticks(np.arange(len(experts)))
    ax.set_xticklabels(experts, fontsize=9)
    ax.set_xlabel("disabled expert", fontsize=10)
    ax.set_yticks(np.arange(len(row_labels)))
    ax.set_yticklabels(row_labels, fontsize=9)
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)


def _draw_colorbar(fig, image, rect, limit: float) -> None:
    bar = fig.colorbar(image, cax=fig.add_axes(rect))
    bar.set_ticks([-limit, 0.0, limit], labels=[f"{-limit:.2g}", "0", f"{limit:.2g}"])
    bar.ax.tick_params(labelsize=8)
    bar.set_label("loss increase\n(nats / masked token)", fontsize=8.5)


def plot_ablation(ablation: Mapping, layer: str, path) -> Path:
    """Heatmap for one layer ("block 0"): rows = groups (then the seen topics of the topic test, "test: <topic>"),
    columns = experts, cell = loss increase (nats per masked token) when that expert is disabled, written in
    the cell. Diverging colours centred at 0 (red = loss rises, blue = falls), symmetric limits (so vmin <
    0 < vmax even when all values are equal, zero or of one sign); grey = no masked tokens."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure

    from process_exp_results.plots import DPI, heatmap_titles, save_figure_atomic

    experts, row_labels, values = _ablation_table(ablation[layer])
    limit = _symmetric_limit(values)
    norm = TwoSlopeNorm(vmin=-limit, vcenter=0.0, vmax=limit)
    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="0.85")
    layout = _heatmap_layout(row_labels, len(experts))
    fig = Figure(figsize=(layout.fig_w, layout.fig_h), dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_axes(layout.cells_rect())
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    _write_cell_values(ax, values, cmap, norm, 8.0 if layout.n_cols <= 8 else 6.5)
    _style_heatmap_axes(ax, experts, row_labels)
    _draw_colorbar(fig, image, layout.colour_bar_rect(), limit)
    heatmap_titles(
        fig,
        f"Expert ablation, {layer}: MLM loss increase when one expert is disabled",
        "red = loss rises without the expert, blue = it falls; white = no change",
        layout.fig_h,
    )
    return save_figure_atomic(fig, path)
