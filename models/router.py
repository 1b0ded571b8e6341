"""Routers: which experts process each token, and with what gate weight.

Routing math runs in at least float32 (bf16 softmax/top-k is too coarse); experts compute in the input dtype.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def _routing_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


class LinearRouter(nn.Module):
    """Router logits = x @ W, with Switch's multiplicative jitter on the router input in training.

    disabled_experts: for the expert ablation only (process_exp_results/analysis/ablation.py), a [E] bool tensor,
    True = switched off (token choice: logit -inf, so its tokens go to their next choice; expert choice: its
    tokens get gate weight 0, the other experts' choices unchanged). A plain attribute, not a buffer: never
    saved or exported. None (the default) leaves routing untouched.
    """

    disabled_experts: torch.Tensor | None = None

    def __init__(self, d_model: int, n_experts: int, jitter: float = 0.0):
        super().__init__()
        self.n_experts = n_experts
        self.jitter = jitter
        self.linear = nn.Linear(d_model, n_experts, bias=False)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _routing_dtype(x.dtype)
        # In float32 even under autocast or in a bf16 model: routing is cheap and bf16 logits tie and flip.
        with torch.autocast(x.device.type, enabled=False):
            x = x.to(dtype)
            if self.training and self.jitter > 0:
                # Only the router sees the noise; the experts get the clean tokens. Global RNG, so seeded.
                x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            return F.linear(x, self.linear.weight.to(dtype))


@dataclass
class RouterOutput:
    logits: torch.Tensor  # [N, E], at least float32
    probs: torch.Tensor  # [N, E], softmax over all experts
    expert_index: torch.Tensor  # [N, k] long, best expert first
    expert_weights: torch.Tensor  # [N, k], gate weight of each chosen expert


class TopKRouter(LinearRouter):
    """Token choice: each token picks its k best experts.

    gate "switch" (Switch/GShard): weights = softmax over ALL experts, then the top k, renormalized to
    sum 1 when normalize_top_k and k >= 2. Even with k=1 the weight depends on every logit, so the
    router gets a gradient. gate "mixtral": softmax over the k chosen logits only (k >= 2; for k=1 it
    is the constant 1). It equals "switch" with normalize_top_k in value and gradient.
    """

    def __init__(
        self,
        d_model: int,
        n_experts: int,
        top_k: int,
        normalize_top_k: bool = True,
        gate: str = "switch",
        jitter: float = 0.0,
    ):
        super().__init__(d_model, n_experts, jitter)
        self.top_k = top_k
        self.normalize_top_k = normalize_top_k
        self.gate = gate

    def forward(self, x: torch.Tensor) -> RouterOutput:
        logits = self.logits(x)
        if self.disabled_experts is not None:
            logits = logits.masked_fill(self.disabled_experts.to(logits.device), float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if self.gate == "mixtral":
            top_logits, expert_index = torch.topk(logits, self.top_k, dim=-1)
            expert_weights = torch.softmax(top_logits, dim=-1)
        else:
            expert_weights, expert_index = torch.topk(probs, self.top_k, dim=-1)
            if self.top_k >= 2 and self.normalize_top_k:
                expert_weights = expert_weights / expert_weights.sum(dim=-1, keepdim=True)
        return RouterOutput(logits=logits, probs=probs, expert_index=expert_index, expert_weights=expert_weights)


def expert_capacity(capacity_factor: float, n_tokens: int, top_k: int, n_experts: int) -> int:
    """ceil(capacity_factor * tokens * k / E) (Switch/GShard; Expert Choice), at most n_tokens."""
    return min(math.ceil(capacity_factor * n_tokens * top_k / n_experts), n_tokens)


def best_picker(probs: torch.Tensor, token_index: torch.Tensor) -> torch.Tensor:
    """Expert choice, per token: the expert with the highest gate among those that picked it, -1 if none did.

    probs [..., N, E]; token_index [..., E, C] (the tokens each expert picked). Returns [..., N] long.
    """
    n_tokens, n_experts = probs.shape[-2:]
    picked = torch.zeros(*probs.shape[:-2], n_experts, n_tokens, dtype=torch.bool, device=probs.device)
    picked = picked.scatter_(-1, token_index, True).transpose(-1, -2)  # [..., N, E]
    best = probs.masked_fill(~picked, -1.0).argmax(dim=-1)
    return torch.where(picked.any(dim=-1), best, -1)


@dataclass
class ExpertChoiceOutput:
    logits: torch.Tensor  # [N, E], at least float32
    probs: torch.Tensor  # [N, E], softmax over experts per token
    token_index: torch.Tensor  # [E, C] long, the tokens each expert picked, best first
    token_weights: torch.Tensor  # [E, C], their router probabilities (the gate weights)


class ExpertChoiceRouter(LinearRouter):
    """Expert choice (Zhou et al. 2022): each expert takes its `capacity` tokens with the highest router
    probability among the batch's real tokens. Loads are balanced by construction; a token can be
    picked by 0..E experts. capacity = ceil(capacity_factor * N * k / E), so k is the average experts per token.
    """

    def __init__(self, d_model: int, n_experts: int, top_k: int, capacity_factor: float = 1.0, jitter: float = 0.0):
        super().__init__(d_model, n_experts, jitter)
        self.top_k = top_k
        self.capacity_factor = capacity_factor

    def forward(self, x: torch.Tensor) -> ExpertChoiceOutput:
        logits = self.logits(x)
        probs = torch.softmax(logits, dim=-1)
        capacity = expert_capacity(self.capacity_factor, x.shape[0], self.top_k, self.n_experts)
        token_weights, token_index = torch.topk(probs.t(), capacity, dim=-1)
        if self.disabled_experts is not None:  # its picks count for nothing: as if it output 0
            token_weights = token_weights.masked_fill(self.disabled_experts.to(logits.device)[:, None], 0.0)
        return ExpertChoiceOutput(logits=logits, probs=probs, token_index=token_index, token_weights=token_weights)
