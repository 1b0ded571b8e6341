"""Routing over training (issue 12, items 2 and 4): probe snapshots, agreement, saturation, and training health."""

import json

import numpy as np
import pytest

from helpers import check_ok, prepare_tiny_data, run_step_in_process, sets, step_config_args
from train.routing_snapshots import (
    load_snapshots,
    probe_batches,
    routing_snapshot,
    saturation,
    settled_at,
    top1_agreement,
    topk_overlap,
)
from train.tracking import RoutingHealth


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("snapshots")
    options = prepare_tiny_data(
        tmp_path,
        **{
            "model.n_encoder_blocks": 2,
            "model.top_k_experts": 2,
            "train.max_steps": 6,
            "train.eval_steps": 2,
            "train.save_steps": 3,
        },
    )
    check_ok(run_step_in_process(3, *step_config_args(3), *options, "--tag", "snap", cwd=tmp_path))
    return tmp_path, options, tmp_path / "runs" / "snap"


def test_every_evaluation_writes_a_snapshot_listed_in_the_manifest(run):
    _, _, run_dir = run
    steps, snapshots = load_snapshots(run_dir)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert steps == manifest["routing_snapshots"]["steps"] == [2, 4, 6]
    assert all(snapshot.shape == snapshots[0].shape and snapshot.dtype == np.int16 for snapshot in snapshots)
    n_layers, n_tokens, k = snapshots[0].shape
    assert (n_layers, k) == (2, 2) and n_tokens == manifest["routing_snapshots"]["probe_tokens"] > 0
    assert snapshots[0].min() >= 0 and snapshots[0].max() < 4  # every real token routed (dropless)


def test_the_last_snapshot_is_the_final_models_routing(run):
    import datasets

    from train.final_model import load_model

    tmp_path, _, run_dir = run
    model, _ = load_model(run_dir / "model")
    valid = datasets.load_from_disk(str(tmp_path / "masked" / "valid"))
    final = routing_snapshot(model, probe_batches(valid, 5), "cpu")  # another batch size: same routing
    assert np.array_equal(final, load_snapshots(run_dir)[1][-1])


def test_saturation_of_a_run_compared_with_itself_is_one(run):
    _, _, run_dir = run
    snapshots = load_snapshots(run_dir)[1]
    assert np.all(top1_agreement(snapshots[0], snapshots[0]) == 1.0)
    assert np.all(topk_overlap(snapshots[0], snapshots[0]) == 1.0)
    result = saturation(run_dir, ["block 0", "block 1"])
    for layer in result.values():
        assert layer["steps"] == [2, 4, 6] and layer["top1"][-1] == 1.0 and layer["topk"][-1] == 1.0
        assert all(0.0 <= value <= 1.0 for value in layer["top1"] + layer["topk"])


def test_routing_agreement_is_tracked_per_layer(run):
    from aim import Repo

    tmp_path, _, _ = run
    (aim_run,) = [found for found in Repo(str(tmp_path)).iter_runs() if "snap" in found.tags]
    contexts = sorted(
        metric.context.to_dict()["layer"] for metric in aim_run.metrics() if metric.name == "routing_agreement"
    )
    assert contexts == ["block 0", "block 1"]  # from the second evaluation on
    names = {metric.name for metric in aim_run.metrics()}
    assert {"max_load_over_ideal", "dead_experts"} <= names


def test_overlap_counts_shared_experts_in_any_order():
    a = np.array([[[0, 1], [2, 3], [0, 1]]], dtype=np.int16)
    b = np.array([[[1, 0], [2, 1], [3, 2]]], dtype=np.int16)
    assert topk_overlap(a, b).tolist() == [(1.0 + 0.5 + 0.0) / 3]
    assert top1_agreement(a, b).tolist() == [1 / 3]
    no_expert = np.array([[[-1, -1]]], dtype=np.int16)
    assert topk_overlap(no_expert, no_expert).tolist() == [0.0]


@pytest.mark.parametrize(
    "agreement,expected",
    [
        ([0.5, 0.95, 0.97, 1.0], 20),  # settled from the second snapshot on
        ([0.95, 0.5, 0.92, 1.0], 30),  # a dip resets it
        ([0.5, 0.6, 0.8, 1.0], None),  # the final snapshot agrees with itself and proves nothing
    ],
)
def test_settled_at(agreement, expected):
    assert settled_at([10, 20, 30, 40], agreement) == expected


def test_health_counts_dead_experts_and_the_busiest_load():
    health = RoutingHealth(2, 4, ["block 0", "block 1"])
    health.add_step(1, np.array([[50, 50, 0, 0], [997, 1, 1, 1]]))
    health.add_step(2, np.array([[50, 50, 0, 0], [997, 1, 1, 1]]))
    window = health.take_window()
    assert window["max_load_over_ideal"] == [2.0, pytest.approx(0.997 * 4)]
    assert window["dead_experts"] == [2.0, 3.0]  # 1 of 1000 is below 1% of the ideal 25%
    assert health.take_window()["dead_experts"] == [4.0, 4.0]  # a new, empty window


def test_a_collapse_warns_after_100_steps_and_at_most_every_100():
    health = RoutingHealth(1, 4, ["block 0"])
    collapsed, balanced = np.array([[60, 20, 10, 10]]), np.array([[40, 20, 20, 20]])
    warned = [step for step in range(1, 351) for _ in health.add_step(step, collapsed)]
    assert warned == [100, 200, 300]
    health.add_step(351, balanced)  # the streak ends
    warned = [step for step in range(352, 460) for _ in health.add_step(step, collapsed)]
    assert warned == [451]


def test_snapshots_can_be_switched_off(run):
    tmp_path, options, _ = run
    check_ok(
        run_step_in_process(
            3,
            *step_config_args(3),
            *options,
            *sets(**{"train.routing_snapshots": "false"}),
            "--tag",
            "nosnap",
            cwd=tmp_path,
        )
    )
    run_dir = tmp_path / "runs" / "nosnap"
    assert json.loads((run_dir / "manifest.json").read_text())["routing_snapshots"] is None
    assert not (run_dir / "routing_snapshots").exists() and saturation(run_dir, ["block 0"]) is None
