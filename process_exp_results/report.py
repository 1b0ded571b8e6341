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

__all__ = ["expert_colours", "write_report_md", "write_token_html"]

NO_EXPERT_COLOUR = "#d9d9d9"  # expert choice: a token no expert picked


def expert_colours(n_experts: int) -> list[str]:
    """A light background colour per expert (dark text stays readable on it)."""
    cmap = matplotlib.colormaps["tab10" if n_experts <= 10 else "tab20"]
    colours = []
    for expert in range(n_experts):
        rgb = to_rgb(cmap(expert % cmap.N)) if n_experts <= 20 else to_rgb(matplotlib.colormaps["hsv"](expert / n_experts))
        colours.append(to_hex([0.45 * c + 0.55 for c in rgb]))  # mix with white
    return colours


def _write_text_atomic(path: Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


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
    legend = " ".join(f'<span style="background:{colour}">expert {expert}</span>'
                      for expert, colour in enumerate(colours))
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
            spans.append(f'<span{css_class} style="background:{colour}" '
                         f'title="{html.escape(who + ": " + token, quote=True)}">{html.escape(shown)}</span>')
        sections.append(f"<h2>{html.escape(str(document['label']))}</h2>\n<div class=\"doc\">{' '.join(spans)}</div>")
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
    return _write_text_atomic(Path(path), page)


def _number(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e-3 and value != 0 else f"{value:.{digits}f}"
    return str(value)


def _p(value, n_perm: int) -> str:
    """A permutation p-value; at its floor 1/(n_perm+1) it is an upper bound."""
    if value is None:
        return "n/a"
    return f"≤{value:.2g}" if n_perm and value <= 1.0 / (n_perm + 1) + 1e-12 else f"{value:.2g}"


def _interval(values) -> str:
    if not values:
        return ""
    low, high = values
    return f" [{_number(low)}, {_number(high)}]"


def _markdown_table(columns: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


METRIC_COLUMNS = [("group", "group"), ("documents", "documents"), ("real_tokens", "real tokens"),
                  ("mlm_loss", "MLM loss"), ("accuracy", "accuracy"), ("majority_accuracy", "baseline accuracy"),
                  ("perplexity", "perplexity")]


def write_report_md(path: str | os.PathLike, run_info: Mapping, metric_rows: Sequence[Mapping],
                    stats: Mapping | None, figure_paths: Sequence[str | os.PathLike],
                    other_files: Sequence[str | os.PathLike] = ()) -> Path:
    """The run report: run settings, metrics table, figures, and what the routing statistics say.

    Args:
        path: report.md to write; figure_paths and other_files are relative to its folder.
        run_info: a few "name: value" facts about the run (tag, model shape, data), shown as a list.
        metric_rows: step 4's metrics.csv rows.
        stats: analyze_routing's result, or None when the routing analysis was skipped.
        figure_paths: PNGs to embed; other_files: files to link (token pages, statistics).
    """
    lines = [f"# Run report: {run_info.get('run', '')}", ""]
    lines += [f"- {key}: {value}" for key, value in run_info.items() if key != "run"]
    lines += ["", "## Masked-language-model metrics", ""]
    lines += _markdown_table([title for _, title in METRIC_COLUMNS], [
        [_number(row[key]) if isinstance(row[key], float) else row[key] for key, _ in METRIC_COLUMNS]
        for row in metric_rows])
    lines += ["", "Baseline accuracy: always predicting the group's most frequent masked token.", ""]

    if stats is not None:
        lines += _routing_section(stats)
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
    return _write_text_atomic(Path(path), "\n".join(lines))


def _routing_section(stats: Mapping) -> list[str]:
    settings = stats.get("settings", {})
    lines = ["## Routing analysis", "",
             f"{stats['n_tokens']:,} real tokens from {stats['n_documents']:,} documents, topics: "
             f"{', '.join(stats['topics'])}; {stats['n_experts']} experts, top-{stats['k']} routing. "
             f"Intervals are 95% document-level bootstrap intervals ({settings.get('n_boot', '?')} resamples); "
             f"p-values come from {settings.get('n_perm', '?')} permutations.", "",
             "### In plain words", ""]
    lines += [f"- {sentence}" for sentence in stats.get("summary", [])]
    lines += ["", "### Per layer", ""]
    rows, n_perm = [], int(settings.get("n_perm", 0))
    for layer in stats["layers"]:
        token_class, token_id, cond = layer["token_class"], layer["token_id"], layer["conditional_topic"]
        rows.append([layer["layer"],
                     f"{_number(layer['nmi'])}{_interval(layer.get('nmi_ci'))}", _p(layer.get("p_value"), n_perm),
                     f"{_number(token_class['nmi'])}{_interval(token_class.get('nmi_ci'))}",
                     f"{_number(token_id['nmi'])}{_interval(token_id.get('nmi_ci'))}",
                     f"{_number(cond['cmi'])}{_interval(cond.get('cmi_ci'))}", _p(cond.get("p_value"), n_perm),
                     cond.get("explained_by", "")])
    lines += _markdown_table(["layer", "topic NMI [95% CI]", "p", "token-class NMI [95% CI]", "token-id NMI [95% CI]",
                              "I(expert; topic \\| token) bits [95% CI]", "p", "topic signal explained by"], rows)
    lines += ["",
              "How to read it: NMI is 0 when the expert says nothing about the factor and 1 when it determines it. "
              "A topic signal can be pure vocabulary (topics use different words, and the router sees words): the "
              "conditional mutual information I(expert; topic | token) measures what is left once the token is "
              "known; \"token identity\" means the topic signal disappears given the token, \"context beyond the "
              "token\" means the same token is routed differently by topic.", ""]
    return lines
