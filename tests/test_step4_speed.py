"""Step 4 at corpus scale: the bf16 forward against float32, and work done once instead of twice (the ablation's
plain pass as the MLM evaluation, the references' random routers reused by the consistency reference)."""

import json

import numpy as np
import pytest
import torch
from datasets import Dataset
from test_ablation import CPU, random_group, tiny_model

from process_exp_results.analysis.ablation import ablation_losses
from process_exp_results.analysis.collect import collect_routing
from process_exp_results.analysis.consistency import analysed_mask, analyze_consistency
from process_exp_results.analysis.phases import PHASE_ORDER, Phases
from process_exp_results.analysis.routers import SelectionRule, draw_random_routers, load_fit_subsample, probe_choices
from process_exp_results.analysis.statistics import analyze_routing
from train.evaluation import evaluate_mlm, mlm_loader

CLASS_OF_ID = np.arange(40) % 3  # three made-up token classes
CLASS_NAMES = ["a", "b", "c"]
ID_TO_TOKEN = [f"t{i}" for i in range(40)]


def topical_groups() -> dict[str, Dataset]:
    """A test split whose two topics use different tokens (a real topic signal), and one held-out topic."""

    def with_unmasked(dataset: Dataset) -> Dataset:
        return dataset.add_column("unmasked_ids", dataset["input_ids"])

    first, second = random_group(24, 1, topics=("a",), high=20), random_group(24, 2, topics=("b",), low=20)
    test = Dataset.from_dict({key: list(first[key]) + list(second[key]) for key in first.column_names})
    return {"test": with_unmasked(test), "held": with_unmasked(random_group(12, 3, topics=("held",)))}


def collected(model, groups, bf16: bool):
    return collect_routing(model, groups, CPU, 8, None, ("held",), 10_000, bf16=bf16)


def test_bf16_collection_keeps_float32_router_inputs_and_the_verdicts():
    model, groups = tiny_model(seed=4, n_encoder_blocks=2), topical_groups()
    records32, sample32 = collected(model, groups, bf16=False)
    records16, sample16 = collected(model, groups, bf16=True)
    assert all(inputs.dtype == np.float32 for inputs in sample16.inputs)
    for inputs32, inputs16 in zip(sample32.inputs, sample16.inputs):
        assert np.abs(inputs16 - inputs32).max() < 0.1 * np.abs(inputs32).max()  # bf16 keeps ~3 digits
    assert np.mean(records16.experts == records32.experts) > 0.9  # a few near-ties flip, no more
    settings = dict(n_boot=40, n_perm=40, router_sample=None)
    stats32 = analyze_routing(records32, CLASS_OF_ID, CLASS_NAMES, ID_TO_TOKEN, **settings)
    stats16 = analyze_routing(records16, CLASS_OF_ID, CLASS_NAMES, ID_TO_TOKEN, **settings)
    for layer32, layer16 in zip(stats32["layers"], stats16["layers"]):
        assert layer16["nmi"] == pytest.approx(layer32["nmi"], abs=0.05)
        assert (layer16["p_value"] <= 0.05) == (layer32["p_value"] <= 0.05)


def test_bf16_ablation_matches_float32_within_tolerance():
    model, groups = tiny_model(seed=5), {"test": random_group(40, 7)}
    exact = ablation_losses(model, groups, CPU, 16)
    fast = ablation_losses(model, groups, CPU, 16, bf16=True)
    assert fast.cost["precision"] == "bf16" and exact.cost["precision"] == "fp32"
    plain32, plain16 = exact.groups["test"], fast.groups["test"]
    assert plain16.plain_sum.sum() == pytest.approx(plain32.plain_sum.sum(), rel=0.02)
    delta32 = (plain32.ablated_sum - plain32.plain_sum).sum(-1) / plain32.count.sum()
    delta16 = (plain16.ablated_sum - plain16.plain_sum).sum(-1) / plain16.count.sum()
    assert np.abs(delta16 - delta32).max() < 0.02 + 0.1 * np.abs(delta32).max()
    assert np.argmax(delta16[0]) == np.argmax(delta32[0])  # the expert that matters most stays the same


