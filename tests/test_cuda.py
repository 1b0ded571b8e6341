"""CUDA-only checks, skipped without a GPU (CI has none): the paths that only a GPU takes.

On CUDA in bf16 the experts run through F.grouped_mm, which CPU runs never reach, so here that path is
held against the plain expert loop and a float64 CPU reference with the same (bf16-rounded) weights.
"""

import copy

import pytest
import torch

from helpers import relative_error
from models import MoEEncoderConfig, MoEEncoderForMaskedLM, MoELayer
from models.experts import grouped_mm_works

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

D_MODEL, HIDDEN, N_EXPERTS = 64, 128, 8  # multiples of 16 bytes in bf16, as grouped_mm needs


def run_layer(layer: MoELayer, hidden: torch.Tensor, mask: torch.Tensor, upstream: torch.Tensor):
    """Output, routes and the gradients of the input and of every expert weight."""
    layer.zero_grad(set_to_none=True)
    x = hidden.clone().requires_grad_(True)
    out, stats = layer(x, mask)
    (out * upstream).sum().backward()
    return out.detach(), stats.expert_index, [x.grad] + [p.grad for p in layer.experts.parameters()]


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("expert_type", ["mlp", "swiglu"])
def test_bf16_grouped_mm_matches_the_loop_and_a_float64_reference(expert_type, top_k):
    torch.manual_seed(0)
    config = MoEEncoderConfig(
        vocab_size=40,
        embedding_dim=D_MODEL,
        num_head=4,
        moe_dim=HIDDEN,
        n_experts=N_EXPERTS,
        top_k_experts=top_k,
        expert_type=expert_type,
        dropout=0.0,
    )
    gpu_layer = MoELayer(config).cuda().bfloat16()
    assert gpu_layer.experts.use_grouped_mm is None and grouped_mm_works(torch.device("cuda"), torch.bfloat16)
    reference_layer = copy.deepcopy(gpu_layer).cpu().double()  # the same bf16-rounded weights, in float64
    hidden = torch.randn(4, 64, D_MODEL, device="cuda").bfloat16()
    mask = torch.ones(4, 64, dtype=torch.bool, device="cuda")
    mask[3, 20:] = False
    upstream = torch.randn(4, 64, D_MODEL, device="cuda").bfloat16()

    grouped = run_layer(gpu_layer, hidden, mask, upstream)  # use_grouped_mm None: grouped_mm on CUDA bf16
    gpu_layer.experts.use_grouped_mm = False
    loop = run_layer(gpu_layer, hidden, mask, upstream)
    reference = run_layer(reference_layer, hidden.cpu().double(), mask.cpu(), upstream.cpu().double())

    assert torch.equal(grouped[1], loop[1]) and torch.equal(grouped[1].cpu(), reference[1])  # same routes
    assert relative_error(grouped[0], loop[0]) < 1e-2
    assert relative_error(grouped[0], reference[0]) < 2e-2
    for grouped_grad, loop_grad, reference_grad in zip(grouped[2], loop[2], reference[2]):
        assert relative_error(grouped_grad, loop_grad) < 2e-2
        assert relative_error(grouped_grad, reference_grad) < 3e-2


def test_bf16_autocast_training_step_reaches_every_router():
    """One MLM step under CUDA bf16 autocast with the masked-only head: finite loss, every router gets a gradient."""
    torch.manual_seed(0)
    config = MoEEncoderConfig(
        vocab_size=100,
        embedding_dim=D_MODEL,
        seq_len=32,
        num_head=4,
        moe_dim=HIDDEN,
        n_encoder_blocks=2,
        n_experts=N_EXPERTS,
        top_k_experts=2,
        dropout=0.0,
    )
    model = MoEEncoderForMaskedLM(config).cuda()
    input_ids = torch.randint(5, 100, (8, 32), device="cuda")
    labels = torch.full_like(input_ids, -100)
    labels[:, ::5] = input_ids[:, ::5]
    attention_mask = torch.ones_like(input_ids)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        output = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, masked_logits_only=True)
    output.loss.backward()
    assert torch.isfinite(output.loss)
    router_grads = [p.grad for name, p in model.named_parameters() if "router" in name]
    assert router_grads and all(g is not None and g.abs().sum() > 0 for g in router_grads)


def test_the_dropless_bf16_layer_never_waits_on_the_host():
    """docs/model.md "host syncs": a dropless token-choice layer in bf16, given the real tokens of a batch without
    padding, runs forward and backward with no device-to-host synchronization (torch raises on one here)."""
    from models import RealTokens

    torch.manual_seed(0)
    config = MoEEncoderConfig(
        vocab_size=40,
        embedding_dim=D_MODEL,
        num_head=4,
        moe_dim=HIDDEN,
        n_experts=N_EXPERTS,
        top_k_experts=2,
        dropout=0.0,
    )
    layer = MoELayer(config).cuda().bfloat16()
    hidden = torch.randn(4, 64, D_MODEL, device="cuda").bfloat16().requires_grad_(True)
    real = RealTokens.of(torch.ones(4, 64, dtype=torch.bool, device="cuda"))  # the one sync, before the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, stats = layer(hidden, real)
        (out.float().sum() + stats.load_balance_loss + stats.z_loss).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert hidden.grad is not None
