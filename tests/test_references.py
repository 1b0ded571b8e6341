"""References for routing claims on synthetic router inputs with known truth: a router aligned with a topic
direction, a router that learned nothing, load matching, the probe, the conditional-MI excess, the held-out block."""

import numpy as np
import pytest
import torch

from process_exp_results.analysis.records import RoutingRecords
from process_exp_results.analysis.references import Factor, layer_references
from process_exp_results.analysis.routers import (
    RouterSample,
    SelectionRule,
    document_folds,
    expert_loads,
    fit_load_biases,
    merge_classes,
    probe_choices,
    random_router_weights,
)
from process_exp_results.analysis.statistics import analyze_routing
from process_exp_results.analysis.verdicts import is_specialized

TOPK = SelectionRule("topk")


def topic_states(seed, n_docs=40, doc_len=20, d=16, n_topics=4, strength=1.0):
    """Router inputs with a topic direction: x = noise + strength * direction[topic of the document]."""
    rng = np.random.default_rng(seed)
    doc_topic = np.arange(n_docs) % n_topics
    doc = np.repeat(np.arange(n_docs), doc_len)
    topic = doc_topic[doc]
    directions = rng.standard_normal((n_topics, d))
    x = rng.standard_normal((len(doc), d)) + strength * directions[topic]
    return torch.tensor(x, dtype=torch.float32), doc, doc_topic, topic, directions


def references(x, weight, doc, doc_topic, topic, seed=0, n_boot=100, rule=TOPK, batch=None):
    batch = np.zeros(len(doc), dtype=np.int64) if batch is None else batch
    return layer_references(
        x,
        weight,
        rule,
        batch,
        doc,
        doc_topic,
        [Factor("topic", topic, int(topic.max()) + 1)],
        None,
        n_random=50,
        n_boot=n_boot,
        seed=seed,
        layer=0,
    )


def test_a_router_aligned_with_the_topic_direction_has_index_near_1():
    x, doc, doc_topic, topic, directions = topic_states(0)
    reference = references(x, 3 * directions.astype(np.float32), doc, doc_topic, topic)["topic"]
    assert reference["trained"] > reference["random_load_matched"]["high"]
    assert reference["random_load_matched"]["rank"] == 1 and reference["random"]["rank"] == 1
    assert reference["probe"] > 0.7
    assert 0.8 < reference["index"] < 1.2 and reference["index_ci"][0] > 0.5
    assert is_specialized(reference, p_value=0.005) and not is_specialized(reference, p_value=0.02)


def test_a_random_router_is_no_more_specialized_than_random_routers():
    """A router that learned nothing, on hidden states that carry the topic: its index interval covers 0 in at
    least 90% of 50 simulations (about 93% in 200; an interval over documents alone covered it in 44%)."""
    covered = 0
    for seed in range(50):
        x, doc, doc_topic, topic, _ = topic_states(1000 + seed)
        weight = np.random.default_rng(seed).standard_normal((4, 16)).astype(np.float32)
        interval = references(x, weight, doc, doc_topic, topic, seed=seed)["topic"]["index_ci"]
        covered += interval is None or interval[0] <= 0 <= interval[1]  # None: no index, so no claim
    assert covered >= 45


def test_load_matching_reaches_the_target_loads():
    x, *_ = topic_states(2, n_docs=60)
    rng = np.random.default_rng(0)
    logits = x @ torch.tensor(random_router_weights(rng.standard_normal((4, 16)), 8, rng)).reshape(32, 16).T
    logits = logits.view(-1, 8, 4).transpose(0, 1)
    target = torch.tensor([0.55, 0.25, 0.15, 0.05], dtype=torch.float64)
    before = expert_loads(TOPK.top_choice(logits, np.zeros(x.shape[0], dtype=np.int64)), 4)
    assert (before - target).abs().max() > 0.1  # not matched by chance
    biases, error = fit_load_biases(logits, TOPK, np.zeros(x.shape[0], dtype=np.int64), target)
    after = expert_loads(TOPK.top_choice(logits + biases[:, None, :], np.zeros(x.shape[0], dtype=np.int64)), 4)
    assert (after - target).abs().max() <= 0.01
    assert torch.allclose(error, (after - target).abs().max(1).values)


