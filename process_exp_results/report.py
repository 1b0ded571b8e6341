"""Human-readable outputs of step 4: a token page per MoE layer (HTML) and the run report (Markdown).

The HTML page is self-contained (inline CSS, no scripts, no external links) so it opens anywhere, also offline.
The report links only files that sit beside it, with relative links, so the results folder can be moved.
"""

from __future__ import annotations

import html
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
from matplotlib.colors import to_hex, to_rgb

from config_utils import write_text_atomic
from process_exp_results.formatting import MISSING, format_number, format_p, p_text, with_interval
from process_exp_results.routing_stats import ALPHA, is_specialized, permutations_needed

__all__ = ["expert_colours", "stats_csv_rows", "summary_sentences", "write_report_md", "write_token_html"]

NO_EXPERT_COLOUR = "#d9d9d9"  # expert choice: a token no expert picked


def expert_colours(n_experts: int) -> list[str]:
    """A light background colour per expert (dark text stays readable on it)."""
    cmap = matplotlib.colormaps["tab10" if n_experts <= 10 else "tab20"]
    colours = []
    for expert in range(n_experts):
        rgb = (
            to_rgb(cmap(expert % cmap.N))
            if n_experts <= 20
            else to_rgb(matplotlib.colormaps["hsv"](expert / n_experts))
        )
        colours.append(to_hex([0.45 * c + 0.55 for c in rgb]))  # mix with white
    return colours