@pytest.mark.parametrize("overrides", [{}, {"top_k_experts": 2}, {"router_type": "expert_choice"}])
def test_ablation_plain_pass_is_the_mlm_evaluation(overrides):
    model, dataset = tiny_model(seed=6, **overrides), random_group(37, 8)
    reused = ablation_losses(model, {"test": dataset}, CPU, 16).evaluations["test"]
    again = evaluate_mlm(model, mlm_loader(dataset, 16), CPU)
    assert reused.mlm_loss == pytest.approx(again.mlm_loss, rel=1e-6)
    assert (reused.accuracy, reused.majority_accuracy) == (again.accuracy, again.majority_accuracy)
    assert (reused.masked_tokens, reused.real_tokens) == (again.masked_tokens, again.real_tokens)
    assert torch.equal(reused.expert_counts, again.expert_counts)


@pytest.mark.parametrize("pool_held_out", [False, True])
def test_reused_random_routers_give_the_numbers_of_a_second_draw(pool_held_out):
    model, groups = tiny_model(seed=9, n_encoder_blocks=2), topical_groups()
    records, sample = collect_routing(model, groups, CPU, 8, None, ("held",), 500, sample_held_out=pool_held_out)
    analysed = analysed_mask(records, pool_held_out)
    drawn = [draw_random_routers(sample, analysed, 12, 0, layer) for layer in range(len(sample.inputs))]
    settings = dict(n_boot=20, pool_held_out=pool_held_out, router_sample=sample, n_random_routers=12)
    again = analyze_consistency(records, ID_TO_TOKEN, **settings)
    reused = analyze_consistency(records, ID_TO_TOKEN, **settings, random_routers=drawn)
    assert json.dumps(reused, sort_keys=True) == json.dumps(again, sort_keys=True)
    settings = dict(n_boot=20, n_perm=20, pool_held_out=pool_held_out, router_sample=sample, n_random_routers=12)
    again = analyze_routing(records, CLASS_OF_ID, CLASS_NAMES, ID_TO_TOKEN, **settings)
    reused = analyze_routing(records, CLASS_OF_ID, CLASS_NAMES, ID_TO_TOKEN, **settings, random_routers=drawn)
    assert json.dumps(reused, sort_keys=True) == json.dumps(again, sort_keys=True)


def test_routers_drawn_on_other_tokens_are_refused():
    model, groups = tiny_model(seed=9, n_encoder_blocks=2), topical_groups()
    records, sample = collect_routing(model, groups, CPU, 8, None, ("held",), 500, sample_held_out=True)
    pooled = [draw_random_routers(sample, analysed_mask(records, True), 5, 0, 0)] * 2
    with pytest.raises(ValueError, match="other tokens"):
        analyze_consistency(records, ID_TO_TOKEN, n_boot=5, router_sample=sample, random_routers=pooled)


def test_subsamples_are_capped_and_seeded():
    rng = np.random.default_rng
    batch = np.repeat(np.arange(100), 50)  # 100 forward passes of 50 tokens
    fit = load_fit_subsample(batch, SelectionRule("topk"), rng(1), max_tokens=1000)
    assert len(fit) == 1000 and np.array_equal(fit, load_fit_subsample(batch, SelectionRule("topk"), rng(1), 1000))
    whole = load_fit_subsample(batch, SelectionRule("expert_choice"), rng(1), max_tokens=1000)
    assert len(whole) == 1000 and all(np.sum(batch[whole] == b) in (0, 50) for b in range(100))  # whole passes
    assert load_fit_subsample(batch, SelectionRule("topk"), rng(1), max_tokens=10_000) is None  # all tokens
    # the probe: a capped fit still finds a clean linear factor, and the same seed gives the same choices
    x = torch.as_tensor(rng(2).standard_normal((4000, 8)), dtype=torch.float32)
    labels = (x[:, 0] > 0).numpy().astype(np.int64)
    doc, folds = np.arange(4000) // 20, np.arange(200) % 2
    chosen = probe_choices(x, labels, 2, doc, folds, 4, rng(3), max_fit_tokens=300)
    assert np.mean(chosen == labels) > 0.95 or np.mean(chosen == 1 - labels) > 0.95
    assert np.array_equal(chosen, probe_choices(x, labels, 2, doc, folds, 4, rng(3), max_fit_tokens=300))


def test_phases_add_up_and_keep_step_4s_order():
    phases = Phases(progress=False)
    for name in ("figures", "references", "collection", "references"):
        with phases(name, total=1) as bar:
            bar.update()
    assert list(phases.rounded()) == [name for name in PHASE_ORDER if name in phases.seconds]
    assert all(seconds >= 0 for seconds in phases.rounded().values())
