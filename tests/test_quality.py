"""benchmarks/quality.py: the verdict rule, the parameter accounting, and one tiny experiment end to end."""

import json
import subprocess
import sys

import pytest

from benchmarks import quality
from tests.helpers import REPO, error_line

TINY = {
    "dataset.load_params.builtin.n_docs": 400,
    "dataset.load_params.train_len": 300,
    "dataset.load_params.valid_len": 40,
    "dataset.load_params.test_len": 40,
    "dataset.data_params.tokenizer_vocab_size": 300,
    "dataset.data_params.num_proc": 1,
    "model.embedding_dim": 16,
    "model.num_head": 2,
    "model.seq_len": 16,
    "train.batch_size": 8,
}


def run_quality(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "quality.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.parametrize(
    "moe,dense,expected",
    [
        ([1.0, 1.1], [1.2, 1.3], "MoE better, beyond the seed spread"),
        ([1.4, 1.5], [1.2, 1.3], "dense better, beyond the seed spread"),
        ([1.0, 1.25], [1.2, 1.3], "within the seed spread"),
    ],
)
def test_verdict_needs_ranges_that_do_not_overlap(moe, dense, expected):
    assert quality.verdict(moe, dense) == expected


def test_active_parameters_of_the_three_models_match_up_to_the_router():
    """Equal active FFN size: the MoEs' active count differs from dense only by the router (d x E per layer) and
    k2's extra output biases."""
    from models import MoEEncoderConfig, MoEEncoderForMaskedLM

    counts = {}
    for name, settings in quality.MODELS.items():
        config = {
            "vocab_size": 100,
            "embedding_dim": 32,
            "seq_len": 16,
            "num_head": 2,
            "n_encoder_blocks": 2,
            "moe_every": 1,
            **{key.split(".")[1]: value for key, value in settings.items()},
        }
        total = sum(p.numel() for p in MoEEncoderForMaskedLM(MoEEncoderConfig(**config)).parameters())
        counts[name] = (total, quality.active_parameters(total, config))
    assert counts["dense"][0] == counts["dense"][1]
    assert counts["moe_e8_k1"][0] > 3 * counts["dense"][0] // 2  # many more parameters in all ...
    for name in ("moe_e8_k1", "moe_e8_k2"):  # ... but the same active ones, up to router weights and biases
        assert 0 < counts[name][1] - counts["dense"][1] <= 2 * (32 * 8 + 8 + 32), (name, counts)


def test_tiny_experiment_end_to_end(tmp_path):
    out = tmp_path / "quality"
    sets = [arg for key, value in TINY.items() for arg in ("--set", f"{key}={value}")]
    args = [
        "--out",
        str(out),
        "--corpora",
        "builtin",
        "reddit",
        "--reddit-dir",
        str(tmp_path / "none"),
        "--models",
        "dense",
        "moe_e8_k1",
        "--seeds",
        "0",
        "1",
        "--steps",
        "6",
        "--eval-steps",
        "3",
        *sets,
    ]
    result = run_quality(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Reddit corpus is skipped" in result.stdout
    summary = json.loads((out / "quality.json").read_text())
    rows = {row["model"]: row for row in summary["rows"]}
    assert set(rows) == {"dense", "moe_e8_k1"} and {row["corpus"] for row in summary["rows"]} == {"builtin"}
    for row in rows.values():
        assert row["seeds"] == [0, 1] and row["steps"] == 6 and len(row["val_loss"]) == 2
        assert all(0 < loss < 20 for loss in row["val_loss"]) and all(0 <= a <= 1 for a in row["val_accuracy"])
        assert all(loss is not None for loss in row["test_loss"])  # step 4 ran
    assert rows["dense"]["val_loss"][0] != rows["dense"]["val_loss"][1]  # the seed changes the run
    assert rows["moe_e8_k1"]["verdict"] in (
        "MoE better, beyond the seed spread",
        "within the seed spread",
        "dense better, beyond the seed spread",
    )
    assert rows["moe_e8_k1"]["loss_vs_dense"] == pytest.approx(
        rows["moe_e8_k1"]["val_loss_mean"] - rows["dense"]["val_loss_mean"]
    )
    curve = summary["curves"]["builtin"]["dense"][0]["history"]
    assert [point["step"] for point in curve] == [3, 6]
    lowest = min(curve, key=lambda point: point["eval_mlm_loss"])  # the lowest point, read from the curve itself
    assert (
        rows["dense"]["best_val_loss"][0] == lowest["eval_mlm_loss"] and rows["dense"]["best_step"][0] == lowest["step"]
    )
    assert all(best <= final for best, final in zip(rows["moe_e8_k1"]["best_val_loss"], rows["moe_e8_k1"]["val_loss"]))
    assert rows["moe_e8_k1"]["best_verdict"].endswith("seed spread")
    assert (out / "quality_val_loss.png").stat().st_size > 10_000
    assert "| builtin | moe_e8_k1 | 8 x 1 |" in (out / "quality.md").read_text()

    again = run_quality(*args, cwd=tmp_path)  # finished runs are not redone
    assert again.returncode == 0 and again.stdout.count(": done earlier (") == 4, again.stdout[-2000:]


def test_an_override_of_what_the_experiment_compares_is_refused(tmp_path):
    result = run_quality("--out", str(tmp_path / "q"), "--set", "model.n_experts=4", cwd=tmp_path)
    assert result.returncode == 2
    assert error_line(result) == "error: --set model.n_experts=4: the experiment sets this key itself"
    assert not (tmp_path / "q").exists()
