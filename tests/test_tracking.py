"""What step 3 records: Aim metric names and contexts (one name per quantity, subset/layer contexts, totals under
their own name, router metrics only where they say something, entropy in bits), the run's metadata (vocab size,
package versions, git commit and dirty flag, kept across a resume), and fp16 on the CPU refused."""

import json
import math
import re
import subprocess
import sys

import pytest

from helpers import (
    REPO,
    check_ok,
    error_line,
    forward_with_nan_loss_at,
    prepare_tiny_data,
    run_step,
    run_step_in_process,
    sets,
    small_moe_config,
    step_config_args,
)

N_EXPERTS = 4  # the demo model's
LAYERS = ("block 0", "block 1")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("tracking")
    return tmp_path, prepare_tiny_data(
        tmp_path,
        **{
            "model.n_encoder_blocks": 2,
            "model.dropout": 0.0,
            "train.max_steps": 6,
            "train.eval_steps": 3,
            "train.save_steps": 2,
        },
    )


def train(data, tag: str, **overrides) -> None:
    tmp_path, options = data
    check_ok(run_step_in_process(3, *step_config_args(3), *options, *sets(**overrides), "--tag", tag, cwd=tmp_path))


@pytest.fixture(scope="module")
def default_run(data):
    """The demo's router losses: balancing loss on (0.01), z-loss off, dropless."""
    train(data, "default")
    return data[0] / "runs" / "default"


def aim_run(aim_dir, tag):
    from aim import Repo

    runs = [run for run in Repo(str(aim_dir)).iter_runs() if tag in run.tags]
    assert len(runs) == 1
    return runs[0]


def in_step_order(metric) -> list[float]:
    steps, (values, *_) = metric.data.items_list()  # values.values_list() comes in hash order, not step order
    return [value for _, value in sorted(zip(steps, values))]


def tracked(run) -> dict[tuple[str, tuple], list[float]]:
    """(name, sorted context items) -> values by step, without Aim's own system metrics."""
    return {
        (metric.name, tuple(sorted(metric.context.to_dict().items()))): in_step_order(metric)
        for metric in run.metrics()
        if not metric.name.startswith("__system__")
    }


def contexts_of(metrics: dict, name: str) -> list[dict]:
    return [dict(context) for metric_name, context in metrics if metric_name == name]


def test_train_and_eval_share_names_told_apart_by_subset(data, default_run):
    metrics = tracked(aim_run(data[0], "default"))
    names = {name for name, _ in metrics}
    assert not [name for name in names if name.startswith("eval_")]
    for name in ("mlm_loss", "accuracy"):
        assert sorted(context["subset"] for context in contexts_of(metrics, name)) == ["train", "valid"], name
    assert (
        len(metrics["mlm_loss", (("subset", "train"),)]) == 6 and len(metrics["mlm_loss", (("subset", "valid"),)]) == 2
    )
    assert contexts_of(metrics, "loss") == [{"subset": "train"}]
    for name in ("learning_rate", "grad_norm", "tokens_per_s"):  # the optimizer's, not a subset's
        assert contexts_of(metrics, name) == [{}], name
    loads = contexts_of(metrics, "expert_load")
    assert {(c["subset"], c["layer"]) for c in loads} == {(s, layer) for s in ("train", "valid") for layer in LAYERS}
    # the eval values are step 3's eval_history, which the manifest keeps under its old keys
    manifest = json.loads((default_run / "manifest.json").read_text())
    assert [point["eval_mlm_loss"] for point in manifest["eval_history"]] == metrics["mlm_loss", (("subset", "valid"),)]


def test_per_layer_series_and_totals_have_their_own_names(data, default_run):
    metrics = tracked(aim_run(data[0], "default"))
    per_layer = {name for name, context in metrics if "layer" in dict(context)}
    totals = {name for name, context in metrics if "layer" not in dict(context)}
    assert not per_layer & totals
    for name in ("router_entropy", "aux_loss"):
        assert sorted(c["layer"] for c in contexts_of(metrics, name) if c["subset"] == "train") == list(LAYERS), name
    total = metrics["aux_loss_total", (("subset", "train"),)]
    by_layer = [metrics["aux_loss", (("layer", layer), ("subset", "train"))] for layer in LAYERS]
    assert total == pytest.approx([sum(values) for values in zip(*by_layer)])
    # coefficient 0 or dropless: nothing to show
    assert not {"z_loss", "z_loss_total", "dropped_fraction", "router_supervision_loss"} & (per_layer | totals)


def test_router_entropy_is_in_bits(data, default_run):
    metrics = tracked(aim_run(data[0], "default"))
    entropy = [
        value for layer in LAYERS for value in metrics["router_entropy", (("layer", layer), ("subset", "train"))]
    ]
    assert all(0.0 < value <= math.log2(N_EXPERTS) + 1e-6 for value in entropy)
    assert max(entropy) > math.log(N_EXPERTS)  # a near-uniform router after 6 steps: above the bound in nats


