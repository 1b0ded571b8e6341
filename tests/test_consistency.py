"""Local routing consistency (process_exp_results.analysis.consistency) on synthetic routing records with known answers."""

import json

import numpy as np
import pytest

from process_exp_results.analysis.consistency import (
    analyze_consistency,
    consecutive_pairs,
    consecutive_rate,
    continuation_ids,
    random_router_reference,
)
from process_exp_results.analysis.records import RoutingRecords
from process_exp_results.analysis.resampling import GroupShuffler
from process_exp_results.analysis.routers import RouterSample, SelectionRule

VOCAB = [f"tok{i}" for i in range(50)]


def make_records(doc_lengths, experts, n_experts, tokens=None, held_out=None):
    """One layer; experts [n] (k = 1) or [n, k]; documents in order, positions 0..len-1."""
    doc_lengths = np.asarray(doc_lengths)
    doc = np.repeat(np.arange(len(doc_lengths)), doc_lengths)
    experts = np.asarray(experts, dtype=np.int64)
    experts = experts[:, None, None] if experts.ndim == 1 else experts[:, None, :]
    tokens = np.zeros(len(doc), np.int64) if tokens is None else np.asarray(tokens)
    position = np.concatenate([np.arange(n) for n in doc_lengths]).astype(np.int32)
    return RoutingRecords(
        doc_id=doc * 5 + 2,
        topic=np.zeros(len(doc), np.int64),
        topic_names=["t"],
        token_id=tokens,
        position=position,
        experts=experts,
        layer_names=["block 0"],
        n_experts=n_experts,
        held_out=held_out,
    )


def layer(records, **kwargs):
    return analyze_consistency(records, kwargs.pop("id_to_token", VOCAB), **{"n_boot": 100, **kwargs})["block 0"]


def shuffled_rates(records, n_shuffles, seed):
    """Top-1 rate (and top-k overlap / k) with each document's tokens' experts shuffled within the document."""
    experts = records.experts[:, 0, :]
    shuffler, rng = GroupShuffler(records.doc_id), np.random.default_rng(seed)
    first, second = consecutive_pairs(records.doc_id, records.position)
    rates, overlaps = [], []
    for _ in range(n_shuffles):
        order = shuffler.shuffle(np.arange(len(experts)), rng)  # whole tokens move: their top-k sets together
        e = experts[order]
        rates.append(np.mean(e[first, 0] == e[second, 0]))
        overlaps.append(np.mean((e[first][:, :, None] == e[second][:, None, :]).sum((1, 2)) / e.shape[1]))
    return np.array(rates), np.array(overlaps)


def test_chance_matches_shuffled_order_simulation():
    # documents drawing experts from one skewed load: the shuffled order has the loads and nothing else
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 80, 60)
    n, loads = int(lengths.sum()), np.array([0.45, 0.25, 0.15, 0.1, 0.05])
    top1 = rng.choice(5, size=n, p=loads)
    second = (top1 + 1 + rng.choice(4, size=n)) % 5  # a distinct second choice
    records = make_records(lengths, np.stack([top1, second], 1), 5)
    result = layer(records)
    rates, overlaps = shuffled_rates(records, 400, seed=1)
    # Monte Carlo error of the mean of 400 shuffles: 4 standard errors is a 1-in-15,000 false alarm
    mc = 4 * rates.std() / np.sqrt(len(rates))
    # the within-document shuffle's exact expectation
    assert abs(rates.mean() - result["within_document_chance"]) < mc
    # chance from the pooled loads differs from it only by how much the documents' own expert mixes scatter
    # beyond multinomial noise (0 in expectation here); its sd over 40 such worlds was 0.0021 (n ~ 3,000 tokens,
    # 60 documents; largest 0.0064), so 0.008 (4 sd) plus the Monte Carlo error
    assert abs(rates.mean() - result["chance"]) < mc + 0.008
    assert abs(result["chance"] - np.sum(loads**2)) < 0.02
    mc_k = 4 * overlaps.std() / np.sqrt(len(overlaps))
    assert abs(overlaps.mean() - result["topk_within_document_chance"]) < mc_k
    assert abs(overlaps.mean() - result["topk_chance"]) < mc_k + 0.008
    # the observed order is itself a random order here: within 4 binomial sd of chance (over 40 such worlds the
    # excess averaged -0.001 and its interval covered 0 in 38)
    chance = result["chance"]
    assert abs(result["top1_excess"]) < 4 * np.sqrt(chance * (1 - chance) / result["n_pairs"])


def test_within_document_chance_keeps_each_documents_mix():
    # every document prefers its own expert: the pooled load's chance is lower than the within-document shuffle's
    rng = np.random.default_rng(2)
    lengths = np.full(40, 50)
    favourite = np.repeat(np.arange(40) % 4, lengths)
    top1 = np.where(rng.random(lengths.sum()) < 0.7, favourite, rng.integers(0, 4, lengths.sum()))
    records = make_records(lengths, top1, 4)
    result = layer(records)
    rates, _ = shuffled_rates(records, 300, seed=3)
    assert abs(rates.mean() - result["within_document_chance"]) < 4 * rates.std() / np.sqrt(len(rates))
    assert result["chance"] < result["within_document_chance"] - 0.2


