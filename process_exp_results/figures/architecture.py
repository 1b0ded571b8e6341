"""Diagram of the MoE Transformer encoder used for masked language modelling.

Drawn with matplotlib patches and arrows only (no graphviz).  Left: the
encoder stack, bottom to top.  Right: a zoom into one MoE feed-forward layer.

    python process_exp_results/figures/architecture.py [--out images/architecture.png]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

if __name__ == "__main__":
    # Run as a script, sys.path[0] is process_exp_results/; use the repo root so
    # `process_exp_results.*` imports resolve.
    sys.path[0] = str(Path(__file__).resolve().parents[2])

from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Circle, FancyArrowPatch, FancyBboxPatch, Rectangle  # noqa: E402
from matplotlib.path import Path as MplPath  # noqa: E402

from process_exp_results.figures.common import DPI, save_figure_atomic  # noqa: E402

__all__ = ["draw_architecture", "DEFAULT_OUT"]

DEFAULT_OUT = Path(__file__).resolve().parents[2] / "images" / "architecture.png"

# Palette.
C_INPUT = "#ffffff"
C_EMBED = "#dccbf0"
C_NORM = "#e9ecef"
C_ATTN = "#ffd6a5"
C_MOE = "#b9e4c0"
C_HEAD = "#c6dcf5"
C_LOSS = "#f7c5c5"
C_ROUTER = "#c6dcf5"
C_DATA = "#e3e8ef"
C_GATE = "#fff0b0"
C_NOTE = "#fff7e0"
EDGE = "#3d4451"
ARROW = "#3d4451"
RESID = "#6c757d"
ZOOM = "#9aa3ad"

# Canvas in data units == inches.
FIG_W, FIG_H = 17.0, 12.2


def _box(ax, cx, cy, w, h, text, fc, *, fontsize=10.0, ec=EDGE, bold=False, lw=1.2, zorder=3):
    ax.add_patch(
        FancyBboxPatch(
            (cx - w / 2, cy - h / 2),
            w,
            h,
            boxstyle="round,pad=0,rounding_size=0.12",
            facecolor=fc,
            edgecolor=ec,
            linewidth=lw,
            zorder=zorder,
        )
    )
    ax.text(
        cx,
        cy,
        text,
        ha="center",
        va="center",
        fontsize=fontsize,
        fontweight="bold" if bold else "normal",
        color="#1f2328",
        linespacing=1.35,
        zorder=zorder + 1,
    )
    return (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)  # x0, y0, x1, y1


def _arrow(ax, *pts, color=ARROW, lw=1.4, ls="-", head=True, zorder=2):
    """Polyline through ``pts`` with an arrow head at the last point."""
    codes = [MplPath.MOVETO] + [MplPath.LINETO] * (len(pts) - 1)
    ax.add_patch(
        FancyArrowPatch(
            path=MplPath(pts, codes),
            arrowstyle="-|>" if head else "-",
            mutation_scale=14,
            color=color,
            linewidth=lw,
            linestyle=ls,
            zorder=zorder,
        )
    )


def _add(ax, cx, cy, r=0.19):
    ax.add_patch(Circle((cx, cy), r, facecolor="white", edgecolor=EDGE, linewidth=1.3, zorder=3))
    ax.text(cx, cy - 0.01, "+", ha="center", va="center", fontsize=15, fontweight="bold", zorder=4)


def _label(ax, x, y, text, *, fontsize=8.8, color="#4a5058", **kw):
    kw.setdefault("ha", "center")
    kw.setdefault("va", "center")
    ax.text(x, y, text, fontsize=fontsize, color=color, zorder=5, **kw)


@dataclass(frozen=True)
class _StackLayout:
    """Positions of the encoder column (data units == inches): one centre line, two lanes to its left."""

    cx: float = 3.75
    w: float = 4.5
    h: float = 0.56
    lane_res: float = 1.15  # residual connections
    lane_tie: float = 0.38  # weight tying
    add_r: float = 0.19  # radius of the "+" circles (_add's default)
    y_in: float = 0.55
    y_emb: float = 1.45
    y_blk0: float = 2.05
    y_br1: float = 2.35
    y_ln1: float = 2.85
    y_attn: float = 3.8
    y_add1: float = 4.75
    y_br2: float = 5.2
    y_ln2: float = 5.65
    y_ffn: float = 6.6
    y_add2: float = 7.55
    y_blk1: float = 8.3
    y_lnf: float = 8.9
    y_head: float = 9.8
    y_out: float = 10.7

    @property
    def x0(self) -> float:
        return self.cx - self.w / 2


def _draw_stack_input(ax, s: _StackLayout) -> None:
    _box(ax, s.cx, s.y_in, s.w, 0.5, "input ids [B, T]  (+ key padding mask)", C_INPUT, ec="#888888")
    _box(ax, s.cx, s.y_emb, s.w, s.h, "token embedding + position embedding", C_EMBED)


def _draw_block_frame(ax, s: _StackLayout) -> None:
    """The dashed frame around the repeated block, with its title."""
    ax.add_patch(
        FancyBboxPatch(
            (s.x0 - 0.68, s.y_blk0),
            s.w + 1.03,
            s.y_blk1 - s.y_blk0,
            boxstyle="round,pad=0,rounding_size=0.2",
            facecolor="#f7f9fb",
            edgecolor="#8a939c",
            linewidth=1.2,
            linestyle=(0, (5, 3)),
            zorder=0,
        )
    )
    _label(
        ax, s.cx + 0.2, s.y_blk1 - 0.28, "N × pre-LN encoder block", fontsize=10.5, color="#2b3138", fontweight="bold"
    )


def _draw_block_layers(ax, s: _StackLayout):
    """LayerNorm, attention, add, LayerNorm, FFN, add. Returns the FFN box extent."""
    cx, w = s.cx, s.w
    _box(ax, cx, s.y_ln1, w, 0.48, "LayerNorm", C_NORM)
    attn = "bidirectional multi-head self-attention\nSDPA · key padding mask · no causal mask"
    _box(ax, cx, s.y_attn, w, 0.82, attn, C_ATTN)
    _add(ax, cx, s.y_add1)
    _box(ax, cx, s.y_ln2, w, 0.48, "LayerNorm", C_NORM)
    ffn = "MoE FFN  (every moe_every-th block)\ndense FFN otherwise"
    ffn_box = _box(ax, cx, s.y_ffn, w, 0.82, ffn, C_MOE, bold=False)
    _add(ax, cx, s.y_add2)
    return ffn_box


def _draw_stack_output(ax, s: _StackLayout) -> None:
    _box(ax, s.cx, s.y_lnf, s.w, 0.48, "final LayerNorm", C_NORM)
    _box(ax, s.cx, s.y_head, s.w, s.h, "MLM head (weights tied to token embedding)", C_HEAD)
    _box(ax, s.cx, s.y_out, s.w, s.h, "logits [B, T, V]  →  MLM loss (masked positions)", C_LOSS)


def _draw_main_stream(ax, s: _StackLayout) -> None:
    """The arrows up the centre line, each from one box's top edge to the next one's bottom edge."""
    cx, h, r = s.cx, s.h, s.add_r
    _arrow(ax, (cx, s.y_in + 0.25), (cx, s.y_emb - h / 2))
    _arrow(ax, (cx, s.y_emb + h / 2), (cx, s.y_ln1 - 0.24))
    _arrow(ax, (cx, s.y_ln1 + 0.24), (cx, s.y_attn - 0.41))
    _arrow(ax, (cx, s.y_attn + 0.41), (cx, s.y_add1 - r))
    _arrow(ax, (cx, s.y_add1 + r), (cx, s.y_ln2 - 0.24))
    _arrow(ax, (cx, s.y_ln2 + 0.24), (cx, s.y_ffn - 0.41))
    _arrow(ax, (cx, s.y_ffn + 0.41), (cx, s.y_add2 - r))
    _arrow(ax, (cx, s.y_add2 + r), (cx, s.y_lnf - 0.24))
    _arrow(ax, (cx, s.y_lnf + 0.24), (cx, s.y_head - h / 2))
    _arrow(ax, (cx, s.y_head + h / 2), (cx, s.y_out - h / 2))


def _draw_residuals(ax, s: _StackLayout) -> None:
    """Residual connections in the left lane, from each branch point to its "+"."""
    for y_br, y_add in ((s.y_br1, s.y_add1), (s.y_br2, s.y_add2)):
        ax.add_patch(Circle((s.cx, y_br), 0.045, color=RESID, zorder=4))
        _arrow(ax, (s.cx, y_br), (s.lane_res, y_br), (s.lane_res, y_add), (s.cx - s.add_r, y_add), color=RESID, lw=1.3)
    _label(ax, s.lane_res - 0.17, (s.y_br1 + s.y_add1) / 2, "residual", rotation=90, fontsize=8.5)
    _label(ax, s.lane_res - 0.17, (s.y_br2 + s.y_add2) / 2, "residual", rotation=90, fontsize=8.5)


def _draw_weight_tying(ax, s: _StackLayout) -> None:
    """Weight tying between the head and the embedding (far-left lane, dashed, both ways)."""
    x0 = s.x0
    ax.add_patch(
        FancyArrowPatch(
            path=MplPath(
                [(x0, s.y_head), (s.lane_tie, s.y_head), (s.lane_tie, s.y_emb), (x0, s.y_emb)],
                [MplPath.MOVETO, MplPath.LINETO, MplPath.LINETO, MplPath.LINETO],
            ),
            arrowstyle="<|-|>",
            mutation_scale=12,
            color="#5b7db1",
            linewidth=1.3,
            linestyle=(0, (4, 3)),
            zorder=1,
        )
    )
    _label(
        ax,
        s.lane_tie - 0.16,
        (s.y_emb + s.y_head) / 2,
        "tied weights (same matrix)",
        rotation=90,
        fontsize=8.5,
        color="#3c5f95",
    )


def _encoder_stack(ax):
    """Left column: the encoder, bottom to top. Returns the MoE FFN box extent."""
    s = _StackLayout()
    _draw_stack_input(ax, s)
    _draw_block_frame(ax, s)
    ffn_box = _draw_block_layers(ax, s)
    _draw_stack_output(ax, s)
    _draw_main_stream(ax, s)
    _draw_residuals(ax, s)
    _draw_weight_tying(ax, s)
    return ffn_box


@dataclass(frozen=True)
class _ZoomLayout:
    """Positions of the MoE FFN panel: the panel's corners, a token column and a router column."""

    px0: float = 7.0
    py0: float = 0.3
    px1: float = 16.75
    py1: float = 10.95
    mx: float = 9.85  # main (token) column
    mw: float = 3.9
    rx: float = 14.6  # router column
    rw: float = 3.7
    h: float = 0.62
    y_tok: float = 1.2
    y_soft: float = 2.3
    y_sort: float = 3.45
    y_exp0: float = 4.3
    y_exp1: float = 6.2
    y_scale: float = 6.95
    y_comb: float = 7.9
    y_out: float = 8.85


