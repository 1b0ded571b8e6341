"""Expert ablation (process_exp_results/analysis/ablation.py): disabling an expert, the cached fast path, the statistics."""

import copy
import json

import numpy as np
import pytest
import torch
from datasets import Dataset, concatenate_datasets

from models import MoEEncoderConfig, MoEEncoderForMaskedLM
from process_exp_results.analysis.ablation import ablation_losses, disabled_experts
from process_exp_results.analysis.ablation_statistics import ablation_statistics
from process_exp_results.figures.ablation import plot_ablation
from train.evaluation import evaluate_mlm, mlm_loader

VOCAB = 40
PAD = 0
CPU = torch.device("cpu")


def tiny_model(seed: int = 0, **overrides) -> MoEEncoderForMaskedLM:
    params = dict(
        vocab_size=VOCAB,
        embedding_dim=16,
        seq_len=16,
        num_head=2,
        n_encoder_blocks=3,
        n_experts=4,
        top_k_experts=1,
        moe_dim=16,
        dropout=0.0,
        pad_token_id=PAD,
    )
    params.update(overrides)
    torch.manual_seed(seed)
    return MoEEncoderForMaskedLM(MoEEncoderConfig(**params)).eval()


def random_group(n_docs: int, seed: int, topics=("a", "b"), low: int = 1, high: int = VOCAB) -> Dataset:
    """Documents of varying length (padding after), 30% of the real positions masked (the id kept in the input)."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((n_docs, 16), np.int64)
    mask = np.zeros((n_docs, 16), np.int64)
    labels = np.full((n_docs, 16), -100, np.int64)
    for row in range(n_docs):
        n = int(rng.integers(6, 17))
        ids[row, :n] = rng.integers(low, high, n)
        mask[row, :n] = 1
        chosen = rng.random(n) < 0.3
        chosen[rng.integers(0, n)] = True
        labels[row, :n][chosen] = ids[row, :n][chosen]
    return Dataset.from_dict(
        {
            "input_ids": ids.tolist(),
            "attention_mask": mask.tolist(),
            "labels": labels.tolist(),
            "topic": [topics[row % len(topics)] for row in range(n_docs)],
            "doc_id": list(range(seed * 1000, seed * 1000 + n_docs)),
        }
    )


def constant_feature(model, block: int) -> None:
    """Feature 0 of block's router input is the constant 1 (ln2 weight 0, bias 1): a handle on router biases."""
    ln2 = model.encoder.blocks[block].ln2
    with torch.no_grad():
        ln2.weight[0] = 0.0
        ln2.bias[0] = 1.0


def router_weight(model, block: int) -> torch.Tensor:
    return model.encoder.blocks[block].ffn.router.linear.weight


@pytest.mark.parametrize("top_k", [1, 2])
def test_expert_without_tokens_changes_nothing(top_k):
    model = tiny_model(top_k_experts=top_k)
    constant_feature(model, 1)
    with torch.no_grad():
        router_weight(model, 1)[2, 0] = -1000.0  # expert 2 of block 1 never wins, its probability is exactly 0
    groups = {"test": random_group(12, seed=1)}
    batch = next(iter(mlm_loader(groups["test"], 12)))
    out = model(batch["input_ids"], attention_mask=batch["attention_mask"])
    assert not (out.expert_indices[1] == 2).any()
    losses = ablation_losses(model, groups, CPU, batch_size=5)
    g = losses.groups["test"]
    li = losses.layers.index(1)
    assert np.array_equal(g.token_ablated[li, 2], g.token_plain)
    assert np.array_equal(g.ablated_sum[li, 2], g.plain_sum)
    assert not np.array_equal(g.token_ablated[li, 0], g.token_plain)  # a used expert does matter
    stats = ablation_statistics(losses, n_bootstrap=50, n_permutations=50)
    assert stats["block 1"]["experts"]["2"]["test"] == {"delta": 0.0, "ci": [0.0, 0.0]}


@pytest.mark.parametrize("top_k,gate", [(1, "switch"), (2, "switch"), (2, "mixtral")])
def test_disabling_all_but_one_routes_everything_to_it(top_k, gate):
    model = tiny_model(top_k_experts=top_k, router_gate=gate)
    constant_feature(model, 0)
    forced = copy.deepcopy(model)
    with torch.no_grad():
        router_weight(forced, 0)[3, 0] = 1000.0  # expert 3 wins everywhere with probability exactly 1
    batch = next(iter(mlm_loader(random_group(8, seed=2), 8)))
    keys = set(model.state_dict())
    with torch.no_grad(), disabled_experts(model, 0, [0, 1, 2]):
        ablated = model(batch["input_ids"], attention_mask=batch["attention_mask"])
        assert set(model.state_dict()) == keys  # the switch is never saved or exported
    with torch.no_grad():
        reference = forced(batch["input_ids"], attention_mask=batch["attention_mask"])
    real = batch["attention_mask"]
    assert (ablated.expert_indices[0][..., 0][real] == 3).all()
    assert (reference.expert_indices[0][..., 0][real] == 3).all()
    torch.testing.assert_close(ablated.logits[real], reference.logits[real], rtol=0, atol=1e-6)
    assert model.encoder.blocks[0].ffn.router.disabled_experts is None  # restored


