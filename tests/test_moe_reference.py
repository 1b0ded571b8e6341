"""The MoE layer against a naive per-token float64 reference, for every router/expert combination.

The reference loops over tokens in Python and applies each chosen expert's weights directly, so it
shares no dispatch code with models/moe.py: outputs AND gradients must agree to 1e-6.
"""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from helpers import relative_error
from models import MoEEncoderConfig, MoEEncoderForMaskedLM, MoELayer
from models.experts import DenseFFN
from models.losses import count_assignments

D_MODEL, HIDDEN, N_EXPERTS = 16, 24, 4


def layer_config(**overrides) -> MoEEncoderConfig:
    params = dict(
        vocab_size=40,
        embedding_dim=D_MODEL,
        num_head=4,
        moe_dim=HIDDEN,
        n_experts=N_EXPERTS,
        top_k_experts=1,
        dropout=0.0,
    )
    params.update(overrides)
    return MoEEncoderConfig(**params)


def float64_layer(config: MoEEncoderConfig, seed: int = 0) -> MoELayer:
    torch.manual_seed(seed)
    layer = MoELayer(config).double()
    with torch.no_grad():  # larger weights than the init so experts and routes differ clearly
        for parameter in layer.parameters():
            parameter.normal_(0.0, 0.5)
    return layer.eval()