def test_one_expert_per_document_gives_rate_one():
    lengths = [10, 7, 12, 9]
    experts = np.repeat([0, 1, 2, 3], lengths)
    result = layer(make_records(lengths, experts, 4))
    assert result["top1_rate"] == 1.0 and result["top1_rate_ci"] == [1.0, 1.0]
    assert result["n_pairs"] == sum(lengths) - len(lengths)
    assert result["chance"] < 0.3
    assert result["topk_overlap"] is None


def test_alternating_experts_give_rate_zero():
    lengths = [11, 8, 15]
    experts = np.concatenate([np.arange(n) % 2 for n in lengths])
    result = layer(make_records(lengths, experts, 2))
    assert result["top1_rate"] == 0.0
    assert result["chance"] == pytest.approx(0.5, abs=0.02)


def test_pairs_never_cross_documents():
    # inside each document the experts alternate; the last token of each document and the first of the next share
    # expert 0: counted across the boundary, the rate would be above 0
    lengths = [5, 5, 5]
    experts = np.array([0, 1, 0, 1, 0, 0, 1, 0, 1, 0, 0, 1, 0, 1, 0])
    records = make_records(lengths, experts, 2)
    result = layer(records)
    assert result["top1_rate"] == 0.0 and result["n_pairs"] == 12
    # the same with rows out of order and documents interleaved: pairs follow (doc_id, position), not row order
    order = np.random.default_rng(0).permutation(len(experts))
    shuffled = records.subset(order)
    assert layer(shuffled)["top1_rate"] == 0.0 and layer(shuffled)["n_pairs"] == 12
    first, second = consecutive_pairs(records.doc_id, records.position)
    assert (records.doc_id[first] == records.doc_id[second]).all()
    assert (records.position[second] == records.position[first] + 1).all()


def test_a_gap_in_positions_breaks_the_pair():
    records = make_records([4], [0, 0, 0, 0], 2)
    records.position[:] = [0, 1, 3, 4]
    assert layer(records)["n_pairs"] == 2


def test_tokens_without_an_expert_drop_their_pairs():
    # expert choice: -1 = no expert took the token; its two pairs are left out, not counted as a mismatch
    result = layer(make_records([5], [0, 0, -1, 1, 1], 2))
    assert result["n_pairs"] == 2 and result["top1_rate"] == 1.0
    assert result["within_document_chance"] == pytest.approx((2 * 1 + 2 * 1) / (4 * 3))


def test_word_piece_pairs_come_from_continuations_only():
    vocab = ["[CLS]", "play", "##ing", "##", "a##b", "##s", "the"]
    assert continuation_ids(vocab).tolist() == [False, False, True, False, False, True, False]
    tokens = np.array([0, 1, 2, 6, 3, 4, 1, 5, 2])  # continuations at rows 2, 7, 8; "##" and "a##b" are not
    experts = np.array([0, 1, 1, 0, 0, 1, 0, 1, 0])  # play->##ing same, play->##s differs, ##s->##ing differs
    result = layer(make_records([9], experts, 2, tokens=tokens), id_to_token=vocab)
    assert result["n_word_piece_pairs"] == 3
    assert result["word_piece_rate"] == pytest.approx(1 / 3)
    # endpoints of the word-piece pairs: (1,1) (0,1) (1,0) -> shares 4/6 and 2/6
    assert result["word_piece_chance"] == pytest.approx((4 / 6) ** 2 + (2 / 6) ** 2)
    # a pair whose first token is the continuation is not a word-piece pair
    tokens2 = np.array([2, 6, 6])
    assert layer(make_records([3], [0, 0, 0], 2, tokens=tokens2), id_to_token=vocab)["n_word_piece_pairs"] == 0


def test_bootstrap_interval_contains_estimate_and_is_seeded():
    rng = np.random.default_rng(5)
    lengths = rng.integers(10, 40, 30)
    n = int(lengths.sum())
    top1 = np.empty(n, np.int64)
    top1[0] = 0
    stay = rng.random(n) < 0.6  # sticky routing: rate well above chance
    draws = rng.integers(0, 4, n)
    for i in range(1, n):
        top1[i] = top1[i - 1] if stay[i] else draws[i]
    tokens = rng.integers(0, 50, n)
    vocab = [f"##p{i}" if i % 3 == 0 else f"w{i}" for i in range(50)]
    records = make_records(lengths, top1, 4, tokens=tokens)
    a = layer(records, id_to_token=vocab, seed=7)
    b = layer(records, id_to_token=vocab, seed=7)
    c = layer(records, id_to_token=vocab, seed=8)
    assert a == b
    assert a["top1_rate_ci"] != c["top1_rate_ci"]
    assert a["top1_rate_ci"][0] < a["top1_rate"] < a["top1_rate_ci"][1]
    assert a["word_piece_rate_ci"][0] <= a["word_piece_rate"] <= a["word_piece_rate_ci"][1]
    assert a["top1_excess_ci"][0] > 0.3  # the sticky part is clear of chance


