"""Step 3 at scale: 2 processes = 1 process, resume = no interruption, NaN stops cleanly, Aim metrics,
the fill-mask pipeline, dynamic masking, and the loss the loop builds equals the model's own."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from helpers import (
    STEP_SCRIPTS,
    check_ok,
    error_line,
    forward_with_nan_loss_at,
    prepare_tiny_data,
    run_step_in_process,
    sets,
    small_moe_config,
    step_config_args,
)

STEPS = 6
TRAIN = {"subset": "train"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Steps 1-2 on a tiny corpus; options for a tiny 2-MoE-layer model without dropout."""
    tmp_path = tmp_path_factory.mktemp("training")
    return tmp_path, prepare_tiny_data(
        tmp_path,
        **{
            "model.n_encoder_blocks": 2,
            "model.dropout": 0.0,
            "train.max_steps": STEPS,
            "train.eval_steps": 3,
            "train.save_steps": 2,
        },
    )


def env_one_thread() -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)  # the script must find the project itself
    return env


def train_in_one_process(tmp_path, options, tag):
    check_ok(
        subprocess.run(
            [sys.executable, str(STEP_SCRIPTS[3]), *step_config_args(3), *options, "--tag", tag],
            cwd=tmp_path,
            env=env_one_thread(),
            capture_output=True,
            text=True,
            timeout=180,
        )
    )


@pytest.fixture(scope="module")
def single_run(data):
    tmp_path, options = data
    train_in_one_process(tmp_path, options, "one")
    return tmp_path / "runs" / "one"


def aim_run(aim_dir, tag):
    from aim import Repo

    runs = [run for run in Repo(str(aim_dir)).iter_runs() if tag in run.tags]
    assert len(runs) == 1
    return runs[0]


def metric_values(run, name, context=None) -> list[float]:
    """The values in step order (values.values_list() comes in hash order)."""
    for metric in run.metrics():
        if metric.name == name and metric.context.to_dict() == (context or {}):
            steps, (values, *_) = metric.data.items_list()
            return [value for _, value in sorted(zip(steps, values))]
    raise AssertionError(f"no metric {name} {context}")