def _draw_zoom_panel(ax, z: _ZoomLayout, ffn_box) -> None:
    """The panel, its title, and the dashed zoom lines from the stack's MoE FFN box to it."""
    px0, py0, px1, py1 = z.px0, z.py0, z.px1, z.py1
    ax.add_patch(
        FancyBboxPatch(
            (px0, py0),
            px1 - px0,
            py1 - py0,
            boxstyle="round,pad=0,rounding_size=0.25",
            facecolor="#fbfcfd",
            edgecolor=ZOOM,
            linewidth=1.4,
            zorder=0,
        )
    )
    ax.text(
        (px0 + px1) / 2,
        py1 - 0.35,
        "inside an MoE FFN layer",
        ha="center",
        va="center",
        fontsize=12.5,
        fontweight="bold",
        color="#2b3138",
        zorder=5,
    )
    fx0, fy0, fx1, fy1 = ffn_box
    for (ax0, ay0), (ax1, ay1) in (((fx1, fy1), (px0, py1 - 0.25)), ((fx1, fy0), (px0, py0 + 0.25))):
        _arrow(ax, (ax0, ay0), (ax1, ay1), color=ZOOM, lw=1.1, ls=(0, (4, 3)), head=False, zorder=0)


def _draw_routing_boxes(ax, z: _ZoomLayout) -> dict:
    """The token input, the router's three steps and the sort; returns their extents by name."""
    return {
        "tok": _box(ax, z.mx, z.y_tok, z.mw, 0.72, "tokens h [n_real, d]\n(padding excluded)", C_DATA),
        "router": _box(ax, z.rx, z.y_tok, z.rw, z.h, "linear router  W_r : d → E", C_ROUTER),
        "soft": _box(ax, z.rx, z.y_soft, z.rw, z.h, "softmax over ALL E experts → P", C_ROUTER),
        "topk": _box(
            ax,
            z.rx,
            z.y_sort,
            z.rw,
            0.86,
            "top-k: expert ids + gate weights\ngate = softmax prob\n(so top-1 gets a gradient)",
            C_ROUTER,
            fontsize=9.5,
        ),
        "sort": _box(ax, z.mx, z.y_sort, z.mw, z.h, "sort tokens by expert id", C_DATA),
    }


