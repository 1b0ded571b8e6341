"""Feed-forward experts: a dense FFN, and E experts stored as stacked weights applied to tokens sorted by expert.

expert_type "mlp": d -> h -> d with GELU and biases (BERT). "swiglu": down(silu(gate(x)) * up(x)), no
biases (Shazeer 2020, as in LLaMA and Mixtral); stacked experts keep gate and up in one [E, d, 2h] tensor
(gate = columns :h), so grouped_mm takes them in one call.
"""

import torch
import torch.nn.functional as F
from torch import nn


def _activate(hidden: torch.Tensor, expert_type: str) -> torch.Tensor:
    if expert_type == "swiglu":
        gate, up = hidden.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(hidden)


class DenseFFN(nn.Module):
    """One plain feed-forward network: the dense blocks, the n_experts=1 baseline, and the shared experts.

    swiglu uses separate gate and up layers (as LLaMA does): the halves of one fused output are strided,
    and elementwise ops on them are slower than the extra matmul call.
    """

    def __init__(self, d_model: int, hidden_dim: int, expert_type: str = "mlp"):
        super().__init__()
        self.expert_type = expert_type
        if expert_type == "swiglu":
            self.fc_gate = nn.Linear(d_model, hidden_dim, bias=False)
            self.fc_up = nn.Linear(d_model, hidden_dim, bias=False)
            self.fc_out = nn.Linear(hidden_dim, d_model, bias=False)
        else:
            self.fc_in = nn.Linear(d_model, hidden_dim)
            self.fc_out = nn.Linear(hidden_dim, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.expert_type == "swiglu":
            return self.fc_out(F.silu(self.fc_gate(x)) * self.fc_up(x))
        return self.fc_out(F.gelu(self.fc_in(x)))


class _ExpertLoop(torch.autograd.Function):
    """All experts over their contiguous row slices, forward and backward, as one autograd op.

    Written by hand because autograd over `w_in[e]` materializes a full [E, ...] zero gradient per
    expert, and cat/chunk copy. Each expert's matmuls and activation run back to back on its own
    slice: its intermediates stay in cache and stay small. Small matters on CPU: glibc returns large
    blocks (from 32 MiB, one [8192, 1024] float32 tensor, always) to the OS, and page-faulting them in
    again costs more than the activation itself; measured, this layout had the fewest faults and was
    fastest. Results that span all rows go to buffers via out=. SwiGLU's gate and up halves of the
    fused w_in are computed into separate contiguous tensors.
    """

    @staticmethod
    def forward(ctx, x, w_in, b_in, w_out, b_out, counts: list[int], expert_type: str):
        bounds = _slice_bounds(counts)
        hidden_dim = w_out.shape[1]
        output = x.new_empty(x.shape[0], w_out.shape[-1])
        saved = []  # per expert: swiglu (gate, up, silu(gate), act); mlp (pre-GELU hidden, act)
        for e, (start, end) in enumerate(bounds):
            x_e = x[start:end]
            if expert_type == "swiglu":
                gate, up = x_e @ w_in[e, :, :hidden_dim], x_e @ w_in[e, :, hidden_dim:]
                silu_gate = F.silu(gate)  # kept, as autograd would: recomputing it costs more
                act = silu_gate * up
                saved += [gate, up, silu_gate, act]
                torch.mm(act, w_out[e], out=output[start:end])
            else:
                hidden = torch.addmm(b_in[e], x_e, w_in[e])
                act = F.gelu(hidden)
                saved += [hidden, act]
                torch.addmm(b_out[e], act, w_out[e], out=output[start:end])
        ctx.save_for_backward(x, w_in, w_out, *saved)
        ctx.bounds, ctx.expert_type, ctx.has_bias = bounds, expert_type, b_in is not None
        return output

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        x, w_in, w_out, *saved = ctx.saved_tensors
        bounds, has_bias, hidden_dim = ctx.bounds, ctx.has_bias, w_out.shape[1]
        swiglu = ctx.expert_type == "swiglu"
        per_expert = 4 if swiglu else 2
        grad_output = grad_output.contiguous()
        grad_w_out, grad_w_in = torch.empty_like(w_out), torch.empty_like(w_in)
        grad_b_out = grad_output.new_empty(w_out.shape[0], w_out.shape[-1]) if has_bias else None
        grad_b_in = grad_output.new_empty(w_in.shape[0], w_in.shape[-1]) if has_bias else None
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        for e, (start, end) in enumerate(bounds):
            grad_out_e, x_e = grad_output[start:end], x[start:end]
            tensors = saved[e * per_expert : (e + 1) * per_expert]
            act = tensors[-1]
            grad_act = grad_out_e @ w_out[e].t()
            torch.mm(act.t(), grad_out_e, out=grad_w_out[e])
            if has_bias:
                torch.sum(grad_out_e, dim=0, out=grad_b_out[e])
            if swiglu:
                gate, up, silu_gate, _ = tensors
                grad_up = grad_act * silu_gate
                grad_gate = torch.ops.aten.silu_backward(grad_act.mul_(up), gate)
                grads_in = ((grad_gate, slice(0, hidden_dim)), (grad_up, slice(hidden_dim, None)))
            else:
                grads_in = ((torch.ops.aten.gelu_backward(grad_act, tensors[0]), slice(None)),)
            for i, (grad_hidden, columns) in enumerate(grads_in):
                if grad_x is not None:
                    if i == 0:
                        torch.mm(grad_hidden, w_in[e, :, columns].t(), out=grad_x[start:end])
                    else:
                        grad_x[start:end].addmm_(grad_hidden, w_in[e, :, columns].t())
                torch.mm(x_e.t(), grad_hidden, out=grad_w_in[e, :, columns])
            if has_bias:
                torch.sum(grads_in[0][0], dim=0, out=grad_b_in[e])
        return grad_x, grad_w_in, grad_b_in, grad_w_out, grad_b_out, None, None


def _slice_bounds(counts: list[int]) -> list[tuple[int, int]]:
    bounds, start = [], 0
    for count in counts:
        bounds.append((start, start + count))
        start += count
    return bounds


def grouped_mm_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Where F.grouped_mm runs forward AND backward: CUDA bf16 (its documented target). On CPU in torch
    2.13 it runs, but its backward fails on some gradient layouts (expanded ones), so the loop is used."""
    return hasattr(F, "grouped_mm") and device.type == "cuda" and dtype == torch.bfloat16


class StackedExperts(nn.Module):
    """E independent FFNs of one expert_type; expert e's weights live at index e of each stacked tensor."""

    bias_names = ("b_in", "b_out")  # biases, though 2-D ([E, h], [E, d]): the optimizer does not decay them

    def __init__(self, n_experts: int, d_model: int, hidden_dim: int, expert_type: str = "mlp", init_std: float = 0.02):
        super().__init__()
        self.n_experts = n_experts
        self.expert_type = expert_type
        self.init_std = init_std
        swiglu = expert_type == "swiglu"
        self.w_in = nn.Parameter(torch.empty(n_experts, d_model, 2 * hidden_dim if swiglu else hidden_dim))
        self.w_out = nn.Parameter(torch.empty(n_experts, hidden_dim, d_model))
        if swiglu:
            self.register_parameter("b_in", None)
            self.register_parameter("b_out", None)
        else:
            self.b_in = nn.Parameter(torch.empty(n_experts, hidden_dim))
            self.b_out = nn.Parameter(torch.empty(n_experts, d_model))
        # None = grouped_mm where grouped_mm_works(); True/False force a path (tests compare the two).
        self.use_grouped_mm: bool | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Same scheme as the model's Linear layers (normal std, zero bias).
        nn.init.normal_(self.w_in, std=self.init_std)
        nn.init.normal_(self.w_out, std=self.init_std)
        if self.b_in is not None:
            nn.init.zeros_(self.b_in)
            nn.init.zeros_(self.b_out)

    def forward(self, x_sorted: torch.Tensor, tokens_per_expert: torch.Tensor | list[int]) -> torch.Tensor:
        """x_sorted [M, d], rows grouped by expert in order 0..E-1; tokens_per_expert: E counts summing to M,
        a list or an integer tensor (on x's device, grouped_mm uses it there without a host sync)."""
        weights = (self.w_in, self.b_in, self.w_out, self.b_out)
        device_type = x_sorted.device.type
        if torch.is_autocast_enabled(device_type):
            # Neither the out= matmuls of the loop nor grouped_mm autocast: cast once here (differentiably).
            dtype = torch.get_autocast_dtype(device_type)
            x_sorted = x_sorted.to(dtype)
            weights = tuple(None if w is None else w.to(dtype) for w in weights)
        use_grouped = self.use_grouped_mm
        if use_grouped is None:
            aligned = x_sorted.shape[1] % 8 == 0 and self.w_out.shape[1] % 8 == 0  # 16-byte strides in bf16
            use_grouped = aligned and grouped_mm_works(x_sorted.device, x_sorted.dtype)
        if use_grouped:
            return self._grouped_forward(x_sorted, weights, tokens_per_expert)
        with torch.autocast(device_type, enabled=False):
            counts = tokens_per_expert.tolist() if torch.is_tensor(tokens_per_expert) else list(tokens_per_expert)
            return _ExpertLoop.apply(x_sorted, *weights, counts, self.expert_type)

    def _grouped_forward(self, x_sorted: torch.Tensor, weights: tuple, tokens_per_expert) -> torch.Tensor:
        """The same computation as one grouped matmul per layer (offsets = cumulative counts)."""
        w_in, b_in, w_out, b_out = weights
        counts = torch.as_tensor(tokens_per_expert, device=x_sorted.device)
        offsets = torch.cumsum(counts, 0).to(torch.int32)
        hidden = F.grouped_mm(x_sorted, w_in, offs=offsets)
        if b_in is not None:
            hidden = hidden + b_in.repeat_interleave(counts, dim=0, output_size=x_sorted.shape[0])
        output = F.grouped_mm(_activate(hidden, self.expert_type), w_out, offs=offsets)
        if b_out is not None:
            output = output + b_out.repeat_interleave(counts, dim=0, output_size=x_sorted.shape[0])
        return output
