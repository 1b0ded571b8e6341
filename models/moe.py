"""Sparse MoE feed-forward layers, one class per kind, all with the contract forward -> (output, MoELayerStats).

TokenChoiceLayer: the N*k (token, expert) assignments are sorted by expert with one stable sort, each expert
runs over its contiguous slice, and outputs go back by the inverse permutation. Both moves are gathers, forward
and backward (`_GatherRows`), never a scatter-add. ExpertChoiceLayer: each expert's `capacity` tokens are
gathered expert by expert and summed back with index_add. DenseBaselineLayer: n_experts=1, one plain FFN.
`MoELayer(config)` builds the kind the config names (as pathlib.Path builds a PosixPath).

Host syncs: a batch with padding costs one `nonzero()` per forward (RealTokens.of, shared by all layers); the
capacity path reads its per-expert counts back (`.tolist()`). The dropless token-choice path on CUDA waits on the
host nowhere else: counts are scatter-adds and the experts take them on the device (grouped_mm).
"""

from dataclasses import dataclass

import torch
from torch import nn

from .configuration import MoEEncoderConfig
from .experts import DenseFFN, StackedExperts
from .losses import BalancingSums, count_assignments, router_z_loss, switch_balancing_loss
from .router import ExpertChoiceRouter, TopKRouter, best_picker, expert_capacity


@dataclass
class RealTokens:
    """Which positions of a [B, T] batch are real tokens: `positions` [N] into the flattened batch, or None when
    every position is real (then selecting and scattering back would only copy, so it is skipped)."""

    mask: torch.Tensor  # [B, T] bool
    positions: torch.Tensor | None

    @classmethod
    def of(cls, real_token_mask: torch.Tensor) -> "RealTokens":
        # nonzero syncs with the host once; whether anything was padding follows from its shape, for free
        positions = real_token_mask.reshape(-1).nonzero().squeeze(1)
        return cls(real_token_mask, None if positions.numel() == real_token_mask.numel() else positions)


@dataclass
class MoELayerStats:
    expert_index: torch.Tensor  # [B, T, k] long (expert choice: [B, T, 1], the best picker), -1 at padding/unpicked
    router_probs: torch.Tensor  # [B, T, E], 0 at padding (detached: for analysis)
    load_balance_loss: torch.Tensor  # scalar, this forward's Switch loss (0 for expert choice and the dense baseline)
    z_loss: torch.Tensor  # scalar, mean over real tokens
    dropped_fraction: torch.Tensor  # scalar: share of real-token assignments no expert processed
    real_tokens: torch.Tensor  # scalar long: tokens routed (padding excluded); the weight of the two means above
    balancing: BalancingSums | None = None  # what the global balancing loss needs; None where there is none
    router_input: torch.Tensor | None = None  # [N, d] what the router saw (the router-supervision control uses it)


class _GatherRows(torch.autograd.Function):
    """out = x[index], where index is a permutation of `repeats` copies of x's rows.

    The backward gathers by the inverse permutation and sums each row's copies, instead of autograd's
    scatter-add (index_add), which is slower and serializes on repeated indices.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor, repeats: int) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        ctx.repeats, ctx.n_rows = repeats, x.shape[0]
        return x.index_select(0, index)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        grad_x = grad.index_select(0, inverse)
        if ctx.repeats > 1:  # row j of the copies is copy j // n_rows of row j % n_rows
            grad_x = grad_x.view(ctx.repeats, ctx.n_rows, grad_x.shape[-1]).sum(0)
        return grad_x, None, None, None


def _to_grid(values: torch.Tensor, real: RealTokens, fill) -> torch.Tensor:
    """[N, c] rows of real tokens -> [B, T, c] with `fill` at padding."""
    batch_size, seq_len = real.mask.shape
    if real.positions is None:
        return values.view(batch_size, seq_len, -1)
    grid = values.new_full((batch_size * seq_len, values.shape[-1]), fill)
    return grid.index_copy(0, real.positions, values).view(batch_size, seq_len, -1)


@dataclass
class _Routed:
    """What a routed layer's kind computes on the N real tokens."""

    combined: torch.Tensor  # [N, d]
    expert_index: torch.Tensor  # [N, k]
    probs: torch.Tensor  # [N, E], with gradients
    logits: torch.Tensor  # [N, E]
    dropped_fraction: torch.Tensor  # scalar
    balancing: BalancingSums | None


class MoELayer(nn.Module):
    """The base of the three kinds (forward(hidden, real) -> (output, MoELayerStats)); `MoELayer(config)` returns
    the kind the config names."""

    def __new__(cls, config: MoEEncoderConfig | None = None, *args, **kwargs):
        if cls is MoELayer and config is not None:
            cls = layer_kind(config)
        return super().__new__(cls)

    def __init__(self, config: MoEEncoderConfig):
        super().__init__()
        self.n_experts = config.n_experts