PAGE_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; max-width: 70em; color: #222; }
h1 { font-size: 1.3em; } h2 { font-size: 1.05em; margin: 1.4em 0 0.4em; }
.legend span, .doc span { display: inline-block; padding: 0.1em 0.25em; margin: 0.1em 0; border-radius: 3px; }
.legend span { margin-right: 0.4em; font-weight: 600; }
.doc { line-height: 1.9; font-family: ui-monospace, monospace; font-size: 0.92em; }
.doc span.cont { margin-left: -0.15em; }
.note { color: #555; font-size: 0.9em; }
"""


def write_token_html(path: str | os.PathLike, documents: Sequence[Mapping], layer_name: str, n_experts: int) -> Path:
    """One page of sample documents, every token a span coloured by the expert its router picked.

    Args:
        documents: each {"label": str, "tokens": [token strings], "experts": [expert per token, -1 = none]}.
        layer_name: e.g. "block 0".
        n_experts: experts in the layer (for the legend).
    Hovering a token shows its expert and the token as the tokenizer wrote it (title attribute).
    """
    colours = expert_colours(n_experts)
    legend = " ".join(
        f'<span style="background:{colour}">expert {expert}</span>' for expert, colour in enumerate(colours)
    )
    legend += f' <span style="background:{NO_EXPERT_COLOUR}">no expert</span>'
    sections = []
    for document in documents:
        spans = []
        for token, expert in zip(document["tokens"], document["experts"]):
            expert = int(expert)
            colour = colours[expert] if 0 <= expert < n_experts else NO_EXPERT_COLOUR
            who = f"expert {expert}" if expert >= 0 else "no expert"
            continuation = token.startswith("##") and len(token) > 2
            shown = token[2:] if continuation else token
            css_class = ' class="cont"' if continuation else ""
            space = "" if continuation or not spans else " "  # a ## piece is drawn against the piece before it
            spans.append(
                f'{space}<span{css_class} style="background:{colour}" '
                f'title="{html.escape(who + ": " + token, quote=True)}">{html.escape(shown)}</span>'
            )
        sections.append(f'<h2>{html.escape(str(document["label"]))}</h2>\n<div class="doc">{"".join(spans)}</div>')
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Tokens by expert, {html.escape(layer_name)}</title>
<style>{PAGE_STYLE}</style>
</head>
<body>
<h1>Which expert each token went to: {html.escape(layer_name)}</h1>
<p class="note">Sample documents (unmasked text), each token coloured by its router's top expert. Word pieces
that continue a word (## pieces) are drawn attached to it. Hover a token for its expert.</p>
<p class="legend">{legend}</p>
{chr(10).join(sections)}
</body>
</html>
"""
    return write_text_atomic(path, page)


def _markdown_table(columns: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


METRIC_COLUMNS = [
    ("group", "group"),
    ("documents", "documents"),
    ("real_tokens", "real tokens"),
    ("mlm_loss", "MLM loss"),
    ("accuracy", "accuracy"),
    ("majority_accuracy", "baseline accuracy"),
    ("perplexity", "perplexity"),
]


def write_report_md(
    path: str | os.PathLike,
    run_info: Mapping,
    metric_rows: Sequence[Mapping],
    stats: Mapping | None,
    figure_paths: Sequence[str | os.PathLike],
    other_files: Sequence[str | os.PathLike] = (),
    ablation: Mapping | None = None,
) -> Path:
    """The run report: run settings, metrics table, figures, and what the routing statistics say.

    Args:
        path: report.md to write; figure_paths and other_files are relative to its folder.
        run_info: a few "name: value" facts about the run (tag, model shape, data), shown as a list.
        metric_rows: step 4's metrics.csv rows.
        stats: analyze_routing's result, or None when the routing analysis was skipped.
        figure_paths: PNGs to embed; other_files: files to link (token pages, statistics).
        ablation: process_exp_results.ablation.ablation_statistics' result, or None when it did not run.
    """
    lines = [f"# Run report: {run_info.get('run', '')}", ""]
    lines += [f"- {key}: {value}" for key, value in run_info.items() if key != "run"]
    lines += ["", "## Masked-language-model metrics", ""]
    lines += _markdown_table(
        [title for _, title in METRIC_COLUMNS],
        [[format_number(row[key]) for key, _ in METRIC_COLUMNS] for row in metric_rows],
    )
    lines += ["", "Baseline accuracy: always predicting the group's most frequent masked token.", ""]

    if stats is not None:
        lines += _routing_section(stats)
        lines += consistency_section(stats.get("consecutive"))
    lines += ablation_section(ablation)
    if stats is not None:
        lines += saturation_section(stats.get("saturation"))
    else:
        lines += ["## Routing analysis", "", "Skipped (--no-routing-stats, or the model has no MoE layer).", ""]

    if figure_paths:
        lines += ["## Figures", ""]
        for figure in figure_paths:
            figure = Path(figure).as_posix()
            lines += [f"![{Path(figure).stem.replace('_', ' ')}]({figure})", ""]
    if other_files:
        lines += ["## Files", ""]
        lines += [f"- [{Path(name).as_posix()}]({Path(name).as_posix()})" for name in other_files]
        lines.append("")
    return write_text_atomic(path, "\n".join(lines))


def ablation_sentence(layer: str, entry: Mapping, alpha: float = 0.01) -> str:
    """The layer's ablation in words: the expert that matters most on the test split, and which depend on topic or
    token class."""
    test = {
        expert: by_group["test"]
        for expert, by_group in entry["experts"].items()
        if by_group.get("test", {}).get("delta") is not None
    }
    if not test:
        return f"{layer}: expert ablation: no masked test tokens."
    worst = max(test, key=lambda expert: test[expert]["delta"])
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


def ablation_section(ablation: Mapping | None) -> list[str]:
    """Per layer: the MLM loss increase of every group when each expert is disabled, and whether it depends on topic
    or token class (permutation p-values)."""
    if not ablation:
        return []
    lines = [
        "## Expert ablation (causal evidence)",
        "",
        "Each expert disabled in turn (its tokens go to their next choice), the MLM loss measured on the same "
        "masked positions: the increase in nats per masked token with a 95% document-bootstrap interval. The "
        "topic p-value asks whether the increase differs between the seen topics (labels shuffled among "
        "documents), the class p-value whether it differs between token classes.",
        "",
    ]
    n_perm = (ablation.get("settings") or {}).get("n_permutations")
    for layer, entry in ablation.items():
        if not layer.startswith("block "):
            continue
        experts = entry["experts"]
        groups = list(next(iter(experts.values())))
        rows = []
        for expert, by_group in experts.items():
            cells = [with_interval(by_group[group]["delta"], by_group[group]["ci"], signed=True) for group in groups]
            rows.append(
                [
                    expert,
                    *cells,
                    format_p(entry["topic_p_value"].get(expert), n_perm),
                    format_p(entry["class_p_value"].get(expert), n_perm),
                ]
            )
        lines += [
            f"### {layer}",
            "",
            ablation_sentence(layer, entry),
            "",
            *_markdown_table(["expert", *groups, "topic p", "class p"], rows),
            "",
        ]
    cost = ablation.get("cost") or {}
    if cost:
        lines += [
            f"Cost: {cost.get('block_forwards')} block forwards instead of {cost.get('naive_block_forwards')} "
            f"(the work below each ablated layer is reused), {cost.get('seconds', 0):.1f} s.",
            "",
        ]
    return lines


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


def consistency_section(consecutive: Mapping | None) -> list[str]:
    if not consecutive:
        return []
    return [
        "## Local routing consistency",
        "",
        "Pairs of neighbouring real tokens of one document. Random routers applied to contextual hidden states "
        "already keep neighbours together (neighbouring hidden states are alike), so the trained router's rate "
        "means something only above theirs.",
        "",
        *[f"- {consistency_sentence(layer, values)}" for layer, values in consecutive.items()],
        "",
    ]


def saturation_sentence(layer: str, values: Mapping) -> str:
    """Whether a layer's routing had settled by the end of training, in words."""
    if values["settled_at"] is not None:
        return (
            f"{layer}: routing settled at step {values['settled_at']}: from then on at least 90% of the probe "
            f"tokens went to the final model's top-1 expert (at the evaluation before the last: "
            f"{values['top1'][-2]:.0%})."
        )
    return (
        f"{layer}: routing was still changing when training stopped: at the evaluation before the last only "
        f"{values['top1'][-2]:.0%} of the probe tokens went to the final model's top-1 expert, so the routing "
        f"analysed here describes a moving target."
    )


def saturation_section(saturation: Mapping | None) -> list[str]:
    lines = ["## Routing over training (saturation)", ""]
    if not saturation:
        return lines + [
            "Not available: the run has fewer than two routing snapshots (trained before they were "
            "recorded, or with a single evaluation).",
            "",
        ]
    lines += [
        "Each evaluation recorded where the first 256 validation sequences' tokens went; agreement is the "
        "share routed to the final model's top-1 expert.",
        "",
    ]
    lines += [f"- {saturation_sentence(layer, values)}" for layer, values in saturation.items()]
    steps = next(iter(saturation.values()))["steps"]
    lines += [
        "",
        *_markdown_table(
            ["layer", *[f"step {step}" for step in steps]],
            [[layer, *[format_number(value, 2) for value in values["top1"]]] for layer, values in saturation.items()],
        ),
        "",
    ]
    return lines


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


def factor_verdict(reference: Mapping | None, p_value: float | None, factor: str, n_perm: int) -> str:
    """What the references allow one to say about one factor in one layer."""
    word, specific = FACTOR_WORDS.get(factor, factor), SPECIFIC.get(factor, factor)
    if reference is None:
        return "no references were computed, so whether this is more than a router that learned nothing is open"
    if reference.get("probe") is not None and reference.get("index") is None:
        return (
            f"the best linear router is within the random routers' band: these hidden states hold no more "
            f"{word} than a router that learned nothing picks up"
        )
    ci = reference.get("index_ci")
    if ci is None:
        return f"no specialization index for {word}"
    if ci[0] > 0:
        if is_specialized(reference, p_value):
            return f"specialized on {word}: more {specific} than random routers on the same hidden states"
        if _too_few_permutations(n_perm):
            return (
                f"index clear of 0, but with {n_perm} permutations no p-value can reach {ALPHA}: rerun with "
                f"--n-perm {permutations_needed(ALPHA)} or more to decide"
            )
        return f"index clear of 0 but the permutation test is not ({p_text(p_value, n_perm)}): not called specialized"
    if ci[1] < 0:
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


def stats_csv_rows(stats: Mapping) -> list[dict]:
    """Flat rows {"layer", "measure", "value", "ci_low", "ci_high", "p_value"} (None where not defined)."""
    rows = []

    def row(layer, measure, value, ci=None, p=None):
        rows.append(
            {
                "layer": layer,
                "measure": measure,
                "value": value,
                "ci_low": None if ci is None else ci[0],
                "ci_high": None if ci is None else ci[1],
                "p_value": p,
            }
        )

    for layer in stats["layers"]:
        name = layer["layer"]
        row(name, "topic_nmi", layer["nmi"], layer["nmi_ci"], layer["p_value"])
        tc = layer["token_class"]
        row(name, "token_class_nmi", tc["nmi"], tc["nmi_ci"], tc["p_value"])
        row(name, "token_id_nmi", layer["token_id"]["nmi"], layer["token_id"]["nmi_ci"])
        ct = layer["conditional_topic"]
        row(name, "conditional_topic_mi", ct["cmi"], ct["cmi_ci"], ct["p_value"])
        row(name, "conditional_topic_mi_excess", ct["cmi_excess"], ct["cmi_excess_ci"], ct["p_value"])
        for topic, value in layer["js"].items():
            row(name, f"js:{topic}", value, layer["js_ci"].get(topic))
        for factor, reference in (layer.get("references") or {}).items():
            if not isinstance(reference, Mapping) or "trained" not in reference:
                continue
            row(name, f"reference:{factor}:trained", reference["trained"])
            for kind in ("random", "random_load_matched"):
                band = reference[kind]
                row(name, f"reference:{factor}:{kind}", band["mean"], [band["low"], band["high"]])
            if reference.get("probe") is not None:
                row(name, f"reference:{factor}:probe", reference["probe"])
                row(name, f"specialization_index:{factor}", reference["index"], reference["index_ci"])
    for topic, shift in (stats.get("held_out_shift") or {}).items():
        for name, value in shift["js"].items():
            row(name, f"held_out_js:{topic}", value, shift["js_ci"].get(name))
        if shift.get("unseen_piece_share") is not None:
            row("", f"held_out_unseen_piece_share:{topic}", shift["unseen_piece_share"])
    return rows


def _routing_section(stats: Mapping) -> list[str]:
    n_perm = int(stats.get("settings", {}).get("n_perm", 0))
    return [
        *_routing_intro(stats),
        *_references_table(stats, n_perm),
        *_conditional_table(stats, n_perm),
        *_held_out_table(stats),
    ]


def _routing_intro(stats: Mapping) -> list[str]:
    """What was analysed, and the plain-language summary."""
    settings = stats.get("settings", {})
    groups = stats.get("groups") or {}
    design = (
        "the held-out topics pooled with the seen ones (--pool-held-out)"
        if groups.get("pooled")
        else "the test split's documents (topics seen in training); the held-out topics are analysed apart"
    )
    return [
        "## Routing analysis",
        "",
        f"{stats['n_tokens']:,} real tokens from {stats['n_documents']:,} documents of {design}; topics: "
        f"{', '.join(stats['topics'])}; {stats['n_experts']} experts, top-{stats['k']} routing. "
        f"Intervals are 95% document-level bootstrap intervals ({settings.get('n_boot', '?')} resamples); "
        f"p-values come from {settings.get('n_perm', '?')} permutations.",
        "",
        "### In plain words",
        "",
        *[f"- {sentence}" for sentence in stats.get("summary", [])],
    ]


def _references_table(stats: Mapping, n_perm: int) -> list[str]:
    """Per layer and factor the trained router against random routers and the best linear router."""
    references = stats.get("settings", {}).get("references")
    lines = ["", "### Against routers that learned nothing, and the best linear router", ""]
    if references is None:
        return lines + ["No references were computed (no router inputs were sampled).", ""]
    lines += [
        f"The same router inputs ({references['n_router_inputs']:,} of {references['n_candidate_tokens']:,} "
        f"tokens, at most {references['max_router_inputs']:,}) through {references['n_random_routers']} "
        "random routers (Gaussian rows with the trained rows' norms), the same routers with biases that "
        "match the trained router's expert loads, and a linear probe fitted on half of the documents and "
        "applied to the other half. Index: 0 = no more than a random router, 1 = as much as the probe.",
        "",
    ]
    rows = []
    for layer in stats["layers"]:
        for factor in ("topic", "token_class", "token_id"):
            reference = (layer.get("references") or {}).get(factor)
            if reference is None:
                continue
            p_value = layer["p_value"] if factor == "topic" else layer[factor].get("p_value")
            rows.append(
                [
                    layer["layer"],
                    FACTOR_WORDS[factor],
                    format_number(reference["trained"]),
                    band_text(reference["random"]),
                    band_text(reference["random_load_matched"]),
                    f"{reference['random_load_matched']['rank']} of {references['n_random_routers'] + 1}",
                    format_number(reference.get("probe")),
                    with_interval(reference.get("index"), reference.get("index_ci"), 2),
                    format_p(p_value, n_perm) if p_value is not None else "",
                    factor_verdict(reference, p_value, factor, n_perm) if factor != "token_id" else "",
                ]
            )
    lines += _markdown_table(
        [
            "layer",
            "factor",
            "trained NMI",
            "random [2.5, 97.5%]",
            "load-matched [2.5, 97.5%]",
            "rank",
            "best linear",
            "index [95% CI]",
            "p",
            "verdict",
        ],
        rows,
    )
    return lines + [""]


def _conditional_table(stats: Mapping, n_perm: int) -> list[str]:
    """Per layer I(expert; topic | token) against its permutation null and random routers, and how to read it."""
    rows = []
    for layer in stats["layers"]:
        ct = layer["conditional_topic"]
        random_cmi = (layer.get("references") or {}).get("conditional_topic")
        rows.append(
            [
                layer["layer"],
                format_number(ct["cmi"]),
                format_number(ct["null_mean"]),
                with_interval(ct["cmi_excess"], ct.get("cmi_excess_ci")),
                format_p(ct.get("p_value"), n_perm),
                band_text(random_cmi["random_load_matched"]) if random_cmi else MISSING,
                ct["explained_by"],
            ]
        )
    return [
        "### Topic signal given the token",
        "",
        *_markdown_table(
            [
                "layer",
                "I(expert; topic \\| token) bits",
                "permutation null mean",
                "excess [95% CI]",
                "p",
                "random routers (loads matched), raw",
                "explained by",
            ],
            rows,
        ),
        "",
        "How to read it: NMI is 0 when the expert says nothing about the factor and 1 when it determines it. "
        "A topic signal can be pure vocabulary (topics use different words, and the router sees words): the "
        "conditional mutual information I(expert; topic | token) measures what is left once the token is "
        "known, and its excess over the permutation null is the part that is not estimator bias. A router "
        "applied to contextual hidden states shows some of it without having learned anything: compare "
        "with the random routers' raw value.",
        "",
    ]


def _held_out_table(stats: Mapping) -> list[str]:
    """Per held-out topic how far its expert mix is from the seen documents', per layer."""
    held_out = stats.get("held_out_shift") or {}
    if not held_out:
        return []
    names = [layer["layer"] for layer in stats["layers"]]
    rows = [
        [
            topic,
            shift["n_documents"],
            shift["n_tokens"],
            MISSING if shift.get("unseen_piece_share") is None else f"{100 * shift['unseen_piece_share']:.1f}%",
            *[
                f"{with_interval(shift['js'][name], shift['js_ci'].get(name))} "
                f"(null {format_number(shift['js_null'].get(name))})"
                for name in names
            ],
        ]
        for topic, shift in held_out.items()
    ]
    return [
        "### Held-out topics (not in training)",
        "",
        *_markdown_table(
            [
                "topic",
                "documents",
                "tokens",
                "tokens absent from training",
                *[f"JS from seen mix, {name}" for name in names],
            ],
            rows,
        ),
        "",
        "Part of a held-out topic's difference is unfamiliar text (word pieces the model never saw "
        "in training), not topic.",
        "",
    ]