def test_router_metrics_follow_their_coefficients(data):
    train(
        data, "zloss", **{"model.load_balance_coef": 0.0, "model.router_z_loss_coef": 0.1, "model.capacity_factor": 0.5}
    )
    metrics = tracked(aim_run(data[0], "zloss"))
    names = {name for name, _ in metrics}
    assert {"z_loss", "z_loss_total", "dropped_fraction", "router_entropy"} <= names
    assert not {"aux_loss", "aux_loss_total"} & names
    assert sorted(c["layer"] for c in contexts_of(metrics, "z_loss")) == list(LAYERS)
    assert contexts_of(metrics, "z_loss_total") == [{"subset": "train"}]


def test_which_router_metrics_each_model_gets():
    from models import MoEEncoderConfig
    from train.tracking import routing_metric_names

    def names(**settings):
        return routing_metric_names(MoEEncoderConfig(vocab_size=50, embedding_dim=8, num_head=2, moe_dim=8, **settings))

    assert names(load_balance_coef=0.01) == {"router_entropy", "aux_loss"}
    assert names(load_balance_coef=0.0, router_z_loss_coef=0.1) == {"router_entropy", "z_loss"}
    assert names(router_type="expert_choice", load_balance_coef=0.01) == {"router_entropy", "dropped_fraction"}
    assert names(n_experts=1, top_k_experts=1, router_z_loss_coef=0.1) == set()  # the dense baseline has no router


def test_one_name_cannot_be_both_a_series_and_a_total():
    from train.tracking import track_step

    class Run:
        def track(self, *args, **kwargs):
            pass

    with pytest.raises(ValueError, match="aux_loss"):
        track_step(Run(), 1, "train", {"aux_loss": 2.0}, {"aux_loss": [1.0, 1.0]}, [0, 1])


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout


def test_run_records_vocab_size_versions_and_git_state(data, default_run):
    import torch
    import transformers

    tmp_path = data[0]
    manifest = json.loads((default_run / "manifest.json").read_text())
    hparams = aim_run(tmp_path, "default")["hparams"]
    vocab_size = json.loads((tmp_path / "masked" / "manifest.json").read_text())["tokenizer"]["vocab_size"]
    for record in (manifest, hparams):
        assert record["vocab_size"] == vocab_size
        assert record["versions"]["torch"] == torch.__version__
        assert record["versions"]["transformers"] == transformers.__version__
        assert set(record["versions"]) == {
            "python",
            "torch",
            "transformers",
            "datasets",
            "tokenizers",
            "accelerate",
            "aim",
        }
        assert record["git_commit"] == git("rev-parse", "HEAD").strip()
        assert isinstance(record["git_dirty"], bool) and record["resume_git"] == []


def test_git_state_reads_commit_and_dirty_flag(monkeypatch):
    from train import run_folder

    state = run_folder.git_state()
    assert re.fullmatch(r"[0-9a-f]{40}", state["commit"])
    assert state["dirty"] == bool(git("status", "--porcelain").strip())

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(run_folder.subprocess, "run", no_git)
    assert run_folder.git_state() == {"commit": None, "dirty": None}


def test_resumed_run_keeps_its_first_commit_and_records_the_resume(data, monkeypatch):
    from models import MoEEncoderForMaskedLM

    monkeypatch.setattr(sys, "path", list(sys.path))  # importing the step script repoints sys.path[0]
    import train.train as step3

    tmp_path, options = data
    forward_with_nan_at_call_5 = forward_with_nan_loss_at(5)  # stops the run after the step-4 checkpoint

    with monkeypatch.context() as patch:
        patch.setattr(MoEEncoderForMaskedLM, "forward", forward_with_nan_at_call_5)
        patch.setattr(step3, "git_state", lambda: {"commit": "1" * 40, "dirty": False})
        error_line(run_step_in_process(3, *step_config_args(3), *options, "--tag", "resumed", cwd=tmp_path))
    with monkeypatch.context() as patch:
        patch.setattr(step3, "git_state", lambda: {"commit": "2" * 40, "dirty": True})
        check_ok(
            run_step_in_process(
                3, *step_config_args(3), *options, "--tag", "resumed", "--resume", "latest", cwd=tmp_path
            )
        )
    manifest = json.loads((tmp_path / "runs" / "resumed" / "manifest.json").read_text())
    hparams = aim_run(tmp_path, "resumed")["hparams"]
    for record in (manifest, hparams):
        assert record["git_commit"] == "1" * 40 and record["git_dirty"] is False
        assert record["resume_git"] == [{"step": 4, "commit": "2" * 40, "dirty": True}]


