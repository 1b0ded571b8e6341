"""The plain-language verdicts of step 4: per layer a sentence per factor (topic, token class, token identity), the
conditional topic information, the ablation, local consistency and saturation; every number with its interval and
read against its references (docs/routing-analysis.md, "How a routing claim is judged").
"""

from __future__ import annotations

from collections.abc import Mapping

from process_exp_results.analysis.verdicts import ALPHA, is_specialized, permutations_needed
from process_exp_results.report.formatting import MISSING, format_number, p_text, share_floor, with_interval


def test_deltas(entry: Mapping | None) -> dict[str, Mapping]:
    """A layer's ablation on the test split: per expert its entry (delta, ci), where the test split had masked
    tokens."""
    return {
        expert: groups["test"]
        for expert, groups in (entry or {}).get("experts", {}).items()
        if groups.get("test", {}).get("delta") is not None
    }


def worst_expert(entry: Mapping | None) -> tuple[str, Mapping] | None:
    """The expert whose removal raises the test loss most, and its test entry; None without test tokens."""
    test = test_deltas(entry)
    if not test:
        return None
    worst = max(test, key=lambda expert: test[expert]["delta"])
    return worst, test[worst]


def ablation_sentence(layer: str, entry: Mapping, alpha: float = 0.01) -> str:
    """The layer's ablation in words: the expert that matters most on the test split, and which depend on topic or
    token class."""
    test = test_deltas(entry)
    if not test:
        return f"{layer}: expert ablation: no masked test tokens."
    worst, _ = worst_expert(entry)
    others = ", ".join(format_number(test[expert]["delta"], signed=True) for expert in test if expert != worst)
    text = (
        f"{layer}: disabling expert {worst} raises the test loss most, by "
        f"{with_interval(test[worst]['delta'], test[worst]['ci'], signed=True)} nats "
        f"(the others: {others})"
    )
    for key, word in (("topic_p_value", "topic"), ("class_p_value", "token class")):
        depends = [expert for expert, value in entry[key].items() if value is not None and value <= alpha]
        text += (
            f"; the increase depends on {word} (p <= {alpha}) for expert{'s' if len(depends) > 1 else ''} "
            f"{', '.join(depends)}"
            if depends
            else f"; for no expert does it depend on {word} (p <= {alpha})"
        )
    return text + "."


def consistency_sentence(layer: str, values: Mapping) -> str:
    """Consecutive tokens sharing their top-1 expert, against chance and against random routers, in words."""
    text = (
        f"{layer}: consecutive tokens share their top-1 expert at a rate of "
        f"{with_interval(values['top1_rate'], values.get('top1_rate_ci'), 2)}, against "
        f"{format_number(values['chance'], 2)} by chance from the loads and "
        f"{format_number(values['within_document_chance'], 2)} if each document's experts were shuffled within it"
    )
    reference = values.get("random_reference")
    if reference:
        band = reference["random_load_matched"]
        text += (
            f"; random routers with its loads on the same hidden states give "
            f"{with_interval(band['mean'], [band['low'], band['high']], 2)} (on the {reference['n_pairs']} "
            f"sampled pairs, where the trained router gives {format_number(reference['trained'], 2)})"
        )
    if values.get("word_piece_rate") is not None:
        text += (
            f"; the pieces of one word share it at {format_number(values['word_piece_rate'], 2)} (chance "
            f"{format_number(values['word_piece_chance'], 2)}, {values['n_word_piece_pairs']} pairs)"
        )
    return text + "."


def saturation_sentence(layer: str, values: Mapping) -> str:
    """Whether a layer's routing had settled by the end of training, in words."""
    if values["settled_at"] is not None:
        return (
            f"{layer}: routing settled at step {values['settled_at']}: from then on at least 90% of the probe "
            f"tokens went to the final model's top-1 expert (at the evaluation before the last: "
            f"{share_floor(values['top1'][-2])})."
        )
    return (
        f"{layer}: routing was still changing when training stopped: at the evaluation before the last only "
        f"{share_floor(values['top1'][-2])} of the probe tokens went to the final model's top-1 expert, so the routing "
        f"analysed here describes a moving target."
    )


FACTOR_WORDS = {"topic": "topic", "token_class": "token class", "token_id": "token identity"}


SPECIFIC = {
    "topic": "topic-specific",
    "token_class": "specific to token class",
    "token_id": "specific to token identity",
}


def band_text(band: Mapping | None) -> str:
    """'mean [2.5%, 97.5%]' of a reference band."""
    return MISSING if band is None else with_interval(band["mean"], [band["low"], band["high"]])


def _too_few_permutations(n_perm: int) -> bool:
    return n_perm < permutations_needed(ALPHA)  # the smallest reachable p-value is above ALPHA: no test can pass


def factor_word(reference: Mapping | None, p_value: float | None, n_perm: int) -> str:
    """The verdict on one factor in one layer, in a word or three: the rule factor_verdict's sentences and step 4's
    table at a glance both follow."""
    if reference is None:
        return "no references"
    if reference.get("probe") is not None and reference.get("index") is None:
        return "not in the hidden states"
    ci = reference.get("index_ci")
    if ci is None:
        return "no index"
    if ci[0] > 0:
        if is_specialized(reference, p_value):
            return "specialized"
        return "undecided (too few permutations)" if _too_few_permutations(n_perm) else "undecided (p)"
    return "below random routers" if ci[1] < 0 else "no more than random routers"