def padded_batch(seed: int = 1, total_len: int = 7):
    """3 sequences of 7, 5 and 2 real tokens; padding rows hold random values, only the mask says padding."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, total_len, D_MODEL, dtype=torch.float64, generator=generator)
    mask = torch.zeros(3, total_len, dtype=torch.bool)
    for row, n in enumerate([7, 5, 2]):
        mask[row, :n] = True
    return hidden, mask


# ---- the naive reference ---------------------------------------------------------------------------


def expert_forward(layer: MoELayer, e: int, x: torch.Tensor) -> torch.Tensor:
    experts = layer.experts
    if experts.expert_type == "swiglu":
        gate, up = (x @ experts.w_in[e]).chunk(2)
        return (F.silu(gate) * up) @ experts.w_out[e]
    return F.gelu(x @ experts.w_in[e] + experts.b_in[e]) @ experts.w_out[e] + experts.b_out[e]


def shared_forward(ffn: DenseFFN, x: torch.Tensor) -> torch.Tensor:
    if ffn.expert_type == "swiglu":
        return ffn.fc_out.weight @ (F.silu(ffn.fc_gate.weight @ x) * (ffn.fc_up.weight @ x))
    return ffn.fc_out.weight @ F.gelu(ffn.fc_in.weight @ x + ffn.fc_in.bias) + ffn.fc_out.bias


def naive_moe(layer: MoELayer, config: MoEEncoderConfig, hidden: torch.Tensor, mask: torch.Tensor):
    """Returns (output [B, T, d], kept {(token, expert)}, dropped {(token, expert)}) over real tokens in order."""
    positions = [(b, t) for b in range(hidden.shape[0]) for t in range(hidden.shape[1]) if mask[b, t]]
    xs = [hidden[b, t] for b, t in positions]
    n_tokens, k, n_experts = len(xs), config.top_k_experts, config.n_experts
    logits = [layer.router.linear.weight @ x for x in xs]
    probs = [torch.softmax(logit, dim=-1) for logit in logits]
    kept, dropped, gates = set(), set(), {}

    if config.router_type == "topk":
        choices = []
        for n in range(n_tokens):
            if config.router_gate == "mixtral":
                top_logits, chosen = torch.topk(logits[n], k)
                weights = torch.softmax(top_logits, dim=-1)
            else:
                weights, chosen = torch.topk(probs[n], k)
                if k >= 2 and config.normalize_top_k:
                    weights = weights / weights.sum()
            choices.append(list(zip(chosen.tolist(), weights)))
        capacity = math.inf
        if config.capacity_factor is not None:
            capacity = min(math.ceil(config.capacity_factor * n_tokens * k / n_experts), n_tokens)
        served = [0] * n_experts
        for rank in range(k):  # first choices before second choices, each in position order
            for n in range(n_tokens):
                e, weight = choices[n][rank]
                if served[e] < capacity:
                    served[e] += 1
                    kept.add((n, e))
                    gates[n, e] = weight
                else:
                    dropped.add((n, e))
    else:
        factor = 1.0 if config.capacity_factor is None else config.capacity_factor
        capacity = min(math.ceil(factor * n_tokens * k / n_experts), n_tokens)
        for e in range(n_experts):
            ranked = sorted(range(n_tokens), key=lambda n: -probs[n][e].item())
            for n in ranked[:capacity]:
                kept.add((n, e))
                gates[n, e] = probs[n][e]

    output = torch.zeros_like(hidden)
    for n, (b, t) in enumerate(positions):
        y = torch.zeros_like(xs[n])
        for e in range(n_experts):
            if (n, e) in kept:
                y = y + gates[n, e] * expert_forward(layer, e, xs[n])
        if layer.shared_experts is not None:
            y = y + shared_forward(layer.shared_experts, xs[n])
        output[b, t] = y
    return output, kept, dropped


# ---- every combination against the reference ---------------------------------------------------------

COMBINATIONS = list(
    itertools.product(["topk", "expert_choice"], ["switch", "mixtral"], [1, 2], ["mlp", "swiglu"], [None, 0.5], [0, 1])
)


def combination_id(combo) -> str:
    router_type, gate, k, expert_type, capacity, shared = combo
    return f"{router_type}-{gate}-k{k}-{expert_type}-cap{capacity}-shared{shared}"


def combination_config(combo) -> MoEEncoderConfig:
    router_type, gate, k, expert_type, capacity, shared = combo
    return layer_config(
        router_type=router_type,
        router_gate=gate,
        top_k_experts=k,
        expert_type=expert_type,
        capacity_factor=capacity,
        n_shared_experts=shared,
    )


def is_valid(combo) -> bool:
    router_type, gate, k, *_ = combo
    return gate == "switch" or (router_type == "topk" and k >= 2)


@pytest.mark.parametrize("combo", [c for c in COMBINATIONS if not is_valid(c)], ids=combination_id)
def test_invalid_combination_raises(combo):
    with pytest.raises(ValueError, match="router_gate"):
        combination_config(combo)


@pytest.mark.parametrize("combo", [c for c in COMBINATIONS if is_valid(c)], ids=combination_id)
def test_layer_matches_naive_reference(combo):
    config = combination_config(combo)
    layer = float64_layer(config)
    hidden, mask = padded_batch()
    upstream = torch.randn(hidden.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    parameters = dict(layer.named_parameters())

    results = []
    for run in ("layer", "reference"):
        x = hidden.clone().requires_grad_(True)
        layer.zero_grad(set_to_none=True)
        if run == "layer":
            output, stats = layer(x, mask)
        else:
            output, kept, dropped = naive_moe(layer, config, x, mask)
        (output * upstream).sum().backward()
        grads = {name: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for name, p in parameters.items()}
        results.append((output.detach(), x.grad.clone(), grads))

    (out, grad_x, grads), (ref_out, ref_grad_x, ref_grads) = results
    real = mask
    assert relative_error(out[real], ref_out[real]) < 1e-6
    assert (out[~real] == 0).all()
    assert relative_error(grad_x, ref_grad_x) < 1e-6
    assert (grad_x[~real] == 0).all()  # padding gets no gradient through the MoE layer
    assert "router.linear.weight" in grads
    for name in grads:
        assert relative_error(grads[name], ref_grads[name]) < 1e-6, name

    n_real, k = int(mask.sum()), config.top_k_experts
    if config.router_type == "topk":
        assert stats.expert_index.shape == (3, 7, k)
        assert stats.dropped_fraction.item() == pytest.approx(len(dropped) / (n_real * k))
        assert (stats.dropped_fraction.item() == 0) == (config.capacity_factor is None)
    else:
        assert stats.expert_index.shape == (3, 7, 1)
        picked = {n for n, _ in kept}
        assert stats.dropped_fraction.item() == pytest.approx(1 - len(picked) / n_real)
        assert stats.load_balance_loss.item() == 0
    assert (stats.expert_index[~real] == -1).all() and (stats.router_probs[~real] == 0).all()
    torch.testing.assert_close(stats.router_probs[real].sum(-1), torch.ones(n_real, dtype=torch.float64))


@pytest.mark.parametrize("combo", [c for c in COMBINATIONS if is_valid(c)], ids=combination_id)
def test_padding_changes_nothing(combo):
    layer = float64_layer(combination_config(combo))
    hidden, mask = padded_batch(seed=1, total_len=7)
    longer, longer_mask = padded_batch(seed=5, total_len=11)  # other padding values, more padding
    longer[:, :7][mask] = hidden[mask]
    with torch.no_grad():
        out, stats = layer(hidden, mask)
        out_long, stats_long = layer(longer, longer_mask)
    assert torch.equal(out[mask], out_long[:, :7][mask])
    assert (out_long[~longer_mask] == 0).all()
    assert torch.equal(stats.expert_index[mask], stats_long.expert_index[:, :7][mask])
    assert stats.dropped_fraction.item() == stats_long.dropped_fraction.item()
    assert stats.load_balance_loss.item() == pytest.approx(stats_long.load_balance_loss.item(), abs=1e-12)


# ---- capacity, expert choice, balancing ---------------------------------------------------------------


def routed_to(layer: MoELayer, preferred: list[int]) -> None:
    """Make the router send every token to the experts in `preferred` order (huge fixed logits)."""
    with torch.no_grad():
        layer.router.linear.weight.zero_()
        for rank, e in enumerate(preferred):
            layer.router.linear.weight[e, 0] = 50.0 * (len(preferred) - rank)


def test_capacity_drops_exactly_the_later_tokens():
    # k=1, all tokens to expert 2, capacity = ceil(1.0 * 12 * 1 / 4) = 3: positions 0, 1, 2 are served
    # (flat order: sequence by sequence), all later tokens are dropped and output 0 (residual only).
    layer = float64_layer(layer_config(capacity_factor=1.0))
    routed_to(layer, [2])
    hidden = torch.randn(2, 8, D_MODEL, dtype=torch.float64).abs() + 0.1  # feature 0 > 0: routing is fixed
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[0, 5:] = False
    mask[1, 7:] = False  # real tokens, in order: (0, 0..4), (1, 0..6): 12
    with torch.no_grad():
        out, stats = layer(hidden, mask)
    served = torch.zeros(2, 8, dtype=torch.bool)
    served[0, :3] = True
    assert (out[served].abs().sum(-1) > 0).all()
    assert (out[~served] == 0).all()
    assert stats.dropped_fraction.item() == pytest.approx(9 / 12)
    assert (stats.expert_index[mask] == 2).all()  # the router's choice is reported even when dropped


def test_capacity_serves_first_choices_before_second_choices():
    # k=2, every token prefers expert 1 then 3; capacity = ceil(0.5 * 6 * 2 / 4) = 2 per expert.
    config = layer_config(top_k_experts=2, capacity_factor=0.5)
    layer = float64_layer(config)
    routed_to(layer, [1, 3])
    hidden = torch.randn(1, 6, D_MODEL, dtype=torch.float64).abs() + 0.1
    mask = torch.ones(1, 6, dtype=torch.bool)
    _, kept, dropped = naive_moe(layer, config, hidden, mask)
    assert kept == {(0, 1), (1, 1), (0, 3), (1, 3)}
    assert len(dropped) == 8
    with torch.no_grad():
        out, stats = layer(hidden, mask)
    assert (out[0, 2:] == 0).all() and (out[0, :2].abs().sum(-1) > 0).all()
    assert stats.dropped_fraction.item() == pytest.approx(8 / 12)


@pytest.mark.parametrize("capacity_factor,top_k", [(None, 1), (None, 2), (0.5, 1), (2.0, 2)])
def test_expert_choice_gives_each_expert_exactly_its_capacity(capacity_factor, top_k):
    config = layer_config(router_type="expert_choice", top_k_experts=top_k, capacity_factor=capacity_factor)
    layer = float64_layer(config)
    tokens = torch.randn(14, D_MODEL, dtype=torch.float64)
    routing = layer.router(tokens)
    capacity = math.ceil((capacity_factor or 1.0) * 14 * top_k / N_EXPERTS)
    assert routing.token_index.shape == (N_EXPERTS, capacity)
    for e in range(N_EXPERTS):
        picked = routing.token_index[e]
        assert len(set(picked.tolist())) == capacity  # distinct tokens
        # they are the expert's top tokens by router probability
        threshold = routing.probs[:, e].sort(descending=True).values[capacity - 1]
        assert (routing.probs[picked, e] >= threshold).all()


@pytest.mark.parametrize("top_k", [1, 2])
def test_load_balancing_loss_is_one_for_a_uniform_router(top_k):
    layer = float64_layer(layer_config(top_k_experts=top_k))
    with torch.no_grad():
        layer.router.linear.weight.zero_()  # every token: probability 1/E for every expert
    hidden, mask = padded_batch()
    _, stats = layer(hidden, mask)
    assert stats.load_balance_loss.item() == pytest.approx(1.0, abs=1e-12)
    assert stats.z_loss.item() == pytest.approx(math.log(N_EXPERTS) ** 2)


def test_jitter_acts_only_in_training_and_is_seeded():
    config = layer_config(router_jitter=0.5)
    layer = float64_layer(config)
    clean = float64_layer(layer_config(router_jitter=0.0))
    hidden, mask = padded_batch()
    with torch.no_grad():
        assert torch.equal(layer.eval()(hidden, mask)[0], clean(hidden, mask)[0])  # eval: no noise
        layer.train()
        torch.manual_seed(3)
        first = layer(hidden, mask)[1].router_probs
        torch.manual_seed(3)
        again = layer(hidden, mask)[1].router_probs
        torch.manual_seed(4)
        other = layer(hidden, mask)[1].router_probs
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert not torch.equal(first, clean(hidden, mask)[1].router_probs)


def test_mixtral_gate_equals_switch_with_renormalization():
    hidden, mask = padded_batch()
    mixtral = float64_layer(layer_config(top_k_experts=2, router_gate="mixtral"))
    switch = float64_layer(layer_config(top_k_experts=2, router_gate="switch", normalize_top_k=True))
    torch.testing.assert_close(mixtral(hidden, mask)[0], switch(hidden, mask)[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("router_type", ["topk", "expert_choice"])
def test_all_padding_batch(router_type):
    layer = float64_layer(layer_config(router_type=router_type, top_k_experts=2, capacity_factor=1.0))
    hidden = torch.randn(2, 3, D_MODEL, dtype=torch.float64, requires_grad=True)
    out, stats = layer(hidden, torch.zeros(2, 3, dtype=torch.bool))
    out.sum().backward()
    assert (out == 0).all() and (stats.expert_index == -1).all()
    assert stats.dropped_fraction.item() == 0 and torch.isfinite(stats.load_balance_loss)


# ---- experts: dense baseline, grouped_mm path ---------------------------------------------------------


@pytest.mark.parametrize("expert_type", ["mlp", "swiglu"])
def test_dense_baseline_is_exactly_a_plain_ffn(expert_type):
    layer = float64_layer(layer_config(n_experts=1, expert_type=expert_type))
    plain = DenseFFN(D_MODEL, HIDDEN, expert_type).double()
    plain.load_state_dict({name.removeprefix("dense."): p for name, p in layer.state_dict().items()})
    assert sum(p.numel() for p in layer.parameters()) == sum(p.numel() for p in plain.parameters())
    hidden, mask = padded_batch()
    out, stats = layer(hidden, mask)
    assert torch.equal(out, plain(hidden))
    assert (stats.expert_index[mask] == 0).all() and (stats.expert_index[~mask] == -1).all()
    assert stats.load_balance_loss.item() == 0 and stats.dropped_fraction.item() == 0


@pytest.mark.parametrize("expert_type", ["mlp", "swiglu"])
def test_grouped_mm_path_matches_the_loop(expert_type):
    """Where both run (CPU float32, forward and a contiguous backward), the two expert paths agree."""
    if not hasattr(F, "grouped_mm"):
        pytest.skip("torch has no grouped_mm")
    torch.manual_seed(0)
    layer = MoELayer(layer_config(top_k_experts=2, expert_type=expert_type))
    hidden = torch.randn(3, 7, D_MODEL)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[2, 3:] = False
    upstream = torch.randn(3, 7, D_MODEL)
    results = []
    for grouped in (False, True):
        layer.experts.use_grouped_mm = grouped
        layer.zero_grad(set_to_none=True)
        x = hidden.clone().requires_grad_(True)
        out, _ = layer(x, mask)
        (out * upstream).sum().backward()
        results.append([out.detach(), x.grad] + [p.grad for p in layer.experts.parameters()])
    for loop_value, grouped_value in zip(*results):
        torch.testing.assert_close(grouped_value, loop_value, rtol=1e-4, atol=1e-5)


# ---- the options through the whole model ---------------------------------------------------------------


def test_model_with_every_option_trains_and_reloads(tmp_path):
    torch.manual_seed(0)
    config = MoEEncoderConfig(
        vocab_size=40,
        embedding_dim=32,
        seq_len=16,
        num_head=4,
        n_encoder_blocks=4,
        n_experts=4,
        top_k_experts=2,
        moe_dim=24,
        moe_every=2,
        router_type="expert_choice",
        expert_type="swiglu",
        n_shared_experts=1,
        capacity_factor=0.75,
        router_jitter=0.1,
        pad_token_id=0,
    )
    model = MoEEncoderForMaskedLM(config)
    assert model.moe_layer_indices == [1, 3]
    ids = torch.randint(1, 40, (2, 10))
    ids[1, 6:] = 0
    labels = torch.where(torch.rand(ids.shape) < 0.3, ids, -100)
    out = model(ids, labels=labels)
    out.loss.backward()
    assert len(out.dropped_fraction) == 2 and all(0 <= d.item() < 1 for d in out.dropped_fraction)
    assert all(p.grad is not None for name, p in model.named_parameters() if "router" in name)
    model.save_pretrained(tmp_path)
    loaded = MoEEncoderForMaskedLM.from_pretrained(tmp_path).eval()
    assert loaded.config.router_type == "expert_choice" and loaded.config.capacity_factor == 0.75
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model.eval()(ids).logits)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(router_type="switch"), "router_type must be one of topk, expert_choice"),
        (dict(expert_type="relu"), "expert_type must be one of mlp, swiglu"),
        (dict(router_gate="mixtral", top_k_experts=1), "use router_gate: switch"),
        (dict(router_gate="mixtral", top_k_experts=2, normalize_top_k=False), "normalize_top_k"),
        (dict(capacity_factor=0.0), r"capacity_factor must be > 0.0 or null \(.*null = dropless"),
        (dict(router_jitter=1.0), r"router_jitter must be in \[0.0, 1.0\)"),
        (dict(n_shared_experts=-1), "n_shared_experts must be >= 0"),
        (dict(n_experts=1, n_shared_experts=1), "dense baseline"),
    ],
)
def test_invalid_options_say_what_to_do(overrides, message):
    with pytest.raises(ValueError, match=message):
        layer_config(**overrides)


@pytest.mark.parametrize("router_type", ["topk", "expert_choice"])
def test_low_precision_routes_in_float32(router_type):
    """Under bf16 autocast, and in a bf16 layer, the experts compute in bf16 and the routing in float32."""
    torch.manual_seed(0)
    layer = MoELayer(layer_config(router_type=router_type, top_k_experts=2, expert_type="swiglu", n_shared_experts=1))
    hidden = torch.randn(3, 7, D_MODEL)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 4:] = False
    reference, reference_stats = layer(hidden, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, stats = layer(hidden, mask)
    out.float().sum().backward()
    assert stats.router_probs.dtype == torch.float32
    assert torch.equal(stats.expert_index, reference_stats.expert_index)  # same routes as in float32
    assert relative_error(out.float(), reference.detach()) < 5e-2
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in layer.parameters())

    bf16_out, bf16_stats = layer.bfloat16()(hidden.bfloat16(), mask)
    assert bf16_out.dtype == torch.bfloat16 and bf16_stats.router_probs.dtype == torch.float32
    assert relative_error(bf16_out.float(), reference.detach()) < 5e-2


def test_dense_baseline_model_reports_one_expert():
    torch.manual_seed(0)
    model = MoEEncoderForMaskedLM(
        MoEEncoderConfig(
            vocab_size=40,
            embedding_dim=32,
            seq_len=16,
            num_head=4,
            n_encoder_blocks=2,
            n_experts=1,
            moe_dim=24,
            expert_type="swiglu",
            pad_token_id=0,
        )
    ).eval()
    assert not any("router" in name for name, _ in model.named_parameters())
    ids = torch.randint(1, 40, (2, 10))
    ids[1, 6:] = 0
    with torch.no_grad():
        out = model(ids)
    assert out.aux_loss.item() == 0 and out.z_loss.item() == 0
    for chosen in out.expert_indices:
        assert chosen.shape == (2, 10, 1)
        assert (chosen[ids != 0] == 0).all() and (chosen[ids == 0] == -1).all()


def test_count_assignments_equals_bincount():
    """The sync-free counter used in the routing hot path counts exactly what bincount counts."""
    index = torch.randint(0, 6, (50, 2), generator=torch.Generator().manual_seed(3))
    assert torch.equal(count_assignments(index, 8), torch.bincount(index.reshape(-1), minlength=8))
    assert torch.equal(count_assignments(index[:0], 8), torch.zeros(8, dtype=torch.long))