def test_random_rows_have_the_trained_norms():
    trained = np.random.default_rng(1).standard_normal((6, 10)) * np.arange(1, 7)[:, None]
    rows = random_router_weights(trained, 5, np.random.default_rng(2))
    assert rows.shape == (5, 6, 10)
    assert np.allclose(np.linalg.norm(rows, axis=2), np.linalg.norm(trained, axis=1)[None, :], rtol=1e-5)


def test_expert_choice_rule_takes_each_experts_capacity_per_forward_pass():
    logits = torch.randn(3, 40, 4, generator=torch.Generator().manual_seed(0))
    batch = np.repeat([0, 1], [24, 16])
    choice = SelectionRule("expert_choice", top_k=1, capacity_factor=1.0).top_choice(logits, batch)
    for start, end in ((0, 24), (24, 40)):
        probs = torch.softmax(logits[:, start:end], -1)
        capacity = (end - start) // 4
        for router in range(3):
            picked = torch.zeros(end - start, 4, dtype=torch.bool)
            for expert in range(4):
                picked[probs[router, :, expert].topk(capacity).indices, expert] = True
            expected = torch.where(picked.any(1), probs[router].masked_fill(~picked, -1).argmax(1), 4)
            assert torch.equal(choice[router, start:end], expected)


def test_merge_classes_keeps_the_classes_a_probe_confuses_together():
    # predicted classes 0/1 are confused with each other, as are 2/3; 4 stands alone
    joint = np.diag([50.0, 50, 50, 50, 50])
    joint[0, 1] = joint[1, 0] = joint[2, 3] = joint[3, 2] = 40
    groups = merge_classes(joint, 3)
    assert groups[0] == groups[1] and groups[2] == groups[3] and len({groups[0], groups[2], groups[4]}) == 3
    assert sorted(set(merge_classes(joint, 5).tolist())) == [0, 1, 2, 3, 4]


def test_the_probe_is_scored_only_on_documents_it_was_not_fitted_on():
    """Labels that are pure noise per document: a probe scored in-sample would memorize them; cross-fitted, it
    cannot beat chance on the other half."""
    rng = np.random.default_rng(3)
    n_docs, doc_len = 40, 30
    doc = np.repeat(np.arange(n_docs), doc_len)
    doc_label = rng.integers(0, 2, n_docs)
    doc_code = rng.standard_normal((n_docs, 8))  # every document its own location: memorizable
    x = torch.tensor(doc_code[doc] + 0.1 * rng.standard_normal((len(doc), 8)), dtype=torch.float32)
    folds = document_folds(doc_label, np.random.default_rng(0))
    assert set(np.bincount(folds)) == {20}
    predicted = probe_choices(x, doc_label[doc], 2, doc, folds, n_experts=4)
    accuracy = np.mean(predicted == doc_label[doc])
    assert 0.3 < accuracy < 0.75


def test_references_are_deterministic_for_a_seed():
    x, doc, doc_topic, topic, _ = topic_states(4)
    weight = np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)
    first = references(x, weight, doc, doc_topic, topic, seed=7)
    assert references(x, weight, doc, doc_topic, topic, seed=7) == first
    assert references(x, weight, doc, doc_topic, topic, seed=8)["topic"]["random"] != first["topic"]["random"]


# --------------------------------------------------------------------------------------- through analyze_routing


def records_with_states(seed, topic_strength=1.0, n_docs=40, doc_len=20, held_out_docs=0, vocab=30):
    """Routing records whose router inputs carry a topic direction, routed by a random router (k=1, 4 experts);
    held_out_docs more documents of a fifth topic, marked held out, with tokens from a vocabulary of their own."""
    x, doc, doc_topic, topic, _ = topic_states(
        seed, n_docs=n_docs + held_out_docs, doc_len=doc_len, strength=topic_strength, n_topics=5
    )
    rng = np.random.default_rng(seed)
    topic = np.where(doc < n_docs, doc_topic[doc] % 4, 4)
    held_out = doc >= n_docs
    token_id = np.where(held_out, vocab + rng.integers(0, 10, len(doc)), rng.integers(0, vocab, len(doc)))
    weight = rng.standard_normal((4, 16)).astype(np.float32)
    experts = (x.numpy() @ weight.T).argmax(1)[:, None, None]
    records = RoutingRecords(
        doc_id=doc,
        topic=topic,
        topic_names=["a", "b", "c", "d", "new"],
        token_id=token_id,
        position=np.tile(np.arange(doc_len), len(np.unique(doc))).astype(np.int32),
        experts=experts,
        layer_names=["block 0"],
        n_experts=4,
        held_out=held_out,
    )
    seen_rows = np.flatnonzero(~held_out)
    sample = RouterSample(
        rows=seen_rows,
        batch=np.zeros(len(seen_rows), dtype=np.int64),
        inputs=[x.numpy()[seen_rows]],
        weights=[weight],
        rule=TOPK,
        n_candidates=len(seen_rows),
        max_tokens=len(seen_rows),
    )
    return records, sample, vocab + 10


