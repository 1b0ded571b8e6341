"""Tests for models/: masking, routing gradients, dispatch vs a naive reference, save/load."""

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

from helpers import relative_error, small_moe_config
from models import (
    MoEEncoderConfig,
    MoEEncoderForMaskedLM,
    MoEEncoderModel,
    MoELayer,
    load_balancing_loss,
    router_z_loss,
)

VOCAB = 40
PAD = 0


def small_config(**overrides) -> MoEEncoderConfig:
    params = dict(
        vocab_size=VOCAB,
        embedding_dim=32,
        seq_len=32,
        num_head=4,
        n_encoder_blocks=2,
        n_experts=4,
        top_k_experts=1,
        moe_dim=48,
        dropout=0.1,
        pad_token_id=PAD,
    )
    params.update(overrides)
    return MoEEncoderConfig(**params)


def small_model(**overrides) -> MoEEncoderForMaskedLM:
    torch.manual_seed(0)
    return MoEEncoderForMaskedLM(small_config(**overrides))


def random_ids(batch_size: int, seq_len: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch_size, seq_len), generator=generator)  # no pad id inside


@pytest.mark.parametrize("top_k", [1, 2])
def test_padding_does_not_change_real_positions(top_k):
    model = small_model(top_k_experts=top_k).eval()
    lengths = [16, 9, 4]
    real = random_ids(len(lengths), 16)

    def padded(total_len: int, pad_content_seed: int):
        ids = torch.randint(
            1, VOCAB, (len(lengths), total_len), generator=torch.Generator().manual_seed(pad_content_seed)
        )
        mask = torch.zeros(len(lengths), total_len, dtype=torch.bool)
        for row, n in enumerate(lengths):
            ids[row, :n] = real[row, :n]
            mask[row, :n] = True
        return ids, mask  # pad positions hold arbitrary (non-pad) ids; only the mask says "padding"

    ids_short, mask_short = padded(16, pad_content_seed=7)
    ids_long, mask_long = padded(24, pad_content_seed=8)
    with torch.no_grad():
        out_short = model(ids_short, attention_mask=mask_short)
        out_long = model(ids_long, attention_mask=mask_long)
    for row, n in enumerate(lengths):
        torch.testing.assert_close(out_short.logits[row, :n], out_long.logits[row, :n], atol=1e-5, rtol=0)
        for layer_short, layer_long in zip(out_short.expert_indices, out_long.expert_indices):
            assert torch.equal(layer_short[row, :n], layer_long[row, :n])
            assert (layer_long[row, n:] == -1).all()  # padding is never routed
        for probs_long in out_long.router_probs:
            assert (probs_long[row, n:] == 0).all()


@pytest.mark.parametrize("attention", ["bidirectional", "causal"])
def test_only_bidirectional_attention_lets_earlier_positions_see_later_tokens(attention):
    torch.manual_seed(0)
    model = MoEEncoderForMaskedLM(small_moe_config(attention=attention)).eval()
    ids = random_ids(2, 12)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, 10:] = False  # padding after the changed token
    changed = ids.clone()
    changed[:, 9] = (ids[:, 9] % (VOCAB - 1)) + 1  # a different non-pad token at position 9
    with torch.no_grad():
        before, after = model(ids, attention_mask=mask), model(changed, attention_mask=mask)
        hidden_before = model.encoder(ids, mask).last_hidden_state
        hidden_after = model.encoder(changed, mask).last_hidden_state
    for old, new in ((hidden_before, hidden_after), (before.logits, after.logits)):
        assert not torch.allclose(old[:, 9], new[:, 9])  # the changed position itself always differs
        if attention == "causal":
            torch.testing.assert_close(old[:, :9], new[:, :9], atol=1e-6, rtol=0)
        else:
            assert not torch.allclose(old[:, 2], new[:, 2]), "an earlier position must see a later token"


def test_causal_attention_gives_every_query_a_key(monkeypatch):
    """A query with no real key at or before it (left padding, an all-padding row) would get an all-False mask
    row: NaN on some SDPA backends (CPU's math backend returns 0, so the mask itself is checked)."""
    torch.manual_seed(0)
    model = MoEEncoderForMaskedLM(small_moe_config(attention="causal")).eval()
    sdpa, masks = F.scaled_dot_product_attention, []

    def recording_sdpa(*args, **kwargs):
        masks.append(kwargs["attn_mask"])
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording_sdpa)
    ids = random_ids(3, 8)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[0, :3] = False  # left padding
    mask[1, 5:] = False  # right padding
    mask[2, :] = False  # nothing real
    with torch.no_grad():
        assert torch.isfinite(model.encoder(ids, mask).last_hidden_state).all()
    assert len(masks) == 2 and all(attn_mask.any(dim=-1).all() for attn_mask in masks)


