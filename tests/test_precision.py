"""bfloat16 training on the CPU against the float32 reference: the layer, the model, the optimizer, the
mixed_precision "auto" rule and a short training's loss curve."""

import copy
import os

import pytest
import torch
import torch.nn.functional as F

from helpers import small_moe_config

BF16_RTOL = 2e-2  # bfloat16 keeps 8 significant bits: a relative rounding of 2**-8 = 0.4% per operation


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0))


def test_stacked_experts_under_autocast_match_float32_outputs_and_gradients():
    from models import StackedExperts

    torch.manual_seed(0)
    for expert_type in ("swiglu", "mlp"):
        experts = StackedExperts(4, 64, 128, expert_type)
        with torch.no_grad():  # non-zero biases, so their gradients are compared too
            for parameter in experts.parameters():
                parameter.normal_(std=0.1)
        x = torch.randn(300, 64, requires_grad=True)
        counts = [50, 120, 0, 130]  # uneven, one expert without tokens
        grad_output = torch.randn(300, 64)
        results = {}
        for precision in ("fp32", "bf16"):
            experts.zero_grad(set_to_none=True)
            x.grad = None
            with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
                output = experts(x, counts)
            output.float().backward(grad_output)
            grads = {name: p.grad.clone() for name, p in experts.named_parameters()}
            results[precision] = (output.float().detach(), x.grad.clone(), grads)
        (out32, gx32, g32), (out16, gx16, g16) = results["fp32"], results["bf16"]
        assert results["bf16"][0].dtype == torch.float32 and out16.abs().sum() > 0
        assert torch.allclose(out16, out32, rtol=BF16_RTOL, atol=BF16_RTOL * out32.abs().max())
        assert cosine(gx16, gx32) > 0.999
        for name in g32:
            assert g16[name].dtype == torch.float32, name  # the master weights' gradients stay float32
            assert cosine(g16[name], g32[name]) > 0.999, name


def test_model_step_under_autocast_matches_float32_loss_and_gradients():
    """The whole forward + backward: loss within bf16 rounding, every parameter's gradient pointing the same way."""
    from models import MoEEncoderForMaskedLM

    torch.manual_seed(0)
    config = small_moe_config(vocab_size=300, embedding_dim=64, moe_dim=128, seq_len=32, num_head=4, top_k_experts=1)
    model = MoEEncoderForMaskedLM(config).train()
    ids = torch.randint(5, 300, (8, 32))
    labels = torch.where(torch.rand(8, 32) < 0.3, ids, -100)
    mask = torch.ones(8, 32, dtype=torch.bool)
    mask[:3, 20:] = False  # padding too
    results = {}
    for precision in ("fp32", "bf16"):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
            output = model(ids, mask, labels=labels, masked_logits_only=True)
        output.loss.backward()
        routes = [stats.expert_index.clone() for stats in output.layer_stats]
        results[precision] = (output, routes, {n: p.grad.clone() for n, p in model.named_parameters()})
    (out32, routes32, g32), (out16, routes16, g16) = results["fp32"], results["bf16"]
    assert out16.loss.dtype == torch.float32
    loss16, loss32 = float(out16.mlm_loss.detach()), float(out32.mlm_loss.detach())
    assert abs(loss16 - loss32) < BF16_RTOL * loss32
    for route32, route16 in zip(routes32, routes16):  # the router runs in float32: nearly every token agrees
        assert (route32 == route16).float().mean() > 0.97
    for name, grad in g32.items():
        assert g16[name].dtype == torch.float32, name
        assert cosine(g16[name], grad) > 0.97, name


def test_cpu_attention_core_runs_in_float32_under_autocast():
    """Under CPU autocast the projections run in bf16 and the attention core in float32: the core's output equals
    float32 attention over the bf16 projections."""
    from models.encoder import SelfAttention

    torch.manual_seed(0)
    attention = SelfAttention(small_moe_config(embedding_dim=32, num_head=4)).eval()
    x = torch.randn(2, 16, 32)
    mask = torch.ones(2, 16, dtype=torch.bool)
    cores = []
    original = F.scaled_dot_product_attention

    def recording(q, k, v, **kwargs):
        cores.append(q.dtype)
        return original(q, k, v, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(F, "scaled_dot_product_attention", recording)
        with torch.autocast("cpu", torch.bfloat16):
            output = attention(x, mask)
    assert cores == [torch.float32] and output.dtype == torch.bfloat16
    with torch.autocast("cpu", torch.bfloat16):
        qkv = attention.qkv(x)
    q, k, v = qkv.float().view(2, 16, 3, 4, -1).permute(2, 0, 3, 1, 4)
    core = original(q, k, v, attn_mask=mask[:, None, None, :]).transpose(1, 2).reshape(2, 16, 32)
    with torch.autocast("cpu", torch.bfloat16):
        expected = attention.out_proj(core)
    assert torch.equal(output, expected)


def test_attention_dropout_defaults_to_dropout_and_zero_turns_it_off():
    from models.encoder import SelfAttention

    assert SelfAttention(small_moe_config(dropout=0.2)).dropout == 0.2  # configs saved before the key
    assert SelfAttention(small_moe_config(dropout=0.2, attention_dropout=0.0)).dropout == 0.0


def test_fused_adamw_matches_the_per_tensor_loop():
    """train.loop.optimizer_for uses the fused kernel: given the same gradients, the same updates as torch's
    default AdamW (both parameter groups: decayed and not)."""
    from models import MoEEncoderForMaskedLM
    from train.loop import optimizer_for

    torch.manual_seed(0)
    model = MoEEncoderForMaskedLM(small_moe_config(vocab_size=100))
    reference = copy.deepcopy(model)
    fused, plain = optimizer_for(model, 1e-2, 0.01), optimizer_for(reference, 1e-2, 0.01, fused=False)
    assert fused.defaults["fused"] and not plain.defaults["fused"]
    for _ in range(5):
        for a, b in zip(model.parameters(), reference.parameters()):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        fused.step()
        plain.step()
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), name