def test_held_out_documents_are_left_out_unless_pooled():
    lengths = [6, 6]
    experts = np.r_[np.zeros(6), np.arange(6) % 2]
    held_out = np.repeat([False, True], lengths)
    records = make_records(lengths, experts, 2, held_out=held_out)
    assert layer(records)["top1_rate"] == 1.0
    assert layer(records, pool_held_out=True)["top1_rate"] == pytest.approx(5 / 10)


def test_consecutive_rate_for_many_routers():
    doc_id, position = np.array([1, 1, 1, 2, 2]), np.array([0, 1, 2, 0, 1])
    choices = np.array([[0, 0, 1, 1, 1], [0, 1, 0, 1, 0], [0, 3, 3, 3, 3]])
    assert consecutive_rate(choices[0], doc_id, position) == pytest.approx(2 / 3)
    # 3 = "no expert" for a 3-expert layer (SelectionRule's E): router 2 has no pair with both tokens routed
    rates = consecutive_rate(choices, doc_id, position, n_experts=3)
    assert rates[:2] == pytest.approx([2 / 3, 0.0]) and np.isnan(rates[2])


def _states_world(seed, n_docs=30, doc_len=40, d=16, n_experts=4):
    """Router inputs that drift slowly along each document (neighbours alike), routed by a trained-like router."""
    rng = np.random.default_rng(seed)
    steps = rng.standard_normal((n_docs, doc_len, d)).astype(np.float32)
    x = np.cumsum(steps * 0.3, axis=1) + rng.standard_normal((n_docs, 1, d)).astype(np.float32)
    x = x.reshape(-1, d).astype(np.float32)
    weight = rng.standard_normal((n_experts, d)).astype(np.float32)
    top1 = (x @ weight.T).argmax(1)
    records = make_records(np.full(n_docs, doc_len), top1, n_experts)
    return records, x, weight


def test_random_reference_on_the_same_hidden_states():
    records, x, weight = _states_world(3)
    rows = np.arange(len(x))
    sample = RouterSample(
        rows=rows,
        batch=np.zeros(len(rows), np.int64),
        inputs=[x],
        weights=[weight],
        rule=SelectionRule("topk"),
        n_candidates=len(rows),
        max_tokens=len(rows),
    )
    result = analyze_consistency(records, VOCAB, n_boot=20, router_sample=sample, n_random_routers=20)["block 0"]
    reference = result["random_reference"]
    # every token sampled: the trained router's rate on the sampled pairs is the layer's rate
    assert reference["trained"] == pytest.approx(result["top1_rate"])
    assert reference["sampled_pair_share"] == 1.0 and reference["n_pairs"] == result["n_pairs"]
    # random routers on smooth states are locally consistent too: well above the load chance
    assert reference["random"]["mean"] > result["chance"] + 0.2
    assert reference["random"]["low"] <= reference["random"]["mean"] <= reference["random"]["high"]
    assert 1 <= reference["random"]["rank"] <= 21
    again = random_router_reference(records, sample, 0, n_random=20, seed=0)
    assert again == reference
    json.dumps(result)  # JSON-ready


def test_layer_without_pairs_reports_none():
    result = layer(make_records([1, 1], [0, 1], 2))  # one-token documents: no pair
    assert result["n_pairs"] == 0 and result["top1_rate"] is None and result["top1_rate_ci"] is None
    assert result["chance"] is None and result["word_piece_rate"] is None
    json.dumps(result)


def test_random_reference_on_a_sparse_sample_uses_only_sampled_pairs():
    records, x, weight = _states_world(4)
    rows = np.sort(np.random.default_rng(0).choice(len(x), size=len(x) // 2, replace=False))
    sample = RouterSample(
        rows=rows,
        batch=np.zeros(len(rows), np.int64),
        inputs=[x[rows]],
        weights=[weight],
        rule=SelectionRule("topk"),
        n_candidates=len(x),
        max_tokens=len(rows),
    )
    reference = random_router_reference(records, sample, 0, n_random=10, seed=0)
    first, second = consecutive_pairs(records.doc_id, records.position)
    both = np.isin(first, rows) & np.isin(second, rows)
    assert reference["n_pairs"] == both.sum()
    assert 0.15 < reference["sampled_pair_share"] < 0.35  # about (1/2)^2 of the pairs
    top1 = records.experts[:, 0, 0]
    assert reference["trained"] == pytest.approx(np.mean(top1[first[both]] == top1[second[both]]))