def _draw_experts(ax, z: _ZoomLayout) -> None:
    """A container with E boxes (stacked weights)."""
    mx = z.mx
    ex0, ex1 = mx - 2.15, mx + 2.15
    ax.add_patch(
        FancyBboxPatch(
            (ex0, z.y_exp0),
            ex1 - ex0,
            z.y_exp1 - z.y_exp0,
            boxstyle="round,pad=0,rounding_size=0.15",
            facecolor="#eaf6ec",
            edgecolor="#5f9e6e",
            linewidth=1.2,
            zorder=1,
        )
    )
    names = ["expert 1", "expert 2", "⋯", "expert E"]
    bw, gap = 0.86, 0.17
    total = len(names) * bw + (len(names) - 1) * gap
    for i, name in enumerate(names):
        cx = mx - total / 2 + bw / 2 + i * (bw + gap)
        if name == "⋯":
            ax.text(cx, 4.95, name, ha="center", va="center", fontsize=16, zorder=4)
        else:
            _box(ax, cx, 4.95, bw, 0.7, f"{name}\nFFN", C_MOE, fontsize=9)
    _label(ax, mx, 5.78, "stacked weights [E, d, d_ff]:\none matmul per expert", fontsize=9, color="#2f5e3a")


def _draw_combine_boxes(ax, z: _ZoomLayout, boxes: dict) -> None:
    """Gate scaling, the combine and the output, added to ``boxes``."""
    boxes["scale"] = _box(ax, z.mx, z.y_scale, z.mw, z.h, "× gate weights", C_GATE)
    boxes["comb"] = _box(ax, z.mx, z.y_comb, z.mw, z.h, "index_add combine (sum over k)", C_DATA)
    boxes["out"] = _box(ax, z.mx, z.y_out, z.mw, 0.72, "output [n_real, d]\n→ scattered back to [B, T, d]", C_MOE)