def test_auto_precision_follows_the_documented_rule(monkeypatch, tmp_path):
    """auto = bf16 exactly where train.precision says it pays: native bfloat16 and, on the CPU, a model at least
    CPU_BF16_MIN_WIDTH wide."""
    from accelerate.state import AcceleratorState

    import train.precision
    from train.loop import make_accelerator

    config = {"mixed_precision": "auto", "device": "cpu", "aim_repo": str(tmp_path), "compile": False}
    wide, narrow = train.precision.CPU_BF16_MIN_WIDTH, train.precision.CPU_BF16_MIN_WIDTH // 2
    for fast in (True, False):
        monkeypatch.setattr(train.precision, "cpu_has_fast_bf16", lambda fast=fast: fast)
        for width in (wide, narrow):
            AcceleratorState._reset_state(True)
            expected = "bf16" if fast and width >= wide else "no"
            assert make_accelerator(config, model_width=width).mixed_precision == expected, (fast, width)
    AcceleratorState._reset_state(True)
    monkeypatch.undo()
    flags = open("/proc/cpuinfo").read().split() if os.path.exists("/proc/cpuinfo") else []
    if "avx512_bf16" in flags or "amx_bf16" in flags:  # the rule reads the same flags the kernel reports
        assert train.precision.bf16_is_fast("cpu", wide) and not train.precision.bf16_is_fast("cpu", narrow)


def _train_curve(precision: str, seed: int, steps: int = 120) -> list[float]:
    """A small model learning a first-order Markov language: the MLM loss of each step."""
    from models import MoEEncoderForMaskedLM
    from train.loop import optimizer_for

    vocab, batch, seq_len = 64, 16, 32
    data_gen = torch.Generator().manual_seed(1234)  # the same language and batches for every run
    successor = torch.randint(5, vocab, (vocab, 2), generator=data_gen)
    torch.manual_seed(seed)
    config = small_moe_config(vocab_size=vocab, embedding_dim=64, moe_dim=128, seq_len=seq_len, top_k_experts=1)
    model = MoEEncoderForMaskedLM(config).train()
    optimizer = optimizer_for(model, 3e-3, 0.01)
    losses = []
    for _ in range(steps):
        tokens = [torch.randint(5, vocab, (batch,), generator=data_gen)]
        for _ in range(seq_len - 1):
            choice = torch.randint(0, 2, (batch,), generator=data_gen)
            tokens.append(successor[tokens[-1], choice])
        ids = torch.stack(tokens, 1)
        masked = torch.rand(batch, seq_len, generator=data_gen) < 0.15
        labels = torch.where(masked, ids, -100)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
            loss = model(ids.masked_fill(masked, 4), labels=labels, masked_logits_only=True).loss
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def test_a_short_bf16_training_stays_within_the_float32_seed_spread():
    """Three seeds each: the bf16 runs' mean final loss lies within the fp32 seeds' range (3.64-3.74 here, the
    bf16 mean 3.69), and every curve falls."""
    tail = 20  # the final loss: the mean of the last 20 steps, which smooths the per-batch noise
    finals = {p: [] for p in ("fp32", "bf16")}
    for seed in range(3):
        for precision in finals:
            curve = _train_curve(precision, seed)
            assert sum(curve[-tail:]) / tail < sum(curve[:tail]) / tail - 0.15, (precision, seed)
            finals[precision].append(sum(curve[-tail:]) / tail)
    bf16_mean = sum(finals["bf16"]) / 3
    assert min(finals["fp32"]) <= bf16_mean <= max(finals["fp32"]), finals


HEAP_SCRIPT = """
import ctypes, sys, torch
sys.path.insert(0, sys.argv[1])
from config_utils.host_memory import keep_freed_memory
kept = keep_freed_memory() if sys.argv[2] == "keep" else None
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
before = libc.mallinfo2()
block = torch.empty(2**24).fill_(1.0)
alive = libc.mallinfo2()
del block
freed = libc.mallinfo2()
print(kept, alive.hblkhd - before.hblkhd, freed.fordblks)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="Linux (glibc) only")
def test_freed_memory_is_kept_for_reuse_instead_of_unmapped():
    """A 64 MiB tensor: glibc serves it from a fresh mmap and unmaps it on free (so the next step faults its 16,384
    pages in again), unless told to keep freed memory (config_utils.host_memory), as train.py and step 4 do; then it
    comes from the heap and stays there, free for the next one. Read from glibc's own counters (mallinfo2): the page
    faults themselves also depend on the kernel, and this VM's DAMON pageout reclaims idle pages now and then."""
    import subprocess
    import sys

    from helpers import REPO

    heap = {}
    for mode in ("default", "keep"):
        result = subprocess.run(
            [sys.executable, "-c", HEAP_SCRIPT, str(REPO), mode], capture_output=True, text=True, check=True
        )
        kept, mapped, free_in_heap = result.stdout.split()
        heap[mode] = (int(mapped), int(free_in_heap))
    if kept != "True":
        pytest.skip("not glibc: the allocator is left as it is")
    block = 4 * 2**24
    assert heap["default"][0] >= block and heap["default"][1] < block, heap  # its own mmap, given back on free
    assert heap["keep"][0] < 2**20 and heap["keep"][1] >= block, heap  # from the heap, and kept there when freed