class RoutedLayer(MoELayer):
    """Token choice and expert choice: they implement `route(tokens) -> _Routed`; this forward selects the real
    tokens (padding is never routed: it would skew loads, capacities and the balancing loss), adds the shared
    experts and scatters back."""

    def __init__(self, config: MoEEncoderConfig):
        super().__init__(config)
        self.top_k = config.top_k_experts
        self.capacity_factor = config.capacity_factor
        d_model = config.embedding_dim
        self.experts = StackedExperts(
            config.n_experts, d_model, config.moe_dim, config.expert_type, init_std=config.initializer_range
        )
        # n shared experts of size h act like one FFN of size n*h (DeepSeekMoE implements them so too).
        self.shared_experts = (
            DenseFFN(d_model, config.n_shared_experts * config.moe_dim, config.expert_type)
            if config.n_shared_experts > 0
            else None
        )

    def forward(self, hidden: torch.Tensor, real: RealTokens | torch.Tensor) -> tuple[torch.Tensor, MoELayerStats]:
        real = real if isinstance(real, RealTokens) else RealTokens.of(real)
        batch_size, seq_len, d_model = hidden.shape
        flat_hidden = hidden.reshape(-1, d_model)
        tokens = flat_hidden if real.positions is None else flat_hidden.index_select(0, real.positions)  # [N, d]
        routed = self.route(tokens)
        combined = routed.combined
        if self.shared_experts is not None:
            combined = combined + self.shared_experts(tokens)
        if real.positions is None:
            output = combined
        else:
            output = combined.new_zeros(batch_size * seq_len, d_model).index_copy(0, real.positions, combined)
        stats = MoELayerStats(
            expert_index=_to_grid(routed.expert_index, real, fill=-1),
            router_probs=_to_grid(routed.probs.detach(), real, fill=0),
            load_balance_loss=(
                routed.probs.new_zeros(())
                if routed.balancing is None
                else switch_balancing_loss(routed.balancing, self.n_experts)
            ),
            z_loss=router_z_loss(routed.logits),
            dropped_fraction=routed.dropped_fraction,
            real_tokens=torch.full((), tokens.shape[0], dtype=torch.long, device=tokens.device),
            balancing=routed.balancing,
            router_input=tokens,
        )
        return output.view(batch_size, seq_len, d_model), stats

    def route(self, tokens: torch.Tensor) -> _Routed:
        raise NotImplementedError


class TokenChoiceLayer(RoutedLayer):
    """Each token picks its k best experts (TopKRouter); dropless unless capacity_factor is set."""

    def __init__(self, config: MoEEncoderConfig):
        super().__init__(config)
        self.router = TopKRouter(
            config.embedding_dim,
            config.n_experts,
            config.top_k_experts,
            config.normalize_top_k,
            gate=config.router_gate,
            jitter=config.router_jitter,
        )

    def route(self, tokens: torch.Tensor) -> _Routed:
        n_tokens, top_k, n_experts = tokens.shape[0], self.top_k, self.n_experts
        routing = self.router(tokens)
        # Assignments in choice-major order (j = rank * N + token): with a capacity, all first choices
        # are served before any second choice, each in token (position) order, as in GShard and Switch.
        flat_expert = routing.expert_index.t().reshape(-1) if top_k > 1 else routing.expert_index.view(-1)
        order = torch.argsort(flat_expert, stable=True)  # [N*k] assignments grouped by expert
        tokens_per_expert = count_assignments(flat_expert, n_experts)
        n_assignments = flat_expert.numel()
        if self.capacity_factor is not None:
            order, expert_counts = self._apply_capacity(order, flat_expert, tokens_per_expert, n_tokens)
            n_kept = sum(expert_counts)
        else:  # every assignment is kept: the counts stay on the device (no host sync on a GPU)
            expert_counts, n_kept = tokens_per_expert, n_assignments
        n_dropped = n_assignments - n_kept

        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(n_assignments, device=order.device)
        token_of_sorted = order % n_tokens if top_k > 1 else order
        x_sorted = _GatherRows.apply(tokens, token_of_sorted, inverse, top_k)
        expert_output = self.experts(x_sorted[:n_kept] if n_dropped else x_sorted, expert_counts)
        if n_dropped:  # a dropped assignment contributes 0; a token dropped by all its experts is 0 here
            expert_output = torch.cat([expert_output, expert_output.new_zeros(n_dropped, expert_output.shape[1])])
        per_assignment = _GatherRows.apply(expert_output, inverse, order, 1)  # back to assignment order
        return _Routed(
            combined=self._combine(per_assignment, routing.expert_weights.to(expert_output.dtype), n_tokens),
            expert_index=routing.expert_index,
            probs=routing.probs,
            logits=routing.logits,
            dropped_fraction=routing.probs.new_full((), n_dropped / max(n_assignments, 1)),  # a fill: no copy
            balancing=BalancingSums.of(routing.probs, tokens_per_expert, n_assignments),
        )

    def _apply_capacity(self, order, flat_expert, tokens_per_expert, n_tokens):
        """Keep each expert's first `capacity` assignments; move the rest to the end, order otherwise kept."""
        capacity = expert_capacity(self.capacity_factor, n_tokens, self.top_k, self.n_experts)
        starts = torch.cumsum(tokens_per_expert, 0) - tokens_per_expert
        rank_in_expert = torch.arange(order.numel(), device=order.device) - starts[flat_expert[order]]
        order = order[torch.argsort((rank_in_expert >= capacity).to(torch.int8), stable=True)]
        return order, tokens_per_expert.clamp(max=capacity).tolist()  # the kept rows' slice needs them here

    def _combine(self, per_assignment: torch.Tensor, gate_weights: torch.Tensor, n_tokens: int) -> torch.Tensor:
        """Scale each assignment's output by its gate and sum over the k choices: [N*k, d] -> [N, d]."""
        if self.top_k == 1:
            return per_assignment * gate_weights
        per_assignment = per_assignment.view(self.top_k, n_tokens, per_assignment.shape[-1])
        combined = per_assignment[0] * gate_weights[:, :1]
        for rank in range(1, self.top_k):
            combined = combined + per_assignment[rank] * gate_weights[:, rank : rank + 1]
        return combined