def test_top1_router_learns_from_mlm_loss_alone():
    # With k=1 the gate weight is softmax(logits)[chosen] over ALL experts, which depends on every
    # router logit, so d(mlm_loss)/d(router weight) != 0. A softmax over only the chosen logit
    # would be the constant 1 and pass no gradient: the router would never learn.
    model = small_model(top_k_experts=1, load_balance_coef=0.0, router_z_loss_coef=0.0, dropout=0.0)
    ids = random_ids(4, 12)
    labels = torch.full_like(ids, -100)
    labels[:, ::3] = ids[:, ::3]
    out = model(ids, labels=labels)
    out.mlm_loss.backward()
    for block_index in model.moe_layer_indices:
        router_grad = model.encoder.blocks[block_index].ffn.router.linear.weight.grad
        assert router_grad is not None and router_grad.abs().sum() > 0


def naive_moe_reference(layer: MoELayer, hidden, real_token_mask, top_k: int, normalize: bool):
    """Per-token Python loop: softmax over all experts, top-k, optional renorm, weighted expert MLPs."""
    router_weight = layer.router.linear.weight
    experts = layer.experts
    rows = []
    for b in range(hidden.shape[0]):
        for t in range(hidden.shape[1]):
            x = hidden[b, t]
            if not real_token_mask[b, t]:
                rows.append(torch.zeros_like(x))
                continue
            probs = torch.softmax(router_weight @ x, dim=-1)
            weights, chosen = torch.topk(probs, top_k)
            if top_k >= 2 and normalize:
                weights = weights / weights.sum()
            y = torch.zeros_like(x)
            for w, e in zip(weights, chosen.tolist()):
                y = y + w * (F.gelu(x @ experts.w_in[e] + experts.b_in[e]) @ experts.w_out[e] + experts.b_out[e])
            rows.append(y)
    return torch.stack(rows).view_as(hidden)


@pytest.mark.parametrize("top_k,normalize", [(1, True), (2, True), (2, False)])
def test_moe_layer_matches_naive_loop_in_float64(top_k, normalize):
    torch.manual_seed(0)
    config = small_config(top_k_experts=top_k, normalize_top_k=normalize)
    layer = MoELayer(config).double()
    with torch.no_grad():  # larger weights than the init so experts differ clearly
        for parameter in layer.parameters():
            parameter.normal_(0.0, 0.5)
    hidden = torch.randn(3, 7, config.embedding_dim, dtype=torch.float64)
    real_token_mask = torch.ones(3, 7, dtype=torch.bool)
    real_token_mask[1, 5:] = False
    real_token_mask[2, 2:] = False
    upstream = torch.randn(3, 7, config.embedding_dim, dtype=torch.float64)  # random dL/d(output)

    results = []
    for run in ("layer", "reference"):
        x = hidden.clone().requires_grad_(True)
        layer.zero_grad()
        if run == "layer":
            output, stats = layer(x, real_token_mask)
        else:
            output = naive_moe_reference(layer, x, real_token_mask, top_k, normalize)
        (output * upstream).sum().backward()
        results.append((output.detach(), x.grad.clone(), layer.router.linear.weight.grad.clone()))

    (out, grad_x, grad_router), (ref_out, ref_grad_x, ref_grad_router) = results
    assert relative_error(out, ref_out) < 1e-6
    assert relative_error(grad_x, ref_grad_x) < 1e-6
    assert relative_error(grad_router, ref_grad_router) < 1e-6
    assert (out[~real_token_mask] == 0).all()
    assert stats.expert_index.shape == (3, 7, top_k) and (stats.expert_index[~real_token_mask] == -1).all()
    assert stats.router_probs.shape == (3, 7, config.n_experts)


def test_load_balancing_loss_values():
    n_tokens, n_experts = 8, 4
    uniform_probs = torch.full((n_tokens, n_experts), 1.0 / n_experts)
    even_assignment = (torch.arange(n_tokens) % n_experts)[:, None]
    assert load_balancing_loss(uniform_probs, even_assignment, n_experts).item() == pytest.approx(1.0)

    even_top2 = torch.stack([torch.arange(n_tokens) % n_experts, (torch.arange(n_tokens) + 1) % n_experts], dim=1)
    assert load_balancing_loss(uniform_probs, even_top2, n_experts).item() == pytest.approx(1.0)

    confident_probs = torch.softmax(torch.tensor([[10.0, 0.0, 0.0, 0.0]]).repeat(n_tokens, 1), dim=-1)
    all_to_expert0 = torch.zeros(n_tokens, 1, dtype=torch.long)
    collapsed = load_balancing_loss(confident_probs, all_to_expert0, n_experts).item()
    assert collapsed > 1.0 and collapsed == pytest.approx(n_experts * confident_probs[0, 0].item())

    logits = torch.randn(5, n_experts)
    assert router_z_loss(logits).item() == pytest.approx(torch.logsumexp(logits, -1).pow(2).mean().item())