def factor_verdict(reference: Mapping | None, p_value: float | None, factor: str, n_perm: int) -> str:
    """What the references allow one to say about one factor in one layer (factor_word's verdict, in a sentence)."""
    word, specific = FACTOR_WORDS.get(factor, factor), SPECIFIC.get(factor, factor)
    verdict = factor_word(reference, p_value, n_perm)
    if verdict == "no references":
        return "no references were computed, so whether this is more than a router that learned nothing is open"
    if verdict == "not in the hidden states":
        return (
            f"the best linear router is within the random routers' band: these hidden states hold no more "
            f"{word} than a router that learned nothing picks up"
        )
    if verdict == "no index":
        return f"no specialization index for {word}"
    if verdict == "specialized":
        return f"specialized on {word}: more {specific} than random routers on the same hidden states"
    if verdict == "undecided (too few permutations)":
        return (
            f"index clear of 0, but with {n_perm} permutations no p-value can reach {ALPHA}: rerun with "
            f"--n-perm {permutations_needed(ALPHA)} or more to decide"
        )
    if verdict == "undecided (p)":
        return f"index clear of 0 but the permutation test is not ({p_text(p_value, n_perm)}): not called specialized"
    if verdict == "below random routers":
        return f"less {specific} than a router that learned nothing"
    return f"no more {specific} than a router that learned nothing"


def _factor_clause(layer: Mapping, factor: str, n_perm: int) -> str:
    """'topic NMI 0.033 [0.030, 0.036]; random routers ... ; index ...: verdict'."""
    entry = layer if factor == "topic" else layer[factor]
    reference = (layer.get("references") or {}).get(factor)
    text = f"{FACTOR_WORDS[factor]} NMI {with_interval(entry['nmi'], entry.get('nmi_ci'))}"
    if reference is None:
        return f"{text}: {factor_verdict(None, entry.get('p_value'), factor, n_perm)}"
    text += f"; random routers with its loads on the same hidden states {band_text(reference['random_load_matched'])}"
    if reference.get("probe") is not None:
        text += f", best linear router {format_number(reference['probe'])}"
    if reference.get("index") is not None:
        text += f"; index {with_interval(reference['index'], reference.get('index_ci'), 2)}"
    return f"{text}: {factor_verdict(reference, entry.get('p_value'), factor, n_perm)}"


def summary_sentences(stats: Mapping) -> list[str]:
    """One sentence per layer (topic, token class, what the token explains), then one per held-out topic."""
    n_perm = int(stats.get("settings", {}).get("n_perm", 0))
    sentences = []
    for layer in stats["layers"]:
        parts = [_factor_clause(layer, "topic", n_perm), _factor_clause(layer, "token_class", n_perm)]
        ct = layer["conditional_topic"]
        clause = (
            f"given the token, topic adds {with_interval(ct['cmi_excess'], ct.get('cmi_excess_ci'))} bits "
            f"beyond its permutation null (raw {format_number(ct['cmi'])}, "
            f"null {format_number(ct['null_mean'])}, "
            f"{p_text(ct.get('p_value'), n_perm)})"
        )
        clause += f": {EXPLANATIONS[ct['explained_by']]}"
        random_cmi = (layer.get("references") or {}).get("conditional_topic")
        if random_cmi is not None and ct["explained_by"] == "context beyond the token":
            band = random_cmi["random_load_matched"]
            more = "more than" if random_cmi["trained"] > band["high"] else "no more than"
            clause += f", {more} under random routers with its loads on the same hidden states (raw {band_text(band)})"
        parts.append(clause)
        sentence = f"{layer['layer']}: " + "; ".join(parts) + "."
        if _too_few_permutations(n_perm):
            sentence += (
                f" With {n_perm} permutations no p-value can reach {ALPHA}, so no test decides; rerun with "
                f"at least {permutations_needed(ALPHA)} permutations."
            )
        sentences.append(sentence)
    seen_share = stats.get("seen_unseen_piece_share")
    for topic, shift in (stats.get("held_out_shift") or {}).items():
        mixes = " and ".join(
            f"{with_interval(value, shift['js_ci'].get(name))} bits in {name}"
            f" (seen documents among themselves {format_number(shift['js_null'].get(name))})"
            for name, value in shift["js"].items()
        )
        sentence = (
            f"held-out topic {topic} (not in training, analysed apart): its expert mix differs from the seen "
            f"documents' by JS {mixes}"
        )
        if shift.get("unseen_piece_share") is not None:
            sentence += (
                f"; {100 * shift['unseen_piece_share']:.1f}% of its tokens never occur in the training split"
                + (f" (seen documents: {100 * seen_share:.1f}%)" if seen_share is not None else "")
            )
        sentences.append(sentence + ".")
    return sentences


EXPLANATIONS = {
    "context beyond the token": "the same token goes to different experts in different topics",
    "token identity": "the topic signal is explained by which tokens a topic uses",
    "neither": "there is no topic signal beyond the token to explain",
}
