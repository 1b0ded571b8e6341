"""Fast tests for the routing histograms and the architecture diagram."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

from process_exp_results.figures.architecture import draw_architecture  # noqa: E402
from process_exp_results.figures.histograms import plot_pooled_expert_histogram, plot_topic_layer_histogram  # noqa: E402
from process_exp_results.report.formatting import (  # noqa: E402
    MISSING,
    format_count,
    format_interval,
    format_number,
    format_p,
    p_text,
    with_interval,
)


def _counts(rng, n_layers, n_experts, n_tokens):
    p = rng.dirichlet(np.full(n_experts, 2.0), size=n_layers)
    return np.stack([rng.multinomial(n_tokens, row) for row in p]).astype(np.int64)


def _read_png(path: Path) -> np.ndarray:
    assert path.is_file() and path.stat().st_size > 0
    img = plt.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    return img


def _only(tmp_path: Path, *names: str) -> None:
    """The directory holds exactly the expected files: no temp leftovers."""
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)


def test_format_count():
    assert format_count(0) == "0"
    assert format_count(999) == "999"
    assert format_count(1234) == "1.2k"
    assert format_count(34_500) == "34.5k"
    assert format_count(123_456) == "123k"
    assert format_count(999_999) == "1M"
    assert format_count(1_234_567) == "1.2M"


def test_one_number_and_p_value_format():
    assert [format_number(v) for v in (None, float("nan"), 0.0, 0.0004, 0.0331, 12, np.int64(3))] == [
        MISSING,
        MISSING,
        "0.000",
        "0.0004",
        "0.033",
        "12",
        "3",
    ]
    assert format_number(0.0012, 2, signed=True) == "+0.0012" and format_number(-0.3, 2, signed=True) == "-0.30"
    assert format_p(1 / 201, 200) == "≤0.005" and format_p(1 / 201) == "0.005" and format_p(0.153, 200) == "0.15"
    assert p_text(1 / 201, 200) == "p≤0.005" and p_text(0.153, 200) == "p=0.15" and p_text(None) == "p n/a"
    assert format_p(float("nan")) == MISSING == "n/a"
    assert with_interval(0.03, [0.02, 0.04]) == "0.030 [0.020, 0.040]" and with_interval(0.03, None) == "0.030"
    assert with_interval(None, [0.02, 0.04]) == "n/a [0.020, 0.040]" and format_interval(None) == MISSING


def test_pooled_histogram_writes_wide_png(tmp_path):
    rng = np.random.default_rng(0)
    counts = {
        "test": _counts(rng, 4, 8, 30_000),
        "programming": _counts(rng, 4, 8, 1_234),
        "gaming": _counts(rng, 4, 8, 2_000_000),
    }
    n_figs = len(plt.get_fignums())
    out = plot_pooled_expert_histogram(counts, tmp_path / "pooled.png", title="pooled")
    assert out == tmp_path / "pooled.png"
    img = _read_png(out)
    assert img.shape[1] > img.shape[0]
    assert len(plt.get_fignums()) == n_figs
    _only(tmp_path, "pooled.png")


def test_pooled_histogram_e16_six_groups(tmp_path):
    rng = np.random.default_rng(1)
    names = ["test", "programming", "gaming", "cooking", "politics", "sports"]
    counts = {n: _counts(rng, 6, 16, 10 ** (2 + i)) for i, n in enumerate(names)}
    n_figs = len(plt.get_fignums())
    out = plot_pooled_expert_histogram(counts, tmp_path / "sub" / "pooled16.png")
    img = _read_png(out)
    assert img.shape[1] > img.shape[0]
    # Figure width scales with E * groups: wider than the 3-group / 8-expert case.
    small = plot_pooled_expert_histogram({n: counts[n][:, :8] for n in names[:3]}, tmp_path / "small.png")
    assert img.shape[1] > plt.imread(small).shape[1]
    assert len(plt.get_fignums()) == n_figs
    _only(tmp_path / "sub", "pooled16.png")
    _only(tmp_path, "sub", "small.png")


def test_pooled_histogram_overwrites_and_handles_zero_group(tmp_path):
    rng = np.random.default_rng(2)
    path = tmp_path / "p.png"
    path.write_bytes(b"old")
    plot_pooled_expert_histogram({"a": _counts(rng, 2, 4, 100), "empty": np.zeros((2, 4), dtype=int)}, path)
    _read_png(path)
    _only(tmp_path, "p.png")


def test_pooled_histogram_shape_mismatch_raises(tmp_path):
    rng = np.random.default_rng(3)
    counts = {"test": _counts(rng, 4, 8, 100), "gaming": _counts(rng, 4, 16, 100)}
    n_figs = len(plt.get_fignums())
    with pytest.raises(ValueError, match=r"same shape.*test=\(4, 8\).*gaming=\(4, 16\)"):
        plot_pooled_expert_histogram(counts, tmp_path / "bad.png")
    assert len(plt.get_fignums()) == n_figs
    _only(tmp_path)


@pytest.mark.parametrize(
    "bad, match",
    [
        ({}, "non-empty"),
        ({"a": np.ones(8)}, "2-D"),
        ({"a": np.zeros((0, 8))}, "empty"),
        ({"a": -np.ones((2, 8))}, "non-negative"),
    ],
)
def test_pooled_histogram_bad_input_raises(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        plot_pooled_expert_histogram(bad, tmp_path / "bad.png")
    _only(tmp_path)


def test_topic_layer_histogram(tmp_path):
    rng = np.random.default_rng(4)
    n_figs = len(plt.get_fignums())
    out = plot_topic_layer_histogram(
        "programming",
        _counts(rng, 4, 8, 5_000),
        tmp_path / "layers.png",
        layer_names=["block 1", "block 3", "block 5", "block 7"],
    )
    img = _read_png(out)
    assert img.shape[1] > img.shape[0]
    out16 = plot_topic_layer_histogram("gaming", _counts(rng, 6, 16, 80_000), tmp_path / "l16.png")
    img16 = _read_png(out16)
    assert img16.shape[1] > img.shape[1]
    assert len(plt.get_fignums()) == n_figs
    _only(tmp_path, "layers.png", "l16.png")


def test_topic_layer_histogram_bad_input(tmp_path):
    with pytest.raises(ValueError, match="layer_names has 2 entries but counts has 3 layers"):
        plot_topic_layer_histogram("g", np.ones((3, 4), dtype=int), tmp_path / "x.png", layer_names=["a", "b"])
    with pytest.raises(ValueError, match="2-D"):
        plot_topic_layer_histogram("g", np.ones(4, dtype=int), tmp_path / "x.png")
    _only(tmp_path)


def test_failed_save_leaves_no_temp_file(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    def boom(self, *a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(Figure, "savefig", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        plot_topic_layer_histogram("g", np.ones((2, 4), dtype=int), tmp_path / "x.png")
    _only(tmp_path)


def test_draw_architecture(tmp_path):
    n_figs = len(plt.get_fignums())
    out = draw_architecture(tmp_path / "arch.png")
    img = _read_png(out)
    assert img.shape[1] > img.shape[0]
    assert len(plt.get_fignums()) == n_figs
    _only(tmp_path, "arch.png")


def test_architecture_script_runs_from_repo_root(tmp_path):
    out = tmp_path / "a.png"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run(
        [sys.executable, "process_exp_results/figures/architecture.py", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    _read_png(out)


def test_figure_titles_state_the_finding():
    from process_exp_results.figures.ablation import _ablation_title
    from process_exp_results.figures.layers import _index_title, _saturation_title

    saturation = {
        "block 0": {"steps": [1, 2], "top1": [0.95, 1.0], "topk": [0.95, 1.0], "settled_at": 1},
        "block 1": {"steps": [1, 2], "top1": [0.5, 1.0], "topk": [0.5, 1.0], "settled_at": None},
    }
    assert _saturation_title(saturation).startswith(
        "Routing settled in block 0 (step 1); still changing at the end of training in block 1"
    )
    clear, straddles = {"index": 0.5, "index_ci": [0.2, 0.8]}, {"index": 0.1, "index_ci": [-0.1, 0.3]}
    layers = [
        {
            "layer": "block 0",
            "p_value": 0.001,
            "token_class": {"p_value": 0.001},
            "references": {"topic": straddles, "token_class": clear},
        },
        {
            "layer": "block 1",
            "p_value": 0.001,
            "token_class": {"p_value": 0.5},
            "references": {"topic": clear, "token_class": clear},
        },
    ]
    assert _index_title(layers) == (
        "Specialized beyond routers that learned nothing: topic in block 1; token class in block 0"
    )
    entry = {
        "experts": {"0": {"test": {"delta": 0.02}}, "1": {"test": {"delta": 0.31}}, "2": {"test": {"delta": None}}}
    }
    assert _ablation_title(entry, "block 2") == "block 2: without expert 1 the test loss rises most (+0.31 nats)"
