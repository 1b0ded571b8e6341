"""Expert MLPs stored as stacked weight tensors, applied to tokens already sorted by expert."""

import torch
import torch.nn.functional as F
from torch import nn


class StackedExperts(nn.Module):
    """E independent GELU MLPs d -> h -> d; weight e lives at index e of each stacked tensor."""

    def __init__(self, n_experts: int, d_model: int, hidden_dim: int, init_std: float = 0.02):
        super().__init__()
        self.n_experts = n_experts
        self.init_std = init_std
        self.w_in = nn.Parameter(torch.empty(n_experts, d_model, hidden_dim))
        self.b_in = nn.Parameter(torch.empty(n_experts, hidden_dim))
        self.w_out = nn.Parameter(torch.empty(n_experts, hidden_dim, d_model))
        self.b_out = nn.Parameter(torch.empty(n_experts, d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Same scheme as the model's Linear layers (normal std, zero bias).
        nn.init.normal_(self.w_in, std=self.init_std)
        nn.init.normal_(self.w_out, std=self.init_std)
        nn.init.zeros_(self.b_in)
        nn.init.zeros_(self.b_out)

    def forward(self, x_sorted: torch.Tensor, tokens_per_expert: torch.Tensor | list[int]) -> torch.Tensor:
        """x_sorted [M, d], rows grouped by expert in order 0..E-1; tokens_per_expert [E] counts."""
        counts = tokens_per_expert.tolist() if torch.is_tensor(tokens_per_expert) else list(tokens_per_expert)
        outputs = []
        # One matmul pair per expert over its contiguous slice; empty slices still run so every
        # expert's weights stay in the autograd graph (DDP wants no unused parameters).
        for e, x_e in enumerate(torch.split(x_sorted, counts, dim=0)):
            hidden = F.gelu(x_e @ self.w_in[e] + self.b_in[e])
            outputs.append(hidden @ self.w_out[e] + self.b_out[e])
        return torch.cat(outputs, dim=0)
