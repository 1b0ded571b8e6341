"""Step 4's results at a glance: one row per MoE layer (topic NMI, the band of routers that learned nothing, the
topic and token-class specialization indices, the ablation, whether routing had settled) and a one-line verdict
per layer. The full sentences, with every number behind them, stay in report.md."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping

from process_exp_results.report.formatting import MISSING, format_number, markdown_table, share_floor, with_interval
from process_exp_results.report.sentences import factor_word, worst_expert

COLUMNS = ["layer", "topic NMI", "random routers", "topic index", "token-class index", "ablation", "settled?"]


def _index(reference: Mapping | None) -> str:
    if not reference or reference.get("index") is None:
        return MISSING
    return with_interval(reference["index"], reference.get("index_ci"), 2)


def _ablation_cell(ablation_entry: Mapping | None) -> str:
    worst = worst_expert(ablation_entry)
    if worst is None:
        return MISSING
    expert, entry = worst
    return f"e{expert} {with_interval(entry['delta'], entry.get('ci'), signed=True)}"


def _settled_cell(saturation: Mapping | None) -> str:
    if not saturation:
        return MISSING
    if saturation["settled_at"] is not None:
        return f"yes, step {saturation['settled_at']}"
    return f"no ({share_floor(saturation['top1'][-2])})" if len(saturation["top1"]) >= 2 else "no"


def glance_rows(stats: Mapping, ablation: Mapping | None) -> list[list[str]]:
    """One row of COLUMNS per MoE layer."""
    rows = []
    for layer in stats["layers"]:
        name, references = layer["layer"], layer.get("references") or {}
        topic = references.get("topic")
        rows.append(
            [
                name,
                with_interval(layer["nmi"], layer.get("nmi_ci")),
                with_interval(topic["random_load_matched"]["mean"], _band(topic)) if topic else MISSING,
                _index(topic),
                _index(references.get("token_class")),
                _ablation_cell((ablation or {}).get(name)),
                _settled_cell((stats.get("saturation") or {}).get(name)),
            ]
        )
    return rows


def _band(reference: Mapping) -> list[float]:
    band = reference["random_load_matched"]
    return [band["low"], band["high"]]


def layer_verdict(layer: Mapping, stats: Mapping, ablation: Mapping | None) -> str:
    """'block 0: topic no more than random (index 0.09 [-0.12, 0.24]); token class specialized (...); ...'."""
    parts = [factor_finding(layer, stats, factor).split(": ", 1)[1] for factor in ("topic", "token_class")]
    worst = worst_expert((ablation or {}).get(layer["layer"]))
    if worst is not None:
        parts.append(
            f"without expert {worst[0]} the test loss rises {format_number(worst[1]['delta'], signed=True)} nats"
        )
    saturation = (stats.get("saturation") or {}).get(layer["layer"])
    if saturation:
        parts.append("routing settled" if saturation["settled_at"] is not None else "routing still changing")
    return f"{layer['layer']}: " + "; ".join(parts)


def factor_finding(layer: Mapping, stats: Mapping, factor: str = "topic") -> str:
    """'block 0: topic no more than random (index 0.09 [-0.12, 0.24])': a figure's title, the verdict line's words."""
    reference = (layer.get("references") or {}).get(factor)
    p_value = layer.get("p_value") if factor == "topic" else layer[factor].get("p_value")
    text = f"{layer['layer']}: {factor.replace('_', ' ')} {factor_word(reference, p_value, _n_perm(stats))}"
    if reference and reference.get("index") is not None:
        text += f" (index {with_interval(reference['index'], reference.get('index_ci'), 2)})"
    return text


def _n_perm(stats: Mapping) -> int:
    return int(stats.get("settings", {}).get("n_perm", 0))


def glance_lines(stats: Mapping, ablation: Mapping | None) -> list[str]:
    """The console block: the aligned table, what its columns are, and a verdict line per layer."""
    rows = [COLUMNS, *glance_rows(stats, ablation)]
    widths = [max(len(row[column]) for row in rows) for column in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    lines += textwrap.wrap(
        "(topic NMI: of the top expert with the document's topic, 95% interval; random routers: the same NMI of "
        "routers with the trained one's loads that learned nothing, on the same hidden states, mean [2.5%, 97.5%]; "
        "index: 0 = no more than them, 1 = the best linear router; ablation: the expert whose removal raises the test "
        "loss most, in nats; settled: the step from which >= 90% of the probe tokens kept the final model's top-1 "
        "expert, or the share at the evaluation before the last)",
        width=118,
    )
    lines += [layer_verdict(layer, stats, ablation) for layer in stats["layers"]]
    return lines


def glance_markdown(stats: Mapping, ablation: Mapping | None) -> list[str]:
    """The same table for report.md and the README."""
    return markdown_table(COLUMNS, glance_rows(stats, ablation))
