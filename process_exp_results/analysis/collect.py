"""Routing records for step 4: which expert each real token went to, per MoE layer.

collect_routing runs the encoder over step 2's *unmasked* ids (the analysis asks where real text goes, not where
[MASK] goes) and keeps one row per real token: its document, topic, token id, position and experts per layer, and
the router inputs of a seeded sample of tokens (the references of process_exp_results.analysis.references).
inference.outputs turns the records and their statistics into files.
"""

from __future__ import annotations

import numpy as np
import torch

from models import MoELayer
from process_exp_results.analysis.records import RoutingRecords
from process_exp_results.analysis.routers import RouterSample, SelectionRule
from train.precision import autocast

ROUTING_COLUMNS = ["doc_id", "unmasked_ids", "attention_mask"]


def first_documents(dataset, max_docs: int | None):
    """The first max_docs documents: step 1 writes each split in a seeded random order, so this is a random sample."""
    return dataset if max_docs is None or len(dataset) <= max_docs else dataset.select(range(max_docs))


def topic_names_of(groups: dict) -> list[str]:
    """Topics in order of first appearance: the test split's topics (sorted), then each held-out topic."""
    names: list[str] = []
    for dataset in groups.values():
        names += [topic for topic in sorted(set(dataset["topic"])) if topic not in names]
    return names


def _sample_positions(
    groups: dict, sampled: set[str], max_tokens: int, seed: int, batch_size: int, whole_passes: bool
) -> tuple[np.ndarray, int]:
    """Sorted positions, among the real tokens of the `sampled` groups taken in order, of a seeded uniform sample
    of at most max_tokens; and the number of candidates. whole_passes (expert choice, whose experts compete for
    the tokens of one forward pass): whole forward passes of batch_size documents, drawn at random up to the cap."""
    pass_tokens = []  # real tokens of each forward pass of the sampled groups, in order
    for name, dataset in groups.items():
        if name in sampled:
            per_doc = np.asarray(dataset.with_format("numpy", columns=["attention_mask"])[:]["attention_mask"]).sum(1)
            pass_tokens += [int(per_doc[i : i + batch_size].sum()) for i in range(0, len(per_doc), batch_size)]
    n_real = sum(pass_tokens)
    rng = np.random.default_rng([seed, 7])
    if not whole_passes:
        return np.sort(rng.choice(n_real, size=min(max_tokens, n_real), replace=False)), n_real
    starts, kept, total = np.cumsum([0] + pass_tokens[:-1]), [], 0
    for index in rng.permutation(len(pass_tokens)):
        if total + pass_tokens[index] <= max_tokens:
            kept.append(np.arange(starts[index], starts[index] + pass_tokens[index]))
            total += pass_tokens[index]
    return np.sort(np.concatenate(kept)) if kept else np.zeros(0, np.int64), n_real


class _RouterInputs:
    """Forward hooks that keep each router's input ([real tokens, d]) of the current forward pass."""

    def __init__(self, routers: list[torch.nn.Module]):
        self.current: list[torch.Tensor | None] = [None] * len(routers)
        self.handles = [router.register_forward_hook(self._keep(i)) for i, router in enumerate(routers)]

    def _keep(self, index: int):
        def hook(module, inputs, output):
            self.current[index] = inputs[0].detach()

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class _Collected:
    """What the forward passes gave so far: per real token its columns, and the sampled tokens' router inputs.

    positions: the sampled tokens' positions among the real tokens of the sampled groups (None: keep no inputs).
    """

    COLUMNS = ("doc_id", "topic", "token_id", "position", "experts", "held_out")

    def __init__(self, n_routers: int, positions: np.ndarray | None):
        self.parts: dict[str, list[np.ndarray]] = {key: [] for key in self.COLUMNS}
        self.rows: list[np.ndarray] = []  # sampled tokens' record rows
        self.batch: list[np.ndarray] = []  # and their forward pass
        self.inputs: list[list[np.ndarray]] = [[] for _ in range(n_routers)]
        self.positions = positions
        self.n_rows = self.n_sampled = self.n_batches = 0  # records; real tokens of the sampled groups; passes

    def add_tokens(
        self,
        ids: torch.Tensor,
        real: torch.Tensor,
        experts: torch.Tensor,
        doc_ids: np.ndarray,
        topics: np.ndarray,
        held_out: bool,
    ) -> None:
        """One forward pass's real tokens (row-major: the order of the routers' rows)."""
        real_cpu = real.cpu().numpy()
        doc_rows, positions = np.nonzero(real_cpu)
        self.parts["experts"].append(experts[real].cpu().numpy().astype(np.int64))
        self.parts["token_id"].append(ids[real].cpu().numpy().astype(np.int64))
        self.parts["position"].append(positions.astype(np.int32))
        self.parts["doc_id"].append(np.asarray(doc_ids, dtype=np.int64)[doc_rows])
        self.parts["topic"].append(topics[doc_rows])
        self.parts["held_out"].append(np.full(len(doc_rows), held_out))

    def add_router_inputs(self, current: list[torch.Tensor], n_real: int) -> None:
        """The router inputs of this pass's sampled tokens (current: each router's input of the pass)."""
        start, end = np.searchsorted(self.positions, [self.n_sampled, self.n_sampled + n_real])
        here = self.positions[start:end] - self.n_sampled  # indices into this pass's real tokens
        for kept, inputs in zip(self.inputs, current):
            local = torch.as_tensor(here, dtype=torch.long, device=inputs.device)
            kept.append(inputs.index_select(0, local).float().cpu().numpy())
        self.rows.append(self.n_rows + here)
        self.batch.append(np.full(len(here), self.n_batches))
        self.n_sampled += n_real

    def end_pass(self, n_real: int) -> None:
        self.n_rows += n_real
        self.n_batches += 1

    def records(self, config, topic_names: list[str]) -> RoutingRecords:
        n_layers = len(config.moe_layer_indices)
        k = self.parts["experts"][0].shape[-1] if self.parts["experts"] else config.top_k_experts
        empty = {
            "doc_id": np.zeros(0, np.int64),
            "topic": np.zeros(0, np.int64),
            "token_id": np.zeros(0, np.int64),
            "position": np.zeros(0, np.int32),
            "experts": np.zeros((0, n_layers, k), np.int64),
            "held_out": np.zeros(0, bool),
        }
        columns = {key: np.concatenate(values) if values else empty[key] for key, values in self.parts.items()}
        return RoutingRecords(
            **columns,
            topic_names=topic_names,
            layer_names=[f"block {index}" for index in config.moe_layer_indices],
            n_experts=config.n_experts,
        )

    def router_sample(self, config, routers: list[torch.nn.Module], n_candidates: int, max_tokens: int) -> RouterSample:
        def joined(parts: list[np.ndarray]) -> np.ndarray:
            return np.concatenate(parts) if parts else np.zeros(0, np.int64)

        return RouterSample(
            rows=joined(self.rows),
            batch=joined(self.batch),
            inputs=[
                np.concatenate(kept) if kept else np.zeros((0, config.embedding_dim), np.float32)
                for kept in self.inputs
            ],
            weights=[router.linear.weight.detach().float().cpu().numpy() for router in routers],
            rule=SelectionRule(config.router_type, config.top_k_experts, config.capacity_factor),
            n_candidates=n_candidates,
            max_tokens=max_tokens,
        )