def test_save_and_load_with_auto_class(tmp_path):
    model = small_model(n_encoder_blocks=3, moe_every=2, top_k_experts=2).eval()
    assert model.moe_layer_indices == [1]
    ids = random_ids(2, 10)
    ids[1, 6:] = PAD
    model.save_pretrained(tmp_path)

    assert (tmp_path / "model.safetensors").exists()
    assert not list(tmp_path.glob("*.bin"))
    assert AutoConfig.from_pretrained(tmp_path).hidden_size == 32

    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, MoEEncoderForMaskedLM)
    # The tie survives the round trip: one tensor, not two equal copies.
    assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight
    with torch.no_grad():
        expected = model(ids)
        actual = loaded(ids)
    assert torch.equal(expected.logits, actual.logits)
    assert all(torch.equal(a, b) for a, b in zip(expected.expert_indices, actual.expert_indices))

    base = AutoModel.from_pretrained(tmp_path)  # the encoder alone loads from the MLM checkpoint
    assert isinstance(base, MoEEncoderModel)
    torch.testing.assert_close(base.token_embedding.weight, model.encoder.token_embedding.weight)


def test_save_and_load_keep_causal_attention_and_older_configs_load_bidirectional(tmp_path):
    torch.manual_seed(0)
    model = MoEEncoderForMaskedLM(small_moe_config(attention="causal")).eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    assert loaded.config.attention == "causal" and all(block.attn.causal for block in loaded.encoder.blocks)
    ids = random_ids(2, 10)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)

    config_file = tmp_path / "config.json"
    saved = json.loads(config_file.read_text())
    assert saved.pop("attention") == "causal"
    config_file.write_text(json.dumps(saved))  # as exported before the key existed
    assert AutoConfig.from_pretrained(tmp_path).attention == "bidirectional"


def test_loss_combines_mlm_and_aux_losses():
    model = small_model(load_balance_coef=0.5, router_z_loss_coef=0.25).eval()
    ids = random_ids(2, 8)
    labels = torch.full_like(ids, -100)
    labels[:, 1] = ids[:, 1]
    out = model(ids, labels=labels)
    assert len(out.expert_indices) == len(out.router_probs) == len(model.moe_layer_indices) == 2
    torch.testing.assert_close(out.loss, out.mlm_loss + 0.5 * out.aux_loss + 0.25 * out.z_loss)
    assert model(ids).loss is None


@pytest.mark.parametrize("n_experts", [1, 4])
def test_masked_logits_only_matches_full_head_in_float64(n_experts):
    """The training fast path (the head only at masked positions) against the plain one: same loss, logits
    at the masked rows and gradients for every parameter, the tied decoder/embedding weight included."""
    model = small_model(n_experts=n_experts, dropout=0.0).double()
    ids = random_ids(3, 16)
    labels = torch.full_like(ids, -100)
    is_masked = torch.rand(ids.shape, generator=torch.Generator().manual_seed(3)) < 0.2
    labels[is_masked] = ids[is_masked]
    results = []
    for masked_only in (False, True):
        model.zero_grad()
        out = model(ids, labels=labels, masked_logits_only=masked_only)
        out.loss.backward()
        results.append((out, {name: p.grad.clone() for name, p in model.named_parameters()}))
    (full, full_grads), (sparse, sparse_grads) = results
    assert sparse.logits.shape == (int(is_masked.sum()), VOCAB)
    torch.testing.assert_close(sparse.logits, full.logits[is_masked], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sparse.loss, full.loss, rtol=1e-12, atol=0)
    assert sparse_grads.keys() == full_grads.keys()
    for name in full_grads:
        assert relative_error(sparse_grads[name], full_grads[name]) < 1e-10, name
    with pytest.raises(ValueError, match="needs labels"):
        model(ids, masked_logits_only=True)


@pytest.mark.parametrize(
    "overrides", [dict(top_k_experts=5, n_experts=4), dict(top_k_experts=0), dict(embedding_dim=30, num_head=4)]
)
def test_invalid_config_raises(overrides):
    with pytest.raises(ValueError):
        small_config(**overrides)
