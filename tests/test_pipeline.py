"""All four steps end to end on a tiny builtin corpus, as a user runs them (subprocesses)."""

import csv
import json
from pathlib import Path

import pytest

from helpers import DEMO_CONFIGS, check_ok, run_step, sets


def small_overrides(tmp_path: Path) -> list[str]:
    """Bigger than helpers.tiny_sets: two MoE blocks and enough steps for the routing to be real."""
    return sets(
        **{
            "dataset.load_params.builtin.n_docs": 1500,
            "dataset.load_params.train_len": 600,
            "dataset.load_params.valid_len": 64,
            "dataset.load_params.test_len": 128,
            "dataset.load_params.topic_len": 96,
            "dataset.data_params.tokenizer_vocab_size": 400,
            "dataset.data_params.processed_dir": tmp_path / "processed",
            "dataset.data_params.masked_dir": tmp_path / "masked",
            "model.embedding_dim": 64,
            "model.num_head": 2,
            "model.moe_dim": 128,
            "model.seq_len": 48,
            "train.max_steps": 60,
            "train.eval_steps": 30,
            "train.save_steps": 40,
            "train.batch_size": 16,
            "train.learning_rate": 3e-3,
            "train.save_path": tmp_path / "runs",
            "train.aim_repo": tmp_path,
        }
    )


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("pipeline")
    options = small_overrides(tmp_path)
    check_ok(run_step(1, "--config-name", "demo/dataset_params.yaml", *options))
    check_ok(run_step(2, *DEMO_CONFIGS[:4], *options))
    check_ok(run_step(3, *DEMO_CONFIGS, *options, "--tag", "tiny", timeout=300))
    inference = check_ok(run_step(4, *DEMO_CONFIGS, *options, "--save_path", str(tmp_path / "results")))
    return tmp_path, inference.stdout


def test_manifests_chain_each_step_to_its_input(pipeline):
    tmp_path, _ = pipeline
    from config_utils.io import current_manifest_hash

    step2 = json.loads((tmp_path / "masked" / "manifest.json").read_text())
    run = json.loads((tmp_path / "runs" / "tiny" / "manifest.json").read_text())
    results = json.loads((tmp_path / "results" / "tiny" / "manifest.json").read_text())
    assert step2["input_manifest_hash"] == current_manifest_hash(tmp_path / "processed")
    assert run["input_manifest_hash"] == current_manifest_hash(tmp_path / "masked")
    assert results["input_manifest_hash"] == run["input_manifest_hash"]
    assert step2["seq_len"] == 48 and run["total_steps"] == 60


def test_step4_writes_metrics_counts_and_figures(pipeline):
    tmp_path, stdout = pipeline
    out_dir = tmp_path / "results" / "tiny"
    metrics = {row["group"]: row for row in csv.DictReader(open(out_dir / "metrics.csv"))}
    assert set(metrics) == {"test", "programming", "gaming"}
    for row in metrics.values():
        assert 0.0 <= float(row["accuracy"]) <= 1.0 and float(row["mlm_loss"]) > 0
    counts = list(csv.DictReader(open(out_dir / "expert_counts.csv")))
    # every real token of every group is routed once per MoE layer (top-1)
    for group, row in metrics.items():
        for layer in ("block 0", "block 1"):
            routed = sum(int(c["count"]) for c in counts if c["group"] == group and c["layer"] == layer)
            assert routed == int(row["real_tokens"])
    figures = sorted(path.name for path in (out_dir / "figures").glob("*.png"))
    assert figures == [
        "ablation_block_0.png",
        "ablation_block_1.png",
        "experts_all_layers.png",
        "experts_per_layer_gaming.png",
        "experts_per_layer_programming.png",
        "experts_per_layer_test.png",
        "nmi_per_layer.png",
        "routing_saturation.png",
        "specialization_index.png",
        "topic_expert_heatmap_block_0.png",
        "topic_expert_heatmap_block_1.png",
    ]
    assert f"wrote {out_dir}/: report.md" in stdout and f"figures/ ({len(figures)} PNG)" in stdout


def test_run_is_a_hugging_face_model_with_safetensors(pipeline):
    tmp_path, _ = pipeline
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    import models  # noqa: F401  registers the Auto classes

    model_dir = tmp_path / "runs" / "tiny" / "model"
    assert (model_dir / "model.safetensors").is_file()
    assert not list(model_dir.glob("*.bin")) and not list(model_dir.glob("*.pt"))
    model = AutoModelForMaskedLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert model.config.vocab_size == len(tokenizer)
    checkpoints = sorted(path.name for path in (tmp_path / "runs" / "tiny" / "checkpoints").iterdir())
    assert checkpoints == ["step-000040", "step-000060"]


