"""routing_stats.csv: one row per layer and measure (value, interval, p-value), the flat form of routing_stats.json."""

from __future__ import annotations

from collections.abc import Mapping


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
