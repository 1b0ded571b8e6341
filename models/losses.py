"""Auxiliary router losses, each defined once. Callers pass real tokens only (padding excluded).

The Switch balancing loss is written in sums (BalancingSums) so that one function serves a single forward
(the layer's own value) and a global batch over many processes (train/loop.py sums the BalancingSums of
every process first, and each process differentiates its own probability sums).
"""

from dataclasses import dataclass

import torch


def count_assignments(expert_index: torch.Tensor, n_experts: int) -> torch.Tensor:
    """[E] int64: how many entries of expert_index name each expert; entries < 0 (padding, unpicked) are skipped.

    torch.bincount would do, but on CUDA it reads the maximum back to the host (a sync per call), and skipping
    negatives by boolean indexing is another; a weighted scatter-add into E slots stays on the device.
    """
    flat = expert_index.reshape(-1)
    valid = flat >= 0
    counts = torch.zeros(n_experts, dtype=torch.long, device=flat.device)
    return counts.scatter_add_(0, flat.clamp(min=0), valid.long())


@dataclass
class BalancingSums:
    """What the Switch loss needs, as sums over some real tokens: adding two of them adds their tokens."""

    prob_sums: torch.Tensor  # [E], sum of router probabilities over the tokens (carries the gradient)
    counts: torch.Tensor  # [E] long, (token, expert) assignments per expert (no gradient)
    n_tokens: torch.Tensor  # scalar
    n_assignments: torch.Tensor  # scalar: n_tokens * k

    @classmethod
    def of(cls, router_probs: torch.Tensor, counts: torch.Tensor, n_assignments: int) -> "BalancingSums":
        device = router_probs.device
        return cls(
            prob_sums=router_probs.sum(dim=0),
            counts=counts,
            n_tokens=torch.full((), router_probs.shape[0], dtype=torch.long, device=device),
            n_assignments=torch.full((), n_assignments, dtype=torch.long, device=device),
        )


def switch_balancing_loss(sums: BalancingSums, n_experts: int) -> torch.Tensor:
    """Switch Transformer loss n_experts * sum_i f_i * P_i; equals 1 for a perfectly uniform router.

    f_i = share of the assignments sent to expert i (no gradient), P_i = mean router probability of expert i
    (carries the gradient). Leading dimensions of the sums (e.g. one row per layer) are kept.
    """
    dtype = sums.prob_sums.dtype
    assignment_fraction = sums.counts.to(dtype) / sums.n_assignments.clamp(min=1).to(dtype)[..., None]
    mean_prob = sums.prob_sums / sums.n_tokens.clamp(min=1).to(dtype)[..., None]  # clamp: all-padding gives 0
    return n_experts * (assignment_fraction * mean_prob).sum(-1)


def load_balancing_loss(router_probs: torch.Tensor, expert_index: torch.Tensor, n_experts: int) -> torch.Tensor:
    """The Switch loss of router_probs [N, E] and expert_index [N, k] (the k experts each token was sent to)."""
    counts = count_assignments(expert_index, n_experts)
    return switch_balancing_loss(BalancingSums.of(router_probs, counts, expert_index.numel()), n_experts)


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE z-loss mean(logsumexp(logits)^2): keeps router logits small and the softmax stable."""
    log_z = torch.logsumexp(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    return log_z.pow(2).sum() / max(log_z.numel(), 1)