def test_fp16_on_the_cpu_is_refused_with_what_to_use(data):
    tmp_path, options = data
    result = run_step_in_process(
        3, *step_config_args(3), *options, *sets(**{"train.mixed_precision": "fp16"}), "--tag", "fp16", cwd=tmp_path
    )
    line = error_line(result)
    assert "fp16" in line and "mixed_precision: no" in line and "bf16" in line
    assert not (tmp_path / "runs" / "fp16").exists()


def test_bf16_on_the_cpu_runs_as_the_fp16_message_says(data):
    """In a subprocess: accelerate's precision is process-wide, and the other runs here use none."""
    tmp_path, options = data
    result = check_ok(
        run_step(
            3,
            *step_config_args(3),
            *options,
            *sets(**{"train.mixed_precision": "bf16", "train.max_steps": 2}),
            "--tag",
            "bf16",
            cwd=tmp_path,
            timeout=180,
        )
    )
    assert "bf16 precision" in result.stdout and "on 1 x cpu" in result.stdout


def one_train_step(config, seed: int = 0):
    """One train.loop.train_step on a random batch with padding; returns (its StepResult, the MoE layers' stats)."""
    import torch
    from accelerate import Accelerator

    from models import MoEEncoderForMaskedLM, MoELayer
    from train.loop import optimizer_for, train_step
    from train.tracking import RoutingRecorder

    torch.manual_seed(seed)
    model = MoEEncoderForMaskedLM(config)
    stats = []  # what each MoE layer itself reported in the step's forward
    for module in model.modules():
        if isinstance(module, MoELayer):
            module.register_forward_hook(lambda module, inputs, output: stats.append(output[1]))
    optimizer = optimizer_for(model, 1e-3, 0.0, fused=False)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    input_ids = torch.randint(5, config.vocab_size, (4, config.seq_len))
    attention_mask = torch.ones(4, config.seq_len, dtype=torch.bool)
    attention_mask[1, 5:] = False
    labels = torch.where((torch.rand(4, config.seq_len) < 0.3) & attention_mask, input_ids, -100)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    result = train_step(
        Accelerator(cpu=True),
        model,
        optimizer,
        scheduler,
        [batch],
        RoutingRecorder(model, config.n_experts, torch.device("cpu")),
        None,
        False,
        1,
    )
    return result, stats


def test_expert_choice_training_metrics_are_the_layers_own():
    """An expert-choice token no expert picked is still a real token: the logged dropped_fraction is the layer's d
    (it read d(1-d) when real tokens were counted as expert_index >= 0) and the z-loss is not scaled by (1-d)."""

    config = small_moe_config(top_k_experts=1, router_type="expert_choice", capacity_factor=0.5, router_z_loss_coef=0.1)
    result, stats = one_train_step(config)
    dropped = [float(layer.dropped_fraction) for layer in stats]
    assert min(dropped) > 0.3  # capacity 0.5: at least half the tokens are picked by no expert
    assert result.layer_metrics["dropped_fraction"] == pytest.approx(dropped, rel=1e-6)
    assert result.layer_metrics["z_loss"] == pytest.approx([float(layer.z_loss.detach()) for layer in stats], rel=1e-6)


def test_token_choice_training_metrics_are_the_layers_own():

    config = small_moe_config(capacity_factor=0.6, router_z_loss_coef=0.1, load_balance_coef=0.01)
    result, stats = one_train_step(config)
    assert result.layer_metrics["dropped_fraction"] == pytest.approx([float(s.dropped_fraction) for s in stats])
    assert result.layer_metrics["z_loss"] == pytest.approx([float(s.z_loss.detach()) for s in stats], rel=1e-6)
    assert result.layer_metrics["aux_loss"] == pytest.approx(
        [float(s.load_balance_loss.detach()) for s in stats], rel=1e-6
    )


def test_expert_choice_tracks_best_expert_share_not_an_expert_load(data):
    """Under expert choice every expert processes exactly its capacity: a per-expert 'load' would be a flat 1/E.
    What varies is each picked token's highest-gate expert, tracked under its own name."""
    train(data, "ec", **{"model.router_type": "expert_choice"})
    metrics = tracked(aim_run(data[0], "ec"))
    assert not contexts_of(metrics, "expert_load")
    shares = contexts_of(metrics, "best_expert_share")
    assert {(c["subset"], c["layer"]) for c in shares} == {(s, layer) for s in ("train", "valid") for layer in LAYERS}
    for layer in LAYERS:  # shares over experts sum to 1 at every evaluation
        series = [
            metrics["best_expert_share", (("expert", e), ("layer", layer), ("subset", "valid"))]
            for e in range(N_EXPERTS)
        ]
        assert [sum(values) for values in zip(*series)] == pytest.approx([1.0] * len(series[0]))
