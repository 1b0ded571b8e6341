"""Sparse MoE feed-forward: route real tokens, dispatch by sorting on expert id, combine."""

from dataclasses import dataclass

import torch
from torch import nn

from .configuration import MoEEncoderConfig
from .experts import StackedExperts
from .losses import load_balancing_loss, router_z_loss
from .router import TopKRouter


@dataclass
class MoELayerStats:
    expert_index: torch.Tensor  # [B, T, k] long, -1 at padding
    router_probs: torch.Tensor  # [B, T, E], 0 at padding (detached: for analysis)
    load_balance_loss: torch.Tensor  # scalar, over real tokens
    z_loss: torch.Tensor  # scalar, over real tokens


class MoELayer(nn.Module):
    def __init__(self, config: MoEEncoderConfig):
        super().__init__()
        self.n_experts = config.n_experts
        self.top_k = config.top_k_experts
        self.router = TopKRouter(config.embedding_dim, config.n_experts, config.top_k_experts, config.normalize_top_k)
        self.experts = StackedExperts(
            config.n_experts, config.embedding_dim, config.moe_dim, init_std=config.initializer_range
        )

    def forward(self, hidden: torch.Tensor, real_token_mask: torch.Tensor) -> tuple[torch.Tensor, MoELayerStats]:
        batch_size, seq_len, d_model = hidden.shape
        # Padding is never routed: it would skew expert loads and the load-balancing loss.
        real_positions = real_token_mask.reshape(-1).nonzero().squeeze(1)  # [N] flat indices into B*T
        tokens = hidden.reshape(-1, d_model).index_select(0, real_positions)  # [N, d]
        routing = self.router(tokens)

        # Dispatch: group the N*k (token, expert) assignments by expert with one stable sort.
        flat_expert_index = routing.expert_index.reshape(-1)  # [N*k], assignment j belongs to token j // k
        sort_order = torch.argsort(flat_expert_index, stable=True)
        token_of_assignment = sort_order // self.top_k
        tokens_per_expert = torch.bincount(flat_expert_index, minlength=self.n_experts)
        expert_output = self.experts(tokens.index_select(0, token_of_assignment), tokens_per_expert)

        # Combine: scale by gate weights and sum each token's k expert outputs back into place.
        gate_weights = routing.expert_weights.reshape(-1).index_select(0, sort_order).to(expert_output.dtype)
        combined = torch.zeros_like(tokens).index_add_(0, token_of_assignment, expert_output * gate_weights[:, None])
        output = hidden.new_zeros(batch_size * seq_len, d_model).index_copy(0, real_positions, combined)

        stats = MoELayerStats(
            expert_index=self._scatter_to_grid(routing.expert_index, real_positions, batch_size, seq_len, fill=-1),
            router_probs=self._scatter_to_grid(routing.probs.detach(), real_positions, batch_size, seq_len, fill=0),
            load_balance_loss=load_balancing_loss(routing.probs, routing.expert_index, self.n_experts),
            z_loss=router_z_loss(routing.logits),
        )
        return output.view(batch_size, seq_len, d_model), stats

    @staticmethod
    def _scatter_to_grid(values: torch.Tensor, real_positions: torch.Tensor, batch_size: int, seq_len: int, fill):
        """[N, c] rows of real tokens -> [B, T, c] with `fill` at padding."""
        grid = values.new_full((batch_size * seq_len, values.shape[-1]), fill)
        return grid.index_copy(0, real_positions, values).view(batch_size, seq_len, -1)