def test_training_is_tracked_in_aim(pipeline):
    tmp_path, _ = pipeline
    from aim import Repo

    repo = Repo(str(tmp_path))
    runs = [run for run in repo.iter_runs() if "tiny" in run.tags]
    assert len(runs) == 1
    tracked = {(metric.name, metric.context.to_dict().get("subset")) for metric in runs[0].metrics()}
    assert {
        ("loss", "train"),
        ("mlm_loss", "train"),
        ("aux_loss_total", "train"),
        ("mlm_loss", "valid"),
        ("accuracy", "valid"),
        ("expert_load", "valid"),
    } <= tracked
    assert runs[0]["hparams"]["model"]["n_experts"] == 4


def test_same_seed_same_weights_on_cpu(pipeline):
    """Training twice with one seed gives bit-identical weights: runs are reproducible on CPU."""
    tmp_path, _ = pipeline
    from safetensors.torch import load_file

    check_ok(
        run_step(
            3, *DEMO_CONFIGS, *small_overrides(tmp_path), "--set", "train.device=cpu", "--tag", "again", timeout=300
        )
    )
    first = load_file(tmp_path / "runs" / "tiny" / "model" / "model.safetensors")
    second = load_file(tmp_path / "runs" / "again" / "model" / "model.safetensors")
    assert first.keys() == second.keys()
    for name in first:
        assert (first[name] == second[name]).all(), name


def test_step4_manifest_records_precision_and_phase_times(pipeline):
    tmp_path, _ = pipeline
    import torch

    from train.precision import bf16_is_fast

    manifest = json.loads((tmp_path / "results" / "tiny" / "manifest.json").read_text())
    width = json.loads((tmp_path / "runs" / "tiny" / "model" / "config.json").read_text())["embedding_dim"]
    expected = "bf16" if bf16_is_fast(torch.device("cpu"), width) else "fp32"  # --precision auto here
    assert manifest["precision"] == {"option": "auto", "forward": expected, "statistics": "fp32"}
    phases = manifest["phase_seconds"]
    assert set(phases) == {"evaluation", "collection", "references", "statistics", "ablation", "consistency", "figures"}
    assert all(seconds >= 0 for seconds in phases.values())
    assert sum(phases.values()) <= manifest["seconds"] + 1.0  # the phases are parts of step 4's time
    assert manifest["metrics_from_ablation"] == sorted(row["group"] for row in manifest["metrics"])


def test_step4_evaluates_a_checkpoint_at_coarse_topics(pipeline, tmp_path):
    """--checkpoint: the run's model at that step, in <tag>@step-N; --topic-map: topics analysed as families."""
    run_dir, _ = pipeline
    options = small_overrides(run_dir)
    coarse = tmp_path / "coarse.yaml"
    coarse.write_text("coarse_topics:\n  tech: [programming, gaming]\n  leisure: [cooking, sports]\n")
    light = [
        "--run",
        "tiny",
        "--n-boot",
        "20",
        "--n-perm",
        "20",
        "--no-ablation",
        "--no-aim",
        "--n-random-routers",
        "4",
    ]
    out = tmp_path / "results"
    check_ok(
        run_step(
            4,
            *DEMO_CONFIGS,
            *options,
            "--save_path",
            str(out),
            "--checkpoint",
            "40",
            "--topic-map",
            str(coarse),
            *light,
        )
    )
    folder = out / "tiny@step-40@families"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["checkpoint_step"] == 40 and manifest["model"].endswith("checkpoints/step-000040")
    assert manifest["topic_map"]["families"] == {
        "cooking": "leisure",
        "gaming": "tech",
        "programming": "tech",
        "sports": "leisure",
    }
    stats = json.loads((folder / "routing_stats.json").read_text())
    assert set(stats["topics"]) <= {"tech", "leisure"}
    assert stats["saturation"] is None  # no routing snapshot at step 40 (evaluations at 30 and 60): nothing to compare

    def test_split_loss(path):
        return next(row["mlm_loss"] for row in csv.DictReader(open(path / "metrics.csv")) if row["group"] == "test")

    assert test_split_loss(folder) != test_split_loss(run_dir / "results" / "tiny")  # another model than the final one
    missing = run_step(4, *DEMO_CONFIGS, *options, "--save_path", str(out), "--checkpoint", "30", *light)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines()[-1].startswith("error: --checkpoint 30: run tiny has no checkpoint")
    coarse.write_text("coarse_topics:\n  tech: [programming]\n  leisure: [cooking, sports]\n")
    unmatched = run_step(4, *DEMO_CONFIGS, *options, "--save_path", str(out), "--topic-map", str(coarse), *light)
    assert unmatched.returncode == 2 and "topic 'gaming' matches no family" in unmatched.stderr