def _routers(model) -> list[torch.nn.Module]:
    return [module.router for module in model.modules() if isinstance(module, MoELayer) and hasattr(module, "router")]


def _expert_indices(output, n_layers: int, ids: torch.Tensor) -> torch.Tensor:
    """[B, T, n_layers, k] experts per token and layer (k = 1 of -1s for a model without MoE layers)."""
    if n_layers:
        return torch.stack(output.expert_indices, dim=2)
    return torch.full((*ids.shape, 0, 1), -1, dtype=torch.long, device=ids.device)


def _route_group(
    model,
    dataset,
    topics: np.ndarray,
    device,
    batch_size: int,
    held_out: bool,
    hooks: _RouterInputs | None,
    collected: _Collected,
    bf16: bool = False,
    progress=None,
) -> None:
    """One group's encoder passes, batch_size documents each, into `collected`: every real token's record, and
    with hooks (a sampled group) the router inputs of its sampled tokens. topics: each document's topic index.
    bf16: the passes under bfloat16 autocast (the router inputs are kept in float32 all the same)."""
    start = 0
    for batch in dataset.with_format("numpy", columns=ROUTING_COLUMNS).iter(batch_size=batch_size):
        ids = torch.as_tensor(batch["unmasked_ids"], dtype=torch.long, device=device)
        real = torch.as_tensor(batch["attention_mask"], device=device).bool()
        with autocast(device, bf16):
            output = model.encoder(input_ids=ids, attention_mask=real)
        experts = _expert_indices(output, len(model.config.moe_layer_indices), ids)
        collected.add_tokens(ids, real, experts, batch["doc_id"], topics[start : start + len(ids)], held_out)
        n_real = int(real.sum())
        if hooks is not None:
            collected.add_router_inputs(hooks.current, n_real)
        collected.end_pass(n_real)
        start += len(ids)
        if progress is not None:
            progress()


@torch.no_grad()
def collect_routing(
    model,
    groups: dict,
    device,
    batch_size: int = 64,
    max_docs_per_group: int | None = 2000,
    held_out_groups: tuple[str, ...] = (),
    max_router_inputs: int = 200_000,
    sample_held_out: bool = False,
    seed: int = 0,
    bf16: bool = False,
    progress=None,
) -> tuple[RoutingRecords, RouterSample | None]:
    """Encoder forward passes (no MLM head: the analysis needs the routing only) over each group's `unmasked_ids`
    with attention_mask, in eval mode, no grad; one record per real token; topic = the document's own `topic`
    column value (so the test split contributes its several topics, and each held-out topic set its own).

    Also keeps the router inputs of a seeded sample of at most max_router_inputs real tokens of the seen groups
    (and of held_out_groups with sample_held_out), for the references: tokens drawn uniformly, or for expert
    choice whole forward passes; None for a model without routers or with max_router_inputs 0.
    """
    groups = {name: first_documents(dataset, max_docs_per_group) for name, dataset in groups.items()}
    topic_names = topic_names_of(groups)
    topic_index = {name: index for index, name in enumerate(topic_names)}
    routers = _routers(model)
    sampled = {name for name in groups if sample_held_out or name not in held_out_groups}
    keep_inputs = bool(routers) and max_router_inputs > 0
    positions, n_candidates = (
        _sample_positions(
            groups, sampled, max_router_inputs, seed, batch_size, model.config.router_type == "expert_choice"
        )
        if keep_inputs
        else (None, 0)
    )
    collected = _Collected(len(routers), positions)
    hooks = _RouterInputs(routers) if keep_inputs else None
    was_training = model.training
    model.eval()
    try:
        for name, dataset in groups.items():
            topics = np.array([topic_index[topic] for topic in dataset["topic"]], dtype=np.int64)
            inputs = hooks if name in sampled else None
            held_out = name in held_out_groups
            _route_group(model, dataset, topics, device, batch_size, held_out, inputs, collected, bf16, progress)
    finally:
        if hooks is not None:
            hooks.remove()
        model.train(was_training)
    records = collected.records(model.config, topic_names)
    if hooks is None:
        return records, None
    return records, collected.router_sample(model.config, routers, n_candidates, max_router_inputs)
