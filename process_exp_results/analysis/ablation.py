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
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from models.losses import count_assignments
from train.precision import autocast

IGNORE_INDEX = -100


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