def test_analysis_reads_every_factor_against_its_references():
    records, sample, vocab = records_with_states(5)
    stats = analyze_routing(
        records,
        np.arange(vocab) % 3,
        ["x", "y", "z"],
        [f"t{i}" for i in range(vocab)],
        n_boot=50,
        n_perm=50,
        router_sample=sample,
        n_random_routers=20,
    )
    references = stats["layers"][0]["references"]
    assert set(references) == {"topic", "token_class", "token_id", "conditional_topic", "load_match_max_error"}
    # the trained router on the sample is the records' own routing: the same NMI as the analysis reports
    assert references["topic"]["trained"] == pytest.approx(stats["layers"][0]["nmi"])
    assert references["token_id"]["probe"] is None and references["token_id"]["index"] is None
    assert references["load_match_max_error"] <= 0.01
    assert stats["settings"]["references"]["n_random_routers"] == 20


def test_conditional_mi_excess_averages_zero_without_a_topic_effect():
    """Experts random given the token (topics favour different tokens): the excess over the null is bias-free."""
    excesses = []
    for seed in range(30):
        rng = np.random.default_rng(50 + seed)
        n_docs, doc_len = 60, 60
        doc_topics = rng.permutation(np.arange(n_docs) % 4)
        doc = np.repeat(np.arange(n_docs), doc_len)
        topic = doc_topics[doc]
        favourite = np.array([rng.permutation(30) for _ in range(4)])
        zipf = 1.0 / np.arange(1, 31) ** 1.2
        tokens = favourite[topic, rng.choice(30, size=len(doc), p=zipf / zipf.sum())]
        records = RoutingRecords(
            doc_id=doc,
            topic=topic,
            topic_names=list("abcd"),
            token_id=tokens,
            position=np.tile(np.arange(doc_len), n_docs).astype(np.int32),
            experts=rng.integers(0, 4, len(doc))[:, None, None],
            layer_names=["block 0"],
            n_experts=4,
        )
        stats = analyze_routing(
            records, np.zeros(30, dtype=np.int64), ["w"], [str(i) for i in range(30)], n_boot=20, n_perm=100, seed=seed
        )
        excesses.append(stats["layers"][0]["conditional_topic"]["cmi_excess"])
    excesses = np.array(excesses)
    assert abs(excesses.mean()) <= 2 * excesses.std(ddof=1) / np.sqrt(len(excesses))


def test_held_out_topics_are_analysed_apart():
    records, sample, vocab = records_with_states(6, held_out_docs=10)
    args = (np.zeros(vocab, dtype=np.int64), ["w"], [f"t{i}" for i in range(vocab)])
    train_ids = np.arange(30)  # the held-out topic's own 10 tokens never occur in training
    stats = analyze_routing(records, *args, n_boot=30, n_perm=20, train_token_ids=train_ids)
    assert stats["groups"] == {"seen": ["a", "b", "c", "d"], "held_out": ["new"], "pooled": False}
    assert stats["topics"] == ["a", "b", "c", "d"] and stats["n_documents"] == 40
    shift = stats["held_out_shift"]["new"]
    assert shift["unseen_piece_share"] == 1.0 and stats["seen_unseen_piece_share"] == 0.0
    assert shift["n_documents"] == 10 and shift["n_tokens"] == 200
    low, high = shift["js_ci"]["block 0"]
    assert low <= shift["js"]["block 0"] <= high
    assert 0 <= shift["js_null"]["block 0"]  # seen documents against each other: the plug-in bias of that size
    pooled = analyze_routing(records, *args, n_boot=30, n_perm=20, pool_held_out=True)
    assert pooled["topics"] == ["a", "b", "c", "d", "new"] and pooled["groups"]["pooled"] is True
    assert pooled["n_documents"] == 50
