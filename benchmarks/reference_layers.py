"""Plain reference layers the MoE benchmarks compare `models.MoELayer` against, and the weight copy between them.

  SwiGLUFFN, GeluFFN  one expert, written out with nn.Linear (SwiGLU as in Mixtral; GELU as our "mlp" type)
  DenseFloor          one SwiGLU FFN of one expert's size on every token: the floor a sparse layer is held to
  SeedLoopMoE         the earlier study's layer: a Python loop over experts with torch.where masks, no sorting
  HFMixtralMoE        transformers' MixtralSparseMoeBlock behind MoELayer's call signature

All take (hidden [B, T, d], real_token_mask [B, T]) as MoELayer does. `copy_seed_into_ours` loads a SeedLoopMoE's
weights into a MoELayer, so tests can check the fast path against the loop on the same function.
"""

import torch
import torch.nn.functional as F
from torch import nn

INIT_STD = 0.02


class SwiGLUFFN(nn.Module):
    """silu(x W1) * (x W3) W2, no bias: one expert (and the dense floor)."""

    def __init__(self, d_model: int, d_hidden: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, d_hidden, bias=False)  # gate
        self.w3 = nn.Linear(d_model, d_hidden, bias=False)  # up
        self.w2 = nn.Linear(d_hidden, d_model, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class GeluFFN(nn.Module):
    """gelu(x W_in + b_in) W_out + b_out: the project's "mlp" expert type."""

    def __init__(self, d_model: int, d_hidden: int):
        super().__init__()
        self.fc_in = nn.Linear(d_model, d_hidden)
        self.fc_out = nn.Linear(d_hidden, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(F.gelu(self.fc_in(x)))


EXPERT_CLASSES = {"swiglu": SwiGLUFFN, "mlp": GeluFFN}


class DenseFloor(nn.Module):
    """The floor: one SwiGLU FFN of one expert's size on every token (not models.experts.DenseFFN: a reference)."""

    def __init__(self, d_model: int, d_expert: int):
        super().__init__()
        self.ffn = SwiGLUFFN(d_model, d_expert)

    def forward(self, hidden: torch.Tensor, real_token_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.ffn(hidden)


class SeedLoopMoE(nn.Module):
    """The study's layer: router -> softmax -> top-k, then for each expert a torch.where mask, gather, run, add.

    No sorting: every expert does its own boolean-mask search over all N*k assignments.
    """

    def __init__(
        self,
        d_model: int,
        d_expert: int,
        n_experts: int,
        top_k: int,
        expert_type: str = "swiglu",
        normalize_top_k: bool = True,
    ):
        super().__init__()
        self.n_experts, self.top_k, self.normalize_top_k = n_experts, top_k, normalize_top_k
        self.expert_type = expert_type
        self.router = nn.Linear(d_model, n_experts, bias=False)
        self.experts = nn.ModuleList(EXPERT_CLASSES[expert_type](d_model, d_expert) for _ in range(n_experts))

    def forward(self, hidden: torch.Tensor, real_token_mask: torch.Tensor) -> torch.Tensor:
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])
        probs = torch.softmax(self.router(x).float(), dim=-1)
        weights, indices = torch.topk(probs, self.top_k, dim=-1)  # [N, k]
        if self.top_k >= 2 and self.normalize_top_k:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        indices = torch.where(real_token_mask.reshape(-1, 1), indices, -1)  # padding goes to no expert
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token_idx, slot = torch.where(indices == e)
            if token_idx.numel() == 0:
                continue
            y = expert(x[token_idx]) * weights[token_idx, slot].unsqueeze(-1).to(x.dtype)
            out = out.index_add(0, token_idx, y)
        return out.view(shape)


class HFMixtralMoE(nn.Module):
    """transformers' MixtralSparseMoeBlock (router inside the block) behind MoELayer's call signature."""

    def __init__(self, d_model: int, d_expert: int, n_experts: int, top_k: int, experts_implementation: str):
        super().__init__()
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

        config = MixtralConfig(
            hidden_size=d_model,
            intermediate_size=d_expert,
            num_local_experts=n_experts,
            num_experts_per_tok=top_k,
            hidden_act="silu",
            router_jitter_noise=0.0,
            experts_implementation=experts_implementation,
        )
        if config._experts_implementation != experts_implementation:
            raise RuntimeError(f"config kept experts_implementation={config._experts_implementation!r}")
        self.block = MixtralSparseMoeBlock(config)
        for p in self.block.parameters():  # the block allocates with torch.empty
            nn.init.normal_(p, std=INIT_STD)

    def forward(self, hidden: torch.Tensor, real_token_mask: torch.Tensor | None = None) -> torch.Tensor:
        out = self.block(hidden)
        return out[0] if isinstance(out, tuple) else out


def _as_x_at_w(linears) -> torch.Tensor:
    """nn.Linear weights [out, in] of each expert, stacked as x @ W wants them: [E, in, out]."""
    return torch.stack([linear.weight.t() for linear in linears])


def copy_seed_into_ours(seed: SeedLoopMoE, layer: nn.Module) -> None:
    """Load the seed layer's router and expert weights into a MoELayer, so both compute the same function.

    MoELayer's layout (models/experts.py StackedExperts) computes x @ W: w_in [E, d, h] ("mlp") or [E, d, 2h]
    ("swiglu": gate columns :h, up h:), w_out [E, h, d], biases b_in [E, h] and b_out [E, d] ("mlp" only);
    nn.Linear stores [out, in], hence the transposes. The router is layer.router.linear ([E, d]).
    """
    experts = layer.experts
    if experts.expert_type != seed.expert_type:
        raise ValueError(f"the layer has {experts.expert_type!r} experts, the seed layer {seed.expert_type!r}")
    if getattr(layer, "shared_experts", None) is not None:
        raise ValueError("the seed layer has no shared experts; build the MoELayer with n_shared_experts=0")
    with torch.no_grad():
        layer.router.linear.weight.copy_(seed.router.weight)
        if seed.expert_type == "swiglu":
            gate, up = _as_x_at_w(x.w1 for x in seed.experts), _as_x_at_w(x.w3 for x in seed.experts)
            experts.w_in.copy_(torch.cat([gate, up], dim=2))
            experts.w_out.copy_(_as_x_at_w(x.w2 for x in seed.experts))
        else:
            experts.w_in.copy_(_as_x_at_w(x.fc_in for x in seed.experts))
            experts.w_out.copy_(_as_x_at_w(x.fc_out for x in seed.experts))
            experts.b_in.copy_(torch.stack([x.fc_in.bias for x in seed.experts]))
            experts.b_out.copy_(torch.stack([x.fc_out.bias for x in seed.experts]))
