"""Top-k token router: which experts each token goes to, and with what gate weight."""

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class RouterOutput:
    logits: torch.Tensor  # [N, E]
    probs: torch.Tensor  # [N, E], softmax over all experts, at least float32
    expert_index: torch.Tensor  # [N, k] long, best expert first
    expert_weights: torch.Tensor  # [N, k], gate weight of each chosen expert


class TopKRouter(nn.Module):
    def __init__(self, d_model: int, n_experts: int, top_k: int, normalize_top_k: bool = True):
        super().__init__()
        self.n_experts = n_experts
        self.top_k = top_k
        self.normalize_top_k = normalize_top_k
        self.linear = nn.Linear(d_model, n_experts, bias=False)

    def forward(self, x: torch.Tensor) -> RouterOutput:
        logits = self.linear(x)
        # Softmax over ALL experts (Switch/GShard): even with k=1 the gate weight depends on every
        # logit, so the router gets a gradient. At least float32 because bf16 softmax is too coarse.
        probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
        expert_weights, expert_index = torch.topk(probs, self.top_k, dim=-1)
        if self.top_k >= 2 and self.normalize_top_k:
            expert_weights = expert_weights / expert_weights.sum(dim=-1, keepdim=True)
        return RouterOutput(logits=logits, probs=probs, expert_index=expert_index, expert_weights=expert_weights)
