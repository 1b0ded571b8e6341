"""The token page per MoE layer: sample documents coloured by the expert each token went to. Self-contained (inline
CSS, no scripts, no external links) so it opens anywhere, also offline.
"""

from __future__ import annotations

import html
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
from matplotlib.colors import to_hex, to_rgb

from config_utils import write_text_atomic

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