def _draw_token_path(ax, z: _ZoomLayout, boxes: dict) -> None:
    mx, tok, sort, scale, comb, out = z.mx, boxes["tok"], boxes["sort"], boxes["scale"], boxes["comb"], boxes["out"]
    _arrow(ax, (mx, tok[3]), (mx, sort[1]))
    _arrow(ax, (mx, sort[3]), (mx, z.y_exp0))
    _arrow(ax, (mx, z.y_exp1), (mx, scale[1]))
    _arrow(ax, (mx, scale[3]), (mx, comb[1]))
    _arrow(ax, (mx, comb[3]), (mx, out[1]))


def _draw_router_path(ax, z: _ZoomLayout, boxes: dict) -> float:
    """Tokens into the router, up its steps, ids to the sort, gate weights to the scaling; returns the gate lane x."""
    rx, tok, router, soft, topk, sort = z.rx, boxes["tok"], boxes["router"], boxes["soft"], boxes["topk"], boxes["sort"]
    _arrow(ax, (tok[2], z.y_tok), (router[0], z.y_tok))
    _arrow(ax, (rx, router[3]), (rx, soft[1]))
    _arrow(ax, (rx, soft[3]), (rx, topk[1]))
    _arrow(ax, (topk[0], z.y_sort), (sort[2], z.y_sort))
    _label(ax, (topk[0] + sort[2]) / 2, z.y_sort + 0.2, "ids", fontsize=8.5)
    gx = topk[0] + 0.55
    _arrow(ax, (gx, topk[3]), (gx, z.y_scale), (boxes["scale"][2], z.y_scale), color="#a07800", lw=1.4)
    _label(ax, gx + 0.2, (topk[3] + z.y_scale) / 2, "gate weights", rotation=90, fontsize=8.5, color="#7a5c00")
    return gx


