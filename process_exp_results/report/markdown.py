"""report.md: the run's settings, the metrics table, what the routing statistics say (sentences and tables), the
figures and files. It links only files beside it, with relative links, so the results folder can be moved.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from config_utils import write_text_atomic
from process_exp_results.report.formatting import MISSING, format_number, format_p, markdown_table, with_interval
from process_exp_results.report.glance import glance_markdown, layer_verdict
from process_exp_results.report.sentences import (
    FACTOR_WORDS,
    ablation_sentence,
    band_text,
    consistency_sentence,
    factor_verdict,
    saturation_sentence,
)

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
        ablation: process_exp_results.analysis.ablation.ablation_statistics' result, or None when it did not run.
    """
    lines = [f"# Run report: {run_info.get('run', '')}", ""]
    lines += [f"- {key}: {value}" for key, value in run_info.items() if key != "run"]
    lines += ["", "## Masked-language-model metrics", ""]
    lines += markdown_table(
        [title for _, title in METRIC_COLUMNS],
        [[format_number(row[key]) for key, _ in METRIC_COLUMNS] for row in metric_rows],
    )
    lines += ["", "Baseline accuracy: always predicting the group's most frequent masked token.", ""]

    if stats is not None:
        lines += ["## At a glance", "", *glance_markdown(stats, ablation), ""]
        lines += [f"- {layer_verdict(layer, stats, ablation)}" for layer in stats["layers"]] + [""]
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
            *markdown_table(["expert", *groups, "topic p", "class p"], rows),
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
        *markdown_table(
            ["layer", *[f"step {step}" for step in steps]],
            [[layer, *[format_number(value, 2) for value in values["top1"]]] for layer, values in saturation.items()],
        ),
        "",
    ]
    return lines


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
    lines += markdown_table(
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
        *markdown_table(
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
        *markdown_table(
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