@pytest.mark.parametrize("precision", ["auto", "bf16"])  # auto: float32 at this width (train/precision.py)
def test_two_processes_give_the_single_process_loss_curve(data, single_run, precision):
    tmp_path, options = data
    one_tag, two_tag = ("one", "two") if precision == "auto" else ("one_bf16", "two_bf16")
    if precision != "auto":
        options = [*options, *sets(**{"train.mixed_precision": precision})]
        train_in_one_process(tmp_path, options, one_tag)
    else:  # the default device: without a GPU, accelerate must still join the launched processes in one world
        options = [*options, *sets(**{"train.device": "auto"})]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(STEP_SCRIPTS[3]),
            *step_config_args(3),
            *options,
            "--tag",
            two_tag,
        ],
        cwd=tmp_path,
        env=env_one_thread(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    check_ok(result)
    assert "on 2 x cpu" in result.stdout
    assert f"{'bf16' if precision == 'bf16' else 'no'} precision" in result.stdout
    one = metric_values(aim_run(tmp_path, one_tag), "loss", TRAIN)
    two = metric_values(aim_run(tmp_path, two_tag), "loss", TRAIN)
    assert len(one) == len(two) == STEPS
    assert max(abs(a - b) for a, b in zip(one, two)) < 1e-4, (one, two)


def test_two_processes_refit_the_routers_as_one_does(data):
    """Each process reads half of every refit batch; the loss and gradient summed over both are one process's."""
    tmp_path, options = data
    options = [*options, *sets(**{"train.router_supervision": "topic", "train.router_refit_batches": 3})]
    train_in_one_process(tmp_path, options, "refit_one")
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command = [*launch, str(STEP_SCRIPTS[3]), *step_config_args(3), *options, "--tag", "refit_two"]
    check_ok(subprocess.run(command, cwd=tmp_path, env=env_one_thread(), capture_output=True, text=True, timeout=300))
    manifests = [
        json.loads((tmp_path / "runs" / tag / "manifest.json").read_text()) for tag in ("refit_one", "refit_two")
    ]
    one, two = (manifest["router_supervision"]["refit"] for manifest in manifests)
    assert one["tokens"] == two["tokens"] and one["batches"] == two["batches"] == 3
    assert abs(one["loss_first"] - two["loss_first"]) < 1e-4  # the same tokens, the same routers before the fit
    assert abs(one["loss_last"] - two["loss_last"]) < 1e-3 and one["loss_last"] < one["loss_first"]


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_resume_after_sigterm_ends_with_the_same_weights(data, precision):
    from safetensors.torch import load_file

    tmp_path, options = data
    options = [
        *options,
        *sets(
            **{
                "train.mixed_precision": precision,
                "train.save_path": tmp_path / f"runs_{precision}",
                "model.dropout": 0.1,
                "train.max_steps": 150,
                "train.save_steps": 20,
                "train.eval_steps": 50,
                "train.keep_checkpoints": 2,
            }
        ),
    ]
    command = [sys.executable, str(STEP_SCRIPTS[3]), *step_config_args(3), *options]
    run = dict(cwd=tmp_path, env=env_one_thread(), capture_output=True, text=True, timeout=180)
    check_ok(subprocess.run([*command, "--tag", "whole"], **run))

    interrupted = subprocess.Popen(
        [*command, "--tag", "cut"],
        cwd=tmp_path,
        env=env_one_thread(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    runs = tmp_path / f"runs_{precision}"
    checkpoints = runs / "cut" / "checkpoints"
    deadline = time.time() + 120
    while not (checkpoints / "step-000020").is_dir() and interrupted.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    interrupted.send_signal(signal.SIGTERM)
    _, stderr = interrupted.communicate(timeout=60)
    assert interrupted.returncode == 143, stderr
    assert "--tag cut --resume latest" in stderr.splitlines()[-1]
    assert not (runs / "cut" / "model").exists()
    kept = sorted(path.name for path in checkpoints.iterdir())
    assert len(kept) == 2 and kept[0] == "step-000020", kept  # keep_checkpoints=2: the signal's one and the one before

    first_start = json.loads((checkpoints / kept[-1] / "trainer_state.json").read_text())["train_seconds"]
    resumed = check_ok(subprocess.run([*command, "--tag", "cut", "--resume", "latest"], **run))
    assert "resuming cut from" in resumed.stdout
    # the manifest times every start: the first one's seconds (to its last checkpoint) are not lost on resume
    manifests = {tag: json.loads((runs / tag / "manifest.json").read_text()) for tag in ("whole", "cut")}
    assert manifests["whole"]["seconds_all_starts"] == pytest.approx(manifests["whole"]["seconds"], abs=0.02)
    assert first_start > 0
    resumed_manifest = manifests["cut"]
    all_starts = resumed_manifest["seconds_all_starts"]
    assert all_starts - resumed_manifest["seconds"] == pytest.approx(first_start, abs=0.02)
    printed = re.search(r"\((\d+) s over all starts\)", resumed.stdout)
    assert printed and abs(int(printed.group(1)) - all_starts) <= 1, resumed.stdout
    whole = load_file(runs / "whole" / "model" / "model.safetensors")
    cut = load_file(runs / "cut" / "model" / "model.safetensors")
    assert whole.keys() == cut.keys()
    for name in whole:
        assert torch.equal(whole[name], cut[name]), name
    assert len(list(checkpoints.iterdir())) == 2


def test_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(data, monkeypatch):
    from models import MoEEncoderForMaskedLM
    from train.final_model import load_model

    tmp_path, options = data
    forward_with_nan_at_call_5 = forward_with_nan_loss_at(5)

    monkeypatch.setattr(MoEEncoderForMaskedLM, "forward", forward_with_nan_at_call_5)
    line = error_line(run_step_in_process(3, *step_config_args(3), *options, "--tag", "nan", cwd=tmp_path))
    checkpoint = tmp_path / "runs" / "nan" / "checkpoints" / "step-000004"
    assert "the loss became nan at step 5" in line and str(checkpoint) in line and "intact" in line
    model, _ = load_model(checkpoint)
    assert model.config.n_experts == 4
    assert not (tmp_path / "runs" / "nan" / "model").exists()


def test_aim_run_holds_the_training_metrics(data, single_run):
    tmp_path, _ = data
    run = aim_run(tmp_path, "one")
    names = {(metric.name, tuple(sorted(metric.context.to_dict()))) for metric in run.metrics()}
    for name in ("loss", "mlm_loss", "aux_loss_total", "accuracy"):  # tests/test_tracking.py: the full convention
        assert (name, ("subset",)) in names, name
    for name in ("learning_rate", "tokens_per_s"):
        assert (name, ()) in names, name
    for name in ("mlm_loss", "accuracy"):
        assert len(metric_values(run, name, {"subset": "valid"})) == 2
    for name in ("aux_loss", "router_entropy"):
        assert (name, ("layer", "subset")) in names, name
        assert len(metric_values(run, name, {**TRAIN, "layer": "block 1"})) == STEPS
    assert ("expert_load", ("expert", "layer", "subset")) in names
    entropy = metric_values(run, "router_entropy", {**TRAIN, "layer": "block 0"})
    assert all(0.0 < value <= np.log2(4) + 1e-6 for value in entropy)  # bits
    loads = [metric_values(run, "expert_load", {**TRAIN, "layer": "block 0", "expert": e})[-1] for e in range(4)]
    assert abs(sum(loads) - 1.0) < 1e-5
    assert run["hparams"]["tag"] == "one" and run["hparams"]["train"]["max_steps"] == STEPS
    assert "git_commit" in run["hparams"]
    assert len(metric_values(run, "learning_rate")) == STEPS


def test_fill_mask_pipeline_loads_the_run(single_run):
    import transformers

    import models  # noqa: F401  registers the encoder with the Auto classes

    fill = transformers.pipeline("fill-mask", model=str(single_run / "model"))
    predictions = fill(f"the {fill.tokenizer.mask_token} is good", top_k=3)
    assert len(predictions) == 3 and all("token_str" in prediction for prediction in predictions)
    assert not list((single_run / "model").glob("*.bin"))


def test_dynamic_masking_remasks_each_epoch_with_the_same_rule(data):
    import json

    import datasets

    from data_processors.masking import IGNORE_INDEX
    from train.data import TrainBatches

    tmp_path, _ = data
    manifest = json.loads((tmp_path / "masked" / "manifest.json").read_text())
    train_set = datasets.load_from_disk(str(tmp_path / "masked" / "train"))
    assert "unmasked_ids" in manifest["columns"]
    static = train_set.with_format("numpy")[:50]
    unmasked = static["unmasked_ids"]
    kept = static["labels"] == IGNORE_INDEX
    assert (static["input_ids"][kept] == unmasked[kept]).all()  # step 2 stores the ids before masking

    batches = TrainBatches(
        train_set,
        8,
        seed=3,
        rank=0,
        world_size=1,
        masking="dynamic",
        tokenizer_info=manifest["tokenizer"],
        mask_prob=0.15,
    )
    epoch0 = [micro for micro, _ in zip(batches.steps(0, 0, 1), range(30))]
    again = [micro for micro, _ in zip(batches.steps(0, 0, 1), range(30))]
    epoch1 = [micro for micro, _ in zip(batches.steps(1, 0, 1), range(30))]
    labels0 = torch.cat([micro[0]["labels"] for micro, _ in epoch0])
    assert torch.equal(labels0, torch.cat([micro[0]["labels"] for micro, _ in again]))  # reproducible
    assert not torch.equal(labels0, torch.cat([micro[0]["labels"] for micro, _ in epoch1]))  # re-masked
    special = torch.tensor(manifest["tokenizer"]["special_token_ids"])
    picked = labels0 != IGNORE_INDEX
    assert not torch.isin(labels0[picked], special).any()  # special tokens and padding are never picked
    inputs = torch.cat([micro[0]["input_ids"] for micro, _ in epoch0])[picked]
    share_masked = (inputs == manifest["tokenizer"]["mask_token_id"]).float().mean()
    assert 0.6 < share_masked < 0.95  # 80% of the picked tokens become [MASK]
    assert 0.08 < picked.float().sum() / torch.cat([m[0]["attention_mask"] for m, _ in epoch0]).sum() < 0.25


def test_loop_loss_equals_the_models_loss_in_one_process():
    """The global-batch loss the loop differentiates is the model's own loss when there is one process."""
    from accelerate import Accelerator

    from models import MoEEncoderForMaskedLM
    from train.loop import global_balancing_loss, step_loss

    torch.manual_seed(0)
    config = small_moe_config(seq_len=12, router_z_loss_coef=0.1)
    model = MoEEncoderForMaskedLM(config)
    input_ids = torch.randint(5, 50, (3, 12))
    attention_mask = torch.ones(3, 12, dtype=torch.bool)
    attention_mask[1, 7:] = False
    labels = torch.where(torch.rand(3, 12) < 0.3, input_ids, -100)
    output = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    share, value = global_balancing_loss(Accelerator(cpu=True), output.layer_stats, 4)
    assert torch.allclose(value.sum().float(), output.aux_loss, atol=1e-6)
    loss = step_loss(
        output,
        share,
        (labels != -100).sum(),
        attention_mask.sum(),
        int((labels != -100).sum()),
        int(attention_mask.sum()),
        n_micro=1,
        world_size=1,
        config=config,
    )
    assert torch.allclose(loss.float(), output.loss, atol=1e-6)


def test_biases_and_layer_norms_are_not_decayed_stacked_expert_biases_included():
    """BERT's recipe: weight decay on weight matrices and embeddings only. The stacked experts' biases are 2-D
    ([E, h], [E, d]), so a rule on ndim alone decayed them."""
    from models import MoEEncoderForMaskedLM
    from train.loop import optimizer_for

    model = MoEEncoderForMaskedLM(small_moe_config(seq_len=12))
    optimizer = optimizer_for(model, learning_rate=1e-3, weight_decay=0.01, fused=False)
    decay_of = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    names = dict(model.named_parameters())
    assert set(decay_of) == {id(p) for p in names.values()}  # every trainable parameter once
    for name, parameter in names.items():
        is_bias = name.endswith((".bias", ".b_in", ".b_out"))
        in_norm = any(part in name for part in ("ln1.", "ln2.", "final_norm.", "lm_head.norm."))
        expected = 0.0 if is_bias or in_norm else 0.01
        assert decay_of[id(parameter)] == expected, (name, tuple(parameter.shape))
    assert any(name.endswith(".b_in") and p.ndim == 2 for name, p in names.items())  # the case the rule missed


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_the_learning_rate_warms_up_then_falls_to_zero_as_train_lr_schedule_says(schedule):
    import math

    from config_utils import ConfigSection
    from train.train import learning_rate_schedule

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2e-3)
    config = ConfigSection({"warmup_proportion": 0.1, "lr_schedule": schedule})
    scheduler = learning_rate_schedule(optimizer, config, total_steps=40)
    rates = []
    for _ in range(41):
        rates.append(optimizer.param_groups[0]["lr"])  # the rate the next step uses
        optimizer.step()
        scheduler.step()
    for step, rate in enumerate(rates):
        if step < 4:
            expected = step / 4  # warmup: 4 of the 40 steps
        else:
            remaining = (40 - step) / 36
            expected = remaining if schedule == "linear" else 0.5 * (1 - math.cos(math.pi * remaining))
        assert rate == pytest.approx(2e-3 * expected, abs=1e-12), (step, rate)


def test_a_checkpoint_with_other_optimizer_groups_is_refused_in_one_line(tmp_path):
    """A checkpoint from before the weight-decay fix holds two parameter groups of other sizes: resuming it must
    say why in one line (load_checkpoint adds the folder and the command that starts again), not raise torch's
    ValueError."""
    from config_utils import PipelineError
    from models import MoEEncoderForMaskedLM
    from train.checkpoints import optimizer_tensors, restore_optimizer
    from train.loop import optimizer_for

    model = MoEEncoderForMaskedLM(small_moe_config())
    old_style = torch.optim.AdamW(  # the old rule: decay every parameter with ndim >= 2, the experts' biases too
        [
            {"params": [p for p in model.parameters() if p.ndim >= 2], "weight_decay": 0.01},
            {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=1e-3,
    )
    model(input_ids=torch.randint(5, 50, (2, 16)), labels=torch.randint(5, 50, (2, 16))).loss.backward()
    old_style.step()
    tensors, saved = optimizer_tensors(old_style)
    with pytest.raises(PipelineError, match=r"parameter groups of \[\d+, \d+\] tensors and this optimizer"):
        restore_optimizer(optimizer_for(model, 1e-3, 0.01, fused=False), tensors, saved)
