"""Step 4's table at a glance says what the full sentences say: the same verdict rule, the same numbers."""

import pytest

from process_exp_results.report.glance import factor_word, glance_lines, glance_rows
from process_exp_results.report.sentences import factor_verdict


def reference(index, ci, probe=0.9):
    band = {"mean": 0.1, "low": 0.05, "high": 0.2, "rank": 3}
    return {"index": index, "index_ci": ci, "probe": probe, "trained": 0.15, "random_load_matched": band}


CASES = [
    (reference(0.4, [0.2, 0.6]), 0.001, 1000, "specialized"),
    (reference(0.4, [0.2, 0.6]), 0.3, 1000, "undecided (p)"),
    (reference(0.4, [0.2, 0.6]), 0.05, 19, "undecided (too few permutations)"),
    (reference(-0.3, [-0.5, -0.1]), 0.5, 1000, "below random routers"),
    (reference(0.05, [-0.1, 0.2]), 0.001, 1000, "no more than random routers"),
    (reference(None, None), 0.001, 1000, "not in the hidden states"),
    (None, 0.001, 1000, "no references"),
]


@pytest.mark.parametrize("ref,p_value,n_perm,word", CASES)
def test_the_word_and_the_sentence_follow_one_rule(ref, p_value, n_perm, word):
    assert factor_word(ref, p_value, n_perm) == word
    sentence = factor_verdict(ref, p_value, "topic", n_perm)
    expected = {
        "specialized": "specialized on topic",
        "undecided (p)": "not called specialized",
        "undecided (too few permutations)": "no p-value can reach",
        "below random routers": "less topic-specific than a router that learned nothing",
        "no more than random routers": "no more topic-specific than a router that learned nothing",
        "not in the hidden states": "hold no more topic",
        "no references": "no references were computed",
    }[word]
    assert expected in sentence


def stats_with(index_ci, settled_at):
    layer = {
        "layer": "block 0",
        "nmi": 0.2,
        "nmi_ci": [0.18, 0.22],
        "p_value": 0.001,
        "token_class": {"nmi": 0.3, "nmi_ci": [0.28, 0.32], "p_value": 0.001},
        "references": {"topic": reference(0.5, index_ci), "token_class": reference(None, None, probe=None)},
    }
    saturation = {"block 0": {"steps": [100, 200, 300], "top1": [0.5, 0.93, 1.0], "topk": [0.5, 0.93, 1.0]}}
    saturation["block 0"]["settled_at"] = settled_at
    return {"layers": [layer], "settings": {"n_perm": 1000}, "saturation": saturation}


def test_a_row_per_layer_with_the_band_the_index_the_ablation_and_saturation():
    ablation = {
        "block 0": {
            "experts": {
                "0": {"test": {"delta": 0.01, "ci": [0.0, 0.02]}},
                "1": {"test": {"delta": 0.3, "ci": [0.2, 0.4]}},
            }
        }
    }
    (row,) = glance_rows(stats_with([0.3, 0.7], 200), ablation)
    assert row == [
        "block 0",
        "0.200 [0.180, 0.220]",
        "0.100 [0.050, 0.200]",
        "0.50 [0.30, 0.70]",
        "n/a",
        "e1 +0.300 [0.200, 0.400]",
        "yes, step 200",
    ]
    (row,) = glance_rows(stats_with([-0.1, 0.7], None), None)
    assert row[-2:] == ["n/a", "no (93.0%)"]


def test_the_verdict_line_matches_the_row():
    lines = glance_lines(stats_with([0.3, 0.7], None), None)
    verdict = lines[-1]
    assert verdict.startswith("block 0: topic specialized (index 0.50 [0.30, 0.70]); token class no index")
    assert verdict.endswith("routing still changing")
    assert max(len(line) for line in lines[3:-1]) <= 118  # the legend is wrapped