def _draw_aux_loss_note(ax, z: _ZoomLayout, topk, gx: float) -> None:
    """The auxiliary loss note above top-k, and what f_i and P_i are (between the gate lane and its arrow)."""
    note = _box(
        ax,
        z.rx,
        8.85,
        z.rw,
        1.05,
        "auxiliary loss (added to MLM loss)\n"
        r"load-balancing  $E \cdot \Sigma_i\, f_i\, P_i$"
        "\n(+ optional z-loss)",
        C_NOTE,
        ec="#d08a00",
        fontsize=9.5,
    )
    ax_x = topk[2] - 0.35
    _arrow(ax, (ax_x, topk[3]), (ax_x, note[1]), color="#d08a00", lw=1.3, ls=(0, (4, 3)))
    _label(
        ax,
        (gx + ax_x) / 2 + 0.05,
        (topk[3] + note[1]) / 2,
        r"$f_i$ = fraction of tokens"
        "\n"
        r"routed to expert $i$"
        "\n\n"
        r"$P_i$ = mean router"
        "\n"
        r"softmax prob of expert $i$",
        fontsize=9,
        color="#8a5a00",
        linespacing=1.4,
    )


def _moe_zoom(ax, ffn_box):
    """Right panel: one MoE FFN layer, bottom to top."""
    z = _ZoomLayout()
    _draw_zoom_panel(ax, z, ffn_box)
    boxes = _draw_routing_boxes(ax, z)
    _draw_experts(ax, z)
    _draw_combine_boxes(ax, z, boxes)
    _draw_token_path(ax, z, boxes)
    gx = _draw_router_path(ax, z, boxes)
    _draw_aux_loss_note(ax, z, boxes["topk"], gx)
    _label(
        ax,
        (z.px0 + z.px1) / 2,
        z.py0 + 0.3,
        "n_real = non-padding tokens of the batch;  E experts, each token goes to k of them",
        fontsize=8.8,
    )


def draw_architecture(path: str | Path = DEFAULT_OUT) -> Path:
    """Draw the MoE encoder diagram and write it (atomically) as a PNG to ``path``."""
    fig = Figure(figsize=(FIG_W, FIG_H), dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, FIG_W)
    ax.set_ylim(0, FIG_H)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.add_patch(Rectangle((0, 0), FIG_W, FIG_H, facecolor="white", edgecolor="none", zorder=-5))

    ax.text(
        FIG_W / 2,
        FIG_H - 0.5,
        "MoE encoder for masked language modelling",
        ha="center",
        va="center",
        fontsize=18,
        fontweight="bold",
        color="#1f2328",
    )
    ffn_box = _encoder_stack(ax)
    _moe_zoom(ax, ffn_box)
    return save_figure_atomic(fig, path, dpi=DPI)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="PNG to write (default: images/architecture.png in the repo)"
    )
    args = parser.parse_args(argv)
    out = draw_architecture(args.out)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