class ExpertChoiceLayer(RoutedLayer):
    """Each expert picks its `capacity` tokens (ExpertChoiceRouter); balanced by construction."""

    def __init__(self, config: MoEEncoderConfig):
        super().__init__(config)
        capacity = 1.0 if config.capacity_factor is None else config.capacity_factor
        self.router = ExpertChoiceRouter(
            config.embedding_dim, config.n_experts, config.top_k_experts, capacity, jitter=config.router_jitter
        )

    def route(self, tokens: torch.Tensor) -> _Routed:
        n_tokens = tokens.shape[0]
        routing = self.router(tokens)
        n_experts, capacity = routing.token_index.shape
        chosen_tokens = routing.token_index.reshape(-1)  # [E*C], expert by expert
        expert_output = self.experts(tokens.index_select(0, chosen_tokens), [capacity] * n_experts)
        gate_weights = routing.token_weights.reshape(-1, 1).to(expert_output.dtype)
        combined = expert_output.new_zeros(n_tokens, expert_output.shape[1]).index_add(
            0, chosen_tokens, expert_output * gate_weights
        )
        # For the analysis: per token the expert with the highest gate among those that picked it, -1 if none.
        expert_index = best_picker(routing.probs.detach(), routing.token_index)[:, None]
        not_picked = (expert_index[:, 0] < 0).sum().to(routing.probs.dtype)
        # The Switch loss would be the constant 1 with zero gradient here, so there is none (balancing=None).
        return _Routed(
            combined=combined,
            expert_index=expert_index,
            probs=routing.probs,
            logits=routing.logits,
            dropped_fraction=not_picked / max(n_tokens, 1),
            balancing=None,
        )


class DenseBaselineLayer(MoELayer):
    """n_experts=1: exactly a plain FFN (padding rows are computed too; nothing real depends on them)."""

    def __init__(self, config: MoEEncoderConfig):
        super().__init__(config)  # no router, experts or dispatch
        self.dense = DenseFFN(config.embedding_dim, config.moe_dim, config.expert_type)

    def forward(self, hidden: torch.Tensor, real: RealTokens | torch.Tensor) -> tuple[torch.Tensor, MoELayerStats]:
        mask = real.mask if isinstance(real, RealTokens) else real
        output = self.dense(hidden)
        zero = hidden.new_zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32))
        stats = MoELayerStats(
            expert_index=torch.where(mask, 0, -1)[..., None],
            router_probs=mask[..., None].to(zero.dtype),
            load_balance_loss=zero,
            z_loss=zero,
            dropped_fraction=zero,
            real_tokens=mask.sum(),
        )
        return output, stats


def layer_kind(config: MoEEncoderConfig) -> type[MoELayer]:
    """The layer class a config names, chosen once."""
    if config.is_dense_baseline:
        return DenseBaselineLayer
    return ExpertChoiceLayer if config.router_type == "expert_choice" else TokenChoiceLayer