def test_expert_choice_disabled_expert_takes_no_tokens():
    """Expert choice: disabling e equals e returning 0 (its w_out and b_out zeroed), the other picks unchanged."""
    model = tiny_model(router_type="expert_choice", capacity_factor=1.0)
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        zeroed.encoder.blocks[1].ffn.experts.w_out[1] = 0.0
        zeroed.encoder.blocks[1].ffn.experts.b_out[1] = 0.0
    batch = next(iter(mlm_loader(random_group(8, seed=3), 8)))
    with torch.no_grad(), disabled_experts(model, 1, 1):
        ablated = model(batch["input_ids"], attention_mask=batch["attention_mask"])
    with torch.no_grad():
        reference = zeroed(batch["input_ids"], attention_mask=batch["attention_mask"])
        plain = model(batch["input_ids"], attention_mask=batch["attention_mask"])
    real = batch["attention_mask"]
    torch.testing.assert_close(ablated.logits[real], reference.logits[real], rtol=0, atol=1e-6)
    assert not torch.allclose(ablated.logits[real], plain.logits[real])


def topic_expert_model() -> MoEEncoderForMaskedLM:
    """One MoE block; topic A's tokens (ids 4..13) go to expert 0, topic B's (14..23) to expert 1, and only
    those experts make the token recoverable.

    Embedding of an A token v: 3 e_v + 60 e_1 (B: 3 e_v + 60 e_2); attention and positions are zeroed, so a
    token sees only itself. The router reads dims 1 and 2 (huge logits: probabilities exactly 0 or 1). Without
    its expert the hidden state is dominated by the topic direction and the head (identity dense, tied decoder)
    cannot tell the topic's tokens apart; expert 0 (1) amplifies the token's own direction e_v.
    """
    model = tiny_model(n_encoder_blocks=1, embedding_dim=32, moe_dim=32, vocab_size=VOCAB)
    d = 32
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        emb = model.encoder.token_embedding.weight  # tied to the decoder
        for v in range(VOCAB):
            emb[v, v % d] = 3.0 if v >= 4 else 1.0
        emb[4:14, 1] += 60.0
        emb[14:24, 2] += 60.0
        block = model.encoder.blocks[0]
        for norm in (block.ln1, block.ln2, model.encoder.final_norm, model.lm_head.norm):
            norm.weight.fill_(1.0)
        router = block.ffn.router.linear.weight  # [E, d]
        router[0, 1] = 100.0
        router[1, 2] = 100.0
        experts = block.ffn.experts
        for e in (0, 1):
            experts.w_in[e] = torch.eye(d)
            experts.w_in[e, 1, 1] = experts.w_in[e, 2, 2] = 0.0
            experts.w_out[e] = 2000.0 * torch.eye(d)
        model.lm_head.dense.weight.copy_(torch.eye(d))
    return model


def test_expert_that_carries_a_topic_raises_only_that_topics_loss():
    model = topic_expert_model()
    a_docs = random_group(16, seed=4, topics=("A",), low=4, high=14)
    b_docs = random_group(16, seed=5, topics=("B",), low=14, high=24)
    test = concatenate_datasets([a_docs, b_docs])
    groups = {"test": test, "alpha": a_docs, "beta": b_docs}
    losses = ablation_losses(model, groups, CPU, batch_size=8)
    stats = ablation_statistics(losses, n_bootstrap=200, n_permutations=200, seed=1)
    layer = stats["block 0"]
    assert stats["plain"]["alpha"]["loss"] < 0.5  # with its expert the topic's tokens are predicted
    alpha, beta = layer["experts"]["0"]["alpha"], layer["experts"]["0"]["beta"]
    assert alpha["delta"] > 1.0 and alpha["ci"][0] > 1.0
    assert beta["delta"] == 0.0
    assert layer["experts"]["1"]["beta"]["delta"] > 1.0 and layer["experts"]["1"]["alpha"]["delta"] == 0.0
    assert layer["experts"]["2"]["alpha"]["delta"] == 0.0 and layer["experts"]["2"]["beta"]["delta"] == 0.0
    deltas = layer["topic_deltas"]["0"]
    assert deltas["A"] > 1.0 and deltas["B"] == 0.0
    assert layer["topic_p_value"]["0"] <= 2 / 201
    assert layer["topic_p_value"]["2"] is not None and layer["topic_p_value"]["2"] > 0.5  # no effect at all


