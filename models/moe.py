"""Sparse MoE feed-forward: route real tokens, dispatch by sorting on expert id, combine.

Token choice: the N*k (token, expert) assignments are sorted by expert with one stable sort, each
expert runs over its contiguous slice, and outputs go back by the inverse permutation. Both moves are
gathers, forward and backward (`_GatherRows`), never a scatter-add. Expert choice: each expert's
`capacity` tokens are gathered expert by expert and summed back with index_add.
"""

from dataclasses import dataclass

import torch
from torch import nn

from .configuration import MoEEncoderConfig
from .experts import DenseFFN, StackedExperts
from .losses import count_assignments, load_balancing_loss, router_z_loss
from .router import ExpertChoiceRouter, TopKRouter, best_picker, expert_capacity


@dataclass
class MoELayerStats:
    expert_index: torch.Tensor  # [B, T, k] long (expert choice: [B, T, 1]), -1 at padding
    router_probs: torch.Tensor  # [B, T, E], 0 at padding (detached: for analysis)
    load_balance_loss: torch.Tensor  # scalar, over real tokens (0 for expert choice and the dense baseline)
    z_loss: torch.Tensor  # scalar, over real tokens
    dropped_fraction: torch.Tensor  # scalar: share of real-token assignments no expert processed


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


class MoELayer(nn.Module):
    def __init__(self, config: MoEEncoderConfig):
        super().__init__()
        self.n_experts = config.n_experts
        self.top_k = config.top_k_experts
        self.router_type = config.router_type
        self.capacity_factor = config.capacity_factor
        d_model = config.embedding_dim
        if config.is_dense_baseline:  # one plain FFN: no router, no aux loss, no dispatch
            self.dense = DenseFFN(d_model, config.moe_dim, config.expert_type)
            return
        if config.router_type == "expert_choice":
            capacity = 1.0 if config.capacity_factor is None else config.capacity_factor
            self.router = ExpertChoiceRouter(d_model, config.n_experts, config.top_k_experts, capacity,
                                             jitter=config.router_jitter)
        else:
            self.router = TopKRouter(d_model, config.n_experts, config.top_k_experts, config.normalize_top_k,
                                     gate=config.router_gate, jitter=config.router_jitter)
        self.experts = StackedExperts(config.n_experts, d_model, config.moe_dim, config.expert_type,
                                      init_std=config.initializer_range)
        # n shared experts of size h act like one FFN of size n*h (DeepSeekMoE implements them so too).
        self.shared_experts = (
            DenseFFN(d_model, config.n_shared_experts * config.moe_dim, config.expert_type)
            if config.n_shared_experts > 0 else None
        )

    def forward(self, hidden: torch.Tensor, real_token_mask: torch.Tensor) -> tuple[torch.Tensor, MoELayerStats]:
        batch_size, seq_len, d_model = hidden.shape
        if self.n_experts == 1:
            return self._dense_forward(hidden, real_token_mask)
        flat_hidden = hidden.reshape(-1, d_model)
        # Padding is never routed: it would skew expert loads, capacities and the balancing loss.
        # Without padding the selection (and its scatter back) would only copy, so it is skipped.
        all_real = bool(real_token_mask.all())
        real_positions = None if all_real else real_token_mask.reshape(-1).nonzero().squeeze(1)  # [N]
        tokens = flat_hidden if all_real else flat_hidden.index_select(0, real_positions)  # [N, d]

        if self.router_type == "expert_choice":
            combined, expert_index, routing, load_balance, dropped = self._expert_choice(tokens)
        else:
            combined, expert_index, routing, load_balance, dropped = self._token_choice(tokens)
        if self.shared_experts is not None:
            combined = combined + self.shared_experts(tokens)
        if all_real:
            output = combined
        else:
            output = combined.new_zeros(batch_size * seq_len, d_model).index_copy(0, real_positions, combined)

        stats = MoELayerStats(
            expert_index=self._to_grid(expert_index, real_positions, batch_size, seq_len, fill=-1),
            router_probs=self._to_grid(routing.probs.detach(), real_positions, batch_size, seq_len, fill=0),
            load_balance_loss=load_balance,
            z_loss=router_z_loss(routing.logits),
            dropped_fraction=dropped,
        )
        return output.view(batch_size, seq_len, d_model), stats

    def _token_choice(self, tokens: torch.Tensor):
        n_tokens, top_k, n_experts = tokens.shape[0], self.top_k, self.n_experts
        routing = self.router(tokens)
        # Assignments in choice-major order (j = rank * N + token): with a capacity, all first choices
        # are served before any second choice, each in token (position) order, as in GShard and Switch.
        flat_expert = routing.expert_index.t().reshape(-1) if top_k > 1 else routing.expert_index.view(-1)
        order = torch.argsort(flat_expert, stable=True)  # [N*k] assignments grouped by expert
        tokens_per_expert = count_assignments(flat_expert, n_experts)
        n_assignments = flat_expert.numel()
        if self.capacity_factor is not None:
            capacity = expert_capacity(self.capacity_factor, n_tokens, top_k, n_experts)
            starts = torch.cumsum(tokens_per_expert, 0) - tokens_per_expert
            rank_in_expert = torch.arange(n_assignments, device=tokens.device) - starts[flat_expert[order]]
            # Keep each expert's first `capacity` assignments; move the rest to the end, order otherwise kept.
            order = order[torch.argsort((rank_in_expert >= capacity).to(torch.int8), stable=True)]
            expert_counts = tokens_per_expert.clamp(max=capacity).tolist()  # the kept rows' slice needs them here
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

        # Combine: back to assignment order (a permutation: gather both ways), scale by the gates, sum over k.
        per_assignment = _GatherRows.apply(expert_output, inverse, order, 1)
        gate_weights = routing.expert_weights.to(expert_output.dtype)  # [N, k]
        if top_k == 1:
            combined = per_assignment * gate_weights
        else:
            per_assignment = per_assignment.view(top_k, n_tokens, expert_output.shape[-1])
            combined = per_assignment[0] * gate_weights[:, :1]
            for rank in range(1, top_k):
                combined = combined + per_assignment[rank] * gate_weights[:, rank:rank + 1]

        load_balance = load_balancing_loss(routing.probs, routing.expert_index, n_experts, counts=tokens_per_expert)
        dropped = routing.probs.new_full((), n_dropped / max(n_assignments, 1))  # a fill: no host-to-device copy
        return combined, routing.expert_index, routing, load_balance, dropped

    def _expert_choice(self, tokens: torch.Tensor):
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
        was_picked = expert_index[:, 0] >= 0
        # Balanced by construction: the Switch loss would be the constant 1 with zero gradient, so report 0.
        load_balance = routing.probs.new_zeros(())
        dropped = (~was_picked).sum().to(routing.probs.dtype) / max(n_tokens, 1)  # tokens no expert took
        return combined, expert_index, routing, load_balance, dropped

    def _dense_forward(self, hidden: torch.Tensor, real_token_mask: torch.Tensor):
        """n_experts=1: exactly a plain FFN (padding rows are computed too; nothing real depends on them)."""
        output = self.dense(hidden)
        zero = hidden.new_zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32))
        stats = MoELayerStats(
            expert_index=torch.where(real_token_mask, 0, -1)[..., None],
            router_probs=real_token_mask[..., None].to(zero.dtype),
            load_balance_loss=zero,
            z_loss=zero,
            dropped_fraction=zero,
        )
        return output, stats

    @staticmethod
    def _to_grid(values: torch.Tensor, real_positions: torch.Tensor | None, batch_size: int, seq_len: int, fill):
        """[N, c] rows of real tokens -> [B, T, c] with `fill` at padding."""
        if real_positions is None:
            return values.view(batch_size, seq_len, -1)
        grid = values.new_full((batch_size * seq_len, values.shape[-1]), fill)
        return grid.index_copy(0, real_positions, values).view(batch_size, seq_len, -1)
