"""Auxiliary router losses. Callers pass real tokens only (padding excluded)."""

import torch


def count_assignments(expert_index: torch.Tensor, n_experts: int) -> torch.Tensor:
    """[E] int64: how many entries of expert_index (values 0..E-1) name each expert.

    torch.bincount would do, but on CUDA it reads the maximum back to the host (a sync per call);
    a scatter-add into E slots stays on the device.
    """
    flat = expert_index.reshape(-1)
    return torch.zeros(n_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def load_balancing_loss(router_probs: torch.Tensor, expert_index: torch.Tensor, n_experts: int,
                        counts: torch.Tensor | None = None) -> torch.Tensor:
    """Switch Transformer loss n_experts * sum_i f_i * P_i; equals 1 for a perfectly uniform router.

    router_probs [N, E]; expert_index [N, k]. f_i = share of the N*k assignments sent to expert i
    (no gradient), P_i = mean router probability of expert i (carries the gradient). counts: the caller's
    count_assignments(expert_index, n_experts), when it has it already.
    """
    n_assignments = max(expert_index.numel(), 1)  # max(): an all-padding batch gives 0, not NaN
    n_tokens = max(router_probs.shape[0], 1)
    counts = count_assignments(expert_index, n_experts) if counts is None else counts
    assignment_fraction = counts.to(router_probs.dtype)
    assignment_fraction = assignment_fraction / n_assignments
    mean_prob = router_probs.sum(dim=0) / n_tokens
    return n_experts * torch.sum(assignment_fraction * mean_prob)


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE z-loss mean(logsumexp(logits)^2): keeps router logits small and the softmax stable."""
    log_z = torch.logsumexp(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    return log_z.pow(2).sum() / max(log_z.numel(), 1)