@pytest.mark.parametrize(
    "overrides",
    [
        dict(top_k_experts=1),
        dict(top_k_experts=2, moe_every=2, n_encoder_blocks=4),
        dict(router_type="expert_choice", capacity_factor=1.0),
    ],
)
def test_cached_path_equals_full_forward(overrides):
    model = tiny_model(seed=3, **overrides)
    groups = {"test": random_group(11, seed=6), "held": random_group(5, seed=7, topics=("h",))}
    fast = ablation_losses(model, groups, CPU, batch_size=4)
    slow = ablation_losses(model, groups, CPU, batch_size=4, reuse_below=False)
    assert fast.layers == slow.layers == model.config.moe_layer_indices
    for name in groups:
        f, s = fast.groups[name], slow.groups[name]
        np.testing.assert_allclose(f.token_ablated, s.token_ablated, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(f.token_plain, s.token_plain)
        np.testing.assert_array_equal(f.count, s.count)
        # the plain losses are the plain evaluation's
        reference = evaluate_mlm(model, mlm_loader(groups[name], 4), CPU)
        assert f.count.sum() == reference.masked_tokens
        assert f.plain_sum.sum() / f.count.sum() == pytest.approx(reference.mlm_loss, rel=1e-6)
    n_blocks, n_exp = model.config.n_encoder_blocks, model.config.n_experts
    layers = model.config.moe_layer_indices
    batches = fast.cost["n_batches"]
    assert fast.cost["block_forwards"] == batches * (n_blocks + n_exp * sum(n_blocks - b for b in layers))
    assert (
        slow.cost["block_forwards"]
        == fast.cost["naive_block_forwards"]
        == batches * (n_blocks + n_exp * len(layers) * n_blocks)
    )


def test_same_seed_same_result_and_json_shape(tmp_path):
    model = tiny_model(seed=1, top_k_experts=2)
    groups = {"test": random_group(20, seed=8, topics=("a", "b", "c")), "held": random_group(6, seed=9, topics=("h",))}
    token_class = np.arange(VOCAB) % 3
    names = ["x", "y", "z"]

    def run(seed):
        losses = ablation_losses(model, groups, CPU, batch_size=6)
        out = ablation_statistics(losses, token_class, names, n_bootstrap=100, n_permutations=100, seed=seed)
        out.pop("cost")
        return out

    first, second, other = run(0), run(0), run(5)
    assert first == second
    assert first != other
    json.dumps(first)
    for layer in ("block 0", "block 1", "block 2"):
        entry = first[layer]
        assert set(entry["experts"]) == {"0", "1", "2", "3"}
        for e, per_group in entry["experts"].items():
            assert set(per_group) == {"test", "held"}
            for value in per_group.values():
                assert value["ci"][0] <= value["delta"] <= value["ci"][1]
            assert 0 < entry["topic_p_value"][e] <= 1 and 0 < entry["class_p_value"][e] <= 1
            assert set(entry["class_deltas"][e]) == set(names)
            assert set(entry["topic_deltas"][e]) == {"a", "b", "c"}
    assert plot_ablation(first, "block 0", tmp_path / "ablation_block 0.png").stat().st_size > 0


@pytest.mark.parametrize("value", [0.0, 0.3, -0.2, None])
def test_plot_ablation_with_constant_or_one_sided_values(tmp_path, value):
    ablation = {
        "block 0": {
            "experts": {
                str(e): {"test": {"delta": value if e else 0.0, "ci": None}, "topic": {"delta": value, "ci": None}}
                for e in range(3)
            }
        }
    }
    assert plot_ablation(ablation, "block 0", tmp_path / "a.png").exists()


def test_ablation_sentence_names_the_expert_that_matters_and_the_tests():
    from process_exp_results.report.markdown import ablation_section
    from process_exp_results.report.sentences import ablation_sentence

    entry = {
        "experts": {
            "0": {"test": {"delta": 0.01, "ci": [0.0, 0.02]}, "a": {"delta": 0.3, "ci": [0.2, 0.4]}},
            "1": {"test": {"delta": 0.2, "ci": [0.1, 0.3]}, "a": {"delta": None, "ci": None}},
        },
        "topic_p_value": {"0": 0.005, "1": 0.5},
        "class_p_value": {"0": None, "1": 0.2},
    }
    sentence = ablation_sentence("block 0", entry)
    assert "disabling expert 1 raises the test loss most, by +0.200" in sentence
    assert "depends on topic (p <= 0.01) for expert 0" in sentence
    assert "for no expert does it depend on token class" in sentence
    table = "\n".join(ablation_section({"block 0": entry, "cost": {}}))
    assert "| 1 | +0.200 [0.100, 0.300] | n/a | 0.5 | 0.2 |" in table  # p-values as p-values
