"""Experiments: a frozen-router control, grid sweeps, comparing runs, and the check against known structure."""

import csv
import json
import os
import subprocess
import sys

import datasets

from helpers import (
    DEMO_CONFIGS,
    REPO,
    check_ok,
    error_line,
    prepare_tiny_data,
    run_step,
    run_step_in_process,
    step_config_args,
    tiny_sets,
)
from inference.inference import METRIC_COLUMNS

SWEEP = REPO / "process_exp_results" / "experiments" / "sweep.py"
COMPARE = REPO / "process_exp_results" / "experiments" / "compare_runs.py"
KNOWN = REPO / "process_exp_results" / "experiments" / "known_structure.py"


def run_script(script, *args, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    """Run an experiment script as a user would: from another folder, without PYTHONPATH, offline."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONPATH", None)
    return subprocess.run(
        [sys.executable, str(script), *map(str, args)],
        cwd=cwd or REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# --------------------------------------------------------------------------- freeze_router


def test_freeze_router_keeps_the_routers_at_their_initialisation(tmp_path):
    import torch
    from accelerate.utils import set_seed
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from config_utils.config import load_config, parse_override
    from train.train import build_model

    options = tiny_sets(
        tmp_path,
        **{"train.freeze_router": "true", "train.max_steps": 3, "train.save_steps": 3, "model.n_encoder_blocks": 2},
    )
    check_ok(run_step(1, *step_config_args(1), *options, cwd=tmp_path))
    check_ok(run_step(2, *step_config_args(2), *options, cwd=tmp_path))
    check_ok(run_step_in_process(3, *DEMO_CONFIGS, *options, "--tag", "frozen", cwd=tmp_path))

    overrides = [parse_override(text) for text in options[1::2]]
    model_config = load_config("model", "demo/model_params.yaml", overrides)
    train_config = load_config("train", "demo/train_params.yaml", overrides)
    step2 = json.loads((tmp_path / "masked" / "manifest.json").read_text())
    set_seed(train_config.random_seed)  # what train.py does right before building the model
    pad_token_id = AutoTokenizer.from_pretrained(str(tmp_path / "masked" / "tokenizer")).pad_token_id
    initial = build_model(model_config, step2["tokenizer"]["vocab_size"], pad_token_id).state_dict()
    trained = load_file(tmp_path / "runs" / "frozen" / "model" / "model.safetensors")

    routers = [name for name in trained if ".router." in name]
    assert len(routers) == 2
    for name in routers:
        assert torch.equal(trained[name], initial[name]), f"{name} was trained"
    for name in (
        "encoder.blocks.0.ffn.experts.w_in",
        "encoder.blocks.1.attn.qkv.weight",
        "encoder.token_embedding.weight",
    ):
        assert not torch.equal(trained[name], initial[name]), f"{name} was not trained"


def test_freeze_router_leaves_routers_out_of_the_optimizer():
    from models import MoEEncoderConfig, MoEEncoderForMaskedLM
    from train.loop import optimizer_for
    from train.train import freeze_routers

    model = MoEEncoderForMaskedLM(
        MoEEncoderConfig(
            vocab_size=50,
            embedding_dim=8,
            seq_len=8,
            num_head=2,
            n_encoder_blocks=2,
            n_experts=4,
            top_k_experts=1,
            moe_dim=8,
            dropout=0.0,
        )
    )
    freeze_routers(model)
    optimized = {id(p) for group in optimizer_for(model, 1e-3, 0.01, fused=False).param_groups for p in group["params"]}
    for name, parameter in model.named_parameters():
        assert (id(parameter) in optimized) == (".router." not in name), name


# --------------------------------------------------------------------------- router_supervision


def test_router_supervision_is_the_routers_cross_entropy_and_trains_the_routers_only():
    import torch
    import torch.nn.functional as F

    from models import MoEEncoderConfig, MoEEncoderForMaskedLM
    from train.loop import router_supervision_sum
    from train.tracking import RoutingRecorder

    torch.manual_seed(0)
    model = MoEEncoderForMaskedLM(
        MoEEncoderConfig(
            vocab_size=50,
            embedding_dim=16,
            seq_len=8,
            num_head=2,
            n_encoder_blocks=2,
            n_experts=4,
            top_k_experts=1,
            moe_dim=16,
            dropout=0.0,
            pad_token_id=0,
        )
    )
    recorder = RoutingRecorder(model, 4, torch.device("cpu"))
    router_logits = []  # what the routers computed in the forward, for the expected value
    for layer in recorder.moe_layers:
        layer.router.register_forward_hook(lambda module, inputs, output: router_logits.append(output.logits))
    ids, mask = torch.randint(1, 50, (3, 8)), torch.ones(3, 8, dtype=torch.bool)
    mask[2, 5:] = False
    output = model(input_ids=ids, attention_mask=mask)
    target = torch.tensor([0, 3, 1])  # one target expert per sequence
    total = router_supervision_sum(recorder.moe_layers, output.layer_stats, target, mask)
    per_token = target[:, None].expand(3, 8)[mask]  # the routers see the real tokens in row-major order
    expected = sum(F.cross_entropy(logits, per_token, reduction="sum") for logits in router_logits)
    assert torch.allclose(total, expected)
    total.backward()
    assert all(layer.router.linear.weight.grad.abs().sum() > 0 for layer in recorder.moe_layers)
    below = [parameter.grad for name, parameter in model.named_parameters() if ".router." not in name]
    assert all(grad is None for grad in below)  # the hidden states are not pushed towards the topic


def test_refitting_the_routers_fits_them_to_their_optimum_and_leaves_every_other_weight_as_trained():
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator

    from models import MoEEncoderConfig, MoEEncoderForMaskedLM
    from train.router_refit import refit_routers
    from train.tracking import RoutingRecorder

    torch.manual_seed(0)
    config = MoEEncoderConfig(
        vocab_size=50, embedding_dim=16, seq_len=8, num_head=2, n_encoder_blocks=2, n_experts=4, moe_dim=16
    )
    model = MoEEncoderForMaskedLM(config)
    ids = torch.randint(1, 50, (16, 8))
    # the target is readable from the tokens: sequences of low ids go to expert 0, the others to expert 1
    ids[:8] = ids[:8] % 10 + 1
    labels = torch.full_like(ids, -100)
    labels[:, 0] = ids[:, 0]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids, dtype=torch.bool), "labels": labels}
    batch["router_target"] = torch.tensor([0] * 8 + [1] * 8)

    class Batches:  # the training's batch stream: one batch, forever
        def steps(self, epoch, index, accumulation):
            while True:
                yield [dict(batch)], (epoch, index)

    recorder = RoutingRecorder(model, 4, torch.device("cpu"))
    before = {name: value.clone() for name, value in model.state_dict().items()}
    model.train()
    result = refit_routers(Accelerator(cpu=True), model, recorder.moe_layers, Batches(), (0, 0), 3, "t")
    assert result["batches"] == 3 and result["tokens"] == 3 * 16 * 8
    assert result["loss_last"] < 0.5 * result["loss_first"]
    assert model.training  # handed back as it came
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]) == (".router." not in name), name
    # the plain reference: on the inputs each router now gets (block 0's fitted routing makes block 1's), no
    # gradient of its cross-entropy is left, and a thousand Adam steps from there find no lower loss
    model.eval()
    with torch.no_grad():
        output = model(**{key: value for key, value in batch.items() if key != "router_target"})
    per_token = batch["router_target"][:, None].expand(16, 8).reshape(-1)
    for layer, stats in zip(recorder.moe_layers, output.layer_stats):
        weight = layer.router.linear.weight.detach().clone().requires_grad_(True)
        fitted = F.cross_entropy(stats.router_input @ weight.T, per_token)
        (grad,) = torch.autograd.grad(fitted, weight)
        assert grad.abs().max() < 1e-3
        adam = torch.optim.Adam([weight], lr=0.01)
        for _ in range(1000):
            adam.zero_grad()
            loss = F.cross_entropy(stats.router_input @ weight.T, per_token)
            loss.backward()
            adam.step()
        assert loss.item() >= fitted.item() - 1e-3


def test_router_supervision_in_training_sends_each_train_topic_or_family_to_an_expert(tmp_path):
    options = prepare_tiny_data(
        tmp_path,
        **{"train.router_supervision": "topic", "train.max_steps": 3, "train.save_steps": 3, "model.n_experts": 2},
    )
    check_ok(run_step_in_process(3, *DEMO_CONFIGS, *options, "--tag", "supervised", cwd=tmp_path))
    manifest = json.loads((tmp_path / "runs" / "supervised" / "manifest.json").read_text())
    train_topics = sorted(set(datasets.load_from_disk(str(tmp_path / "masked" / "train"))["topic"]))
    assert manifest["router_supervision"] == {
        "factor": "topic",
        "coef": 1.0,
        "expert_of_topic": {topic: index % 2 for index, topic in enumerate(train_topics)},
        "family_of_topic": None,
        "refit": None,
    }
    dense = run_step_in_process(
        3, *DEMO_CONFIGS, *options, "--set", "model.n_experts=1", "--tag", "dense", cwd=tmp_path
    )
    assert error_line(dense) == ("error: train.router_supervision needs routers: set model.n_experts to 2 or more")
    unsupervised = ["--set", "train.router_supervision=null", "--set", "train.router_refit_batches=5"]
    refit_alone = run_step_in_process(3, *DEMO_CONFIGS, *options, *unsupervised, "--tag", "refit", cwd=tmp_path)
    assert error_line(refit_alone).startswith("error: train.router_refit_batches fits the routers to")

    family = ["--set", "train.router_supervision=family"]
    unmapped = run_step_in_process(3, *DEMO_CONFIGS, *options, *family, "--tag", "unmapped", cwd=tmp_path)
    assert error_line(unmapped).startswith("error: train.router_supervision=family needs train.router_topic_map")
    topic_map = REPO / "configs" / "corpora" / "builtin.yaml"  # tech: programming, gaming; leisure: the others
    mapped = [*family, "--set", f"train.router_topic_map={topic_map}", "--set", "train.router_refit_batches=4"]
    check_ok(run_step_in_process(3, *DEMO_CONFIGS, *options, *mapped, "--tag", "families", cwd=tmp_path))
    supervision = json.loads((tmp_path / "runs" / "families" / "manifest.json").read_text())["router_supervision"]
    family_of = {"programming": "tech", "gaming": "tech", "cooking": "leisure", "sports": "leisure"}
    assert supervision["family_of_topic"] == {topic: family_of[topic] for topic in train_topics}
    # the sorted families leisure, tech go to experts 0 and 1: the family decides, not the topic's rank
    assert supervision["expert_of_topic"] == {topic: int(family_of[topic] == "tech") for topic in train_topics}
    assert supervision["refit"]["batches"] == 4
    stray_map = ["--set", f"train.router_topic_map={topic_map}"]  # with router_supervision=topic: not read
    stray = run_step_in_process(3, *DEMO_CONFIGS, *options, *stray_map, "--tag", "stray", cwd=tmp_path)
    assert error_line(stray).startswith("error: train.router_topic_map is read by train.router_supervision=family")


def test_a_stop_while_refitting_keeps_the_final_checkpoint_and_a_resume_refits_told_the_same_families(
    tmp_path, monkeypatch
):
    import shutil

    import train.train

    topic_map = tmp_path / "corpus.yaml"
    shutil.copy(REPO / "configs" / "corpora" / "builtin.yaml", topic_map)
    options = prepare_tiny_data(
        tmp_path,
        **{"train.router_supervision": "family", "train.max_steps": 3, "train.save_steps": 3, "model.n_experts": 2},
    )
    options += ["--set", "train.router_refit_batches=6", "--tag", "refit"]
    refit_routers = train.train.refit_routers

    def stopped_at_the_third_step(*args, stop_requested, **kwargs):  # as a signal there would
        checks = iter(range(1000))
        return refit_routers(*args, stop_requested=lambda: next(checks) >= 2, **kwargs)

    monkeypatch.setattr(train.train, "refit_routers", stopped_at_the_third_step)
    mapped = ["--set", f"train.router_topic_map={topic_map}"]
    stopped = run_step_in_process(3, *DEMO_CONFIGS, *options, *mapped, cwd=tmp_path)
    assert stopped.returncode == 143
    assert "while fitting the routers" in stopped.stderr and "--tag refit --resume latest" in stopped.stderr
    assert (tmp_path / "runs" / "refit" / "checkpoints" / "step-000003").is_dir()
    assert not (tmp_path / "runs" / "refit" / "manifest.json").exists()
    monkeypatch.setattr(train.train, "refit_routers", refit_routers)

    # the map is judged by the families it tells: edited, the resume is refused; moved elsewhere, it resumes
    moved = tmp_path / "elsewhere.yaml"
    moved.write_text(topic_map.read_text().replace("leisure:", "hobbies:"))  # the train topics' family
    resume = ["--set", f"train.router_topic_map={moved}", "--resume", "latest"]
    refused = run_step_in_process(3, *DEMO_CONFIGS, *options, *resume, cwd=tmp_path)
    assert "were told other topic families than train.router_topic_map" in error_line(refused)
    shutil.copy(topic_map, moved)
    check_ok(run_step_in_process(3, *DEMO_CONFIGS, *options, *resume, cwd=tmp_path))
    manifest = json.loads((tmp_path / "runs" / "refit" / "manifest.json").read_text())
    assert manifest["router_supervision"]["refit"]["batches"] == 6
    assert set(manifest["router_supervision"]["family_of_topic"].values()) == {"leisure"}
    # the refit acts after the last step: another length refits from the final checkpoint, no retraining
    import torch
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "runs" / "refit" / "model" / "model.safetensors")
    longer = [*options, *resume, "--set", "train.router_refit_batches=8"]
    check_ok(run_step_in_process(3, *DEMO_CONFIGS, *longer, cwd=tmp_path))
    refitted = json.loads((tmp_path / "runs" / "refit" / "manifest.json").read_text())
    assert refitted["router_supervision"]["refit"]["batches"] == 8
    assert refitted["eval_history"] == manifest["eval_history"]  # no training step, no evaluation, again
    again = load_file(tmp_path / "runs" / "refit" / "model" / "model.safetensors")
    changed = {name for name in weights if not torch.equal(weights[name], again[name])}
    assert changed and all("router" in name for name in changed), changed
    state = json.loads((tmp_path / "runs" / "refit" / "model" / "trainer_state.json").read_text())
    assert "config" not in state  # not the checkpoint's settings, with the refit it had


# --------------------------------------------------------------------------- sweep


def test_sweep_dry_run_prints_each_step_once_per_distinct_input(tmp_path):
    result = check_ok(
        run_script(
            SWEEP,
            *DEMO_CONFIGS,
            "--grid",
            "model.seq_len=[32,48]",
            "--grid",
            "dataset.data_params.mask_prob=[0.1,0.2]",
            "--grid",
            "train.learning_rate=[0.001,0.003]",
            "--set",
            "train.max_steps=5",
            "--results",
            tmp_path / "sweep",
            "--dry-run",
            cwd=tmp_path,
        )
    )
    lines = result.stdout.splitlines()
    commands = [line for line in lines if line.startswith(sys.executable)]
    count = {
        step: sum(script in line for line in commands)
        for step, script in {1: "/load_dataset.py ", 2: "/dataset.py ", 3: "/train.py ", 4: "/inference.py "}.items()
    }
    # step 1 depends on none of these keys, step 2 on seq_len and mask_prob, steps 3-4 on all three
    assert count == {1: 1, 2: 4, 3: 8, 4: 8}, result.stdout
    assert "# seq_len-32__mask_prob-0.1__learning_rate-0.001" in lines
    assert "--tag seq_len-48__mask_prob-0.2__learning_rate-0.003" in result.stdout
    assert "masked/seq_len-48__mask_prob-0.2 " in result.stdout and "processed/shared " in result.stdout
    assert not (tmp_path / "sweep").exists()


def test_sweep_rejects_a_bad_grid_before_running_anything(tmp_path):
    for grid, message in (
        ("model.seq_lenn=[32]", "unknown key"),
        ("model.seq_len=[32,2]", "must be an integer"),
        ("model.seq_len=32", "non-empty YAML list"),
        ("train.save_path=[a,b]", "sets train.save_path itself"),
    ):
        result = run_script(SWEEP, *DEMO_CONFIGS, "--grid", grid, "--results", tmp_path / "sweep", cwd=tmp_path)
        assert result.returncode == 2 and message in result.stderr, (grid, result.stderr)
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "sweep").exists()


def test_sweep_runs_the_grid_goes_on_past_a_failure_and_compare_reads_it(tmp_path):
    """num_head=3 does not divide embedding_dim=16: that run fails in step 3, the other finishes; steps 1-2 run
    once for both (num_head does not change the data)."""
    sweep = tmp_path / "sweep"
    options = [
        text
        for text in tiny_sets(tmp_path)[1::2]
        if not text.startswith(
            ("dataset.data_params.processed_dir", "dataset.data_params.masked_dir", "train.save_path")
        )
    ]
    result = run_script(
        SWEEP,
        *DEMO_CONFIGS,
        "--grid",
        "model.num_head=[3,2]",
        *[arg for text in options for arg in ("--set", text)],
        "--results",
        sweep,
        cwd=tmp_path,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAILED at step 3" in result.stderr and "1 of 2 run(s) failed" in result.stderr
    manifest = json.loads((sweep / "sweep.json").read_text())
    runs = {run["tag"]: run for run in manifest["runs"]}
    assert runs["num_head-3"]["status"] == "failed" and runs["num_head-3"]["failed_step"] == 3
    assert "num_head" in runs["num_head-3"]["error"]
    assert runs["num_head-2"]["status"] == "ok"
    assert (sweep / "results" / "num_head-2" / "metrics.csv").is_file()
    assert manifest["grid"] == {"model.num_head": [3, 2]}
    logs = sorted(path.name for path in (sweep / "logs").iterdir())
    assert [name for name in logs if name.endswith((".step1.log", ".step2.log"))] == [
        "masked-shared.step2.log",
        "processed-shared.step1.log",
    ]

    again = run_script(
        SWEEP,
        *DEMO_CONFIGS,
        "--grid",
        "model.num_head=[2]",
        *[arg for text in options for arg in ("--set", text)],
        "--results",
        sweep,
        cwd=tmp_path,
    )
    assert again.returncode == 0 and "done earlier" in again.stdout, again.stdout + again.stderr

    compare = check_ok(run_script(COMPARE, sweep, cwd=tmp_path, timeout=120))
    rows = list(csv.DictReader(open(sweep / "comparison" / "comparison.csv")))
    assert [row["run"] for row in rows] == ["num_head-2"]  # the second invocation's manifest lists one run
    assert 0 <= float(rows[0]["test accuracy"]) <= 1
    assert (sweep / "comparison" / "comparison.png").stat().st_size > 0
    assert "| num_head-2 |" in compare.stdout


# --------------------------------------------------------------------------- compare_runs


def fake_stats(nmi: float, p: float, cmi_p: float, explained: str) -> dict:
    """routing_stats.json in the shape of the issue 5 contract (two layers, two experts)."""

    def layer(index):
        return {
            "layer": f"block {index}",
            "layer_index": index,
            "nmi": nmi,
            "nmi_ci": [nmi * 0.8, nmi * 1.2],
            "p_value": p,
            "js": {"cooking": 0.01},
            "js_ci": {"cooking": [0.0, 0.02]},
            "topic_expert_counts": [[5, 5], [5, 5]],
            "token_class": {
                "classes": ["special", "word-initial"],
                "nmi": 0.2,
                "nmi_ci": [0.1, 0.3],
                "p_value": 0.005,
                "expert_counts": [[1, 2], [3, 4]],
            },
            "token_id": {"nmi": 0.5, "nmi_ci": [0.4, 0.6]},
            "conditional_topic": {
                "cmi": 0.002,
                "cmi_ci": [0.001, 0.003],
                "p_value": cmi_p,
                "null_mean": 0.001,
                "cmi_excess": 0.001,
                "cmi_excess_ci": [0.0, 0.002],
                "explained_by": explained,
            },
            "vocabulary": {"lift_top": {}, "consistency": 0.8, "most_consistent": []},
            "coactivation": None,
            "references": {
                factor: {
                    "trained": nmi,
                    "random": band,
                    "random_load_matched": band,
                    "probe": 0.5,
                    "index": specialization,
                    "index_ci": [specialization - 0.1, specialization + 0.1],
                }
                for factor in ("topic", "token_class")
            },
        }

    band = {"mean": 0.01, "low": 0.0, "high": 0.02, "rank": 1}
    specialization = (nmi - 0.01) / (0.5 - 0.01)
    return {
        "n_tokens": 100,
        "n_documents": 10,
        "topics": ["cooking", "sports"],
        "n_experts": 2,
        "k": 1,
        "settings": {"n_boot": 200, "n_perm": 200, "seed": 0, "min_token_count": 20},
        "layers": [layer(0), layer(1)],
        "summary": ["..."],
    }


def fake_result(folder, accuracy: float, stats: dict | None) -> None:
    folder.mkdir(parents=True)
    with open(folder / "metrics.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(METRIC_COLUMNS)
        writer.writerow(["test", 10, 500, 75, 4.5, accuracy, 90.0, 0.09])
        writer.writerow(["gaming", 10, 500, 75, 6.5, 0.05, 600.0, 0.04])
    if stats is not None:
        (folder / "routing_stats.json").write_text(json.dumps(stats))


def test_compare_runs_tables_and_figure_with_and_without_routing_stats(tmp_path):
    fake_result(tmp_path / "results" / "topical", 0.16, fake_stats(0.12, 0.005, 0.004, "context beyond the token"))
    fake_result(tmp_path / "results" / "shuffled", 0.12, fake_stats(0.001, 0.4, 0.5, "neither"))
    fake_result(tmp_path / "other" / "old_run", 0.10, None)
    result = check_ok(
        run_script(
            COMPARE,
            tmp_path / "results",
            tmp_path / "other" / "old_run",
            "--out",
            tmp_path / "cmp",
            cwd=tmp_path,
            timeout=120,
        )
    )
    rows = {row["run"]: row for row in csv.DictReader(open(tmp_path / "cmp" / "comparison.csv"))}
    assert list(rows) == ["shuffled", "topical", "old_run"]
    topical = rows["topical"]
    assert float(topical["block 1 topic_nmi"]) == 0.12 and float(topical["block 1 topic_p"]) == 0.005
    assert float(topical["block 0 topic_nmi_ci_low"]) == 0.12 * 0.8
    assert topical["block 0 explained_by"] == "context beyond the token"
    assert float(topical["test accuracy"]) == 0.16 and float(topical["gaming baseline"]) == 0.04
    assert float(topical["block 0 token_class_nmi"]) == 0.2 and float(topical["block 0 cmi_p"]) == 0.004
    assert (
        float(topical["block 0 topic_index"]) == (0.12 - 0.01) / 0.49 and topical["block 0 topic_specialized"] == "True"
    )
    assert rows["shuffled"]["block 0 topic_specialized"] == "False" and float(topical["block 0 cmi_excess"]) == 0.001
    assert rows["old_run"]["block 0 topic_nmi"] == "" and "no routing_stats.json" in rows["old_run"]["note"]
    assert "| 0.120 [0.096, 0.144] | 0.005 |" in result.stdout
    assert "1 run(s) without routing_stats.json (metrics only): old_run" in result.stdout
    markdown = (tmp_path / "cmp" / "comparison.md").read_text()
    table_lines = [line for line in markdown.splitlines() if line.startswith("|")]
    assert len(table_lines) == 5 and len({line.count("|") for line in table_lines}) == 1  # header, rule, 3 runs
    assert (tmp_path / "cmp" / "comparison.png").stat().st_size > 10_000


def test_compare_runs_says_what_to_run_when_there_are_no_results(tmp_path):
    result = run_script(COMPARE, tmp_path, "--out", tmp_path / "cmp", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "inference.py" in result.stderr


# --------------------------------------------------------------------------- known structure


def test_known_structure_threshold_is_split_over_the_layers():
    """A layer is specialized when its index interval clears 0 and p <= 0.01 / L: p = 1/101 passes in a one-layer
    run, not in a two-layer one; an interval that reaches 0 never passes."""
    from process_exp_results.analysis.verdicts import permutations_needed
    from process_exp_results.experiments.known_structure import layer_threshold, specialized

    layer = {"p_value": 1 / 101, "references": {"topic": {"index": 0.3, "index_ci": [0.1, 0.5]}}}
    assert specialized(layer, 1) and not specialized(layer, 2)
    reaches_zero = {"p_value": 1 / 201, "references": {"topic": {"index": 0.3, "index_ci": [0.0, 0.5]}}}
    assert not specialized(reaches_zero, 2)
    assert not specialized({"p_value": 1 / 201}, 2)  # no references: nothing to claim
    assert layer_threshold(2) == 0.005
    assert permutations_needed(layer_threshold(1)) == 99 and permutations_needed(layer_threshold(2)) == 199
    needed = permutations_needed(layer_threshold(4))
    assert 1 / (needed + 1) <= layer_threshold(4) < 1 / needed


def test_known_structure_verdicts_from_results_and_too_few_permutations(tmp_path):
    from process_exp_results.experiments.known_structure import summarize

    fake_result(tmp_path / "supervised__seed-0", 0.16, fake_stats(0.45, 1 / 201, 0.004, "context beyond the token"))
    fake_result(tmp_path / "overlap_1__seed-0", 0.12, fake_stats(0.001, 1 / 101, 0.5, "neither"))
    fake_result(tmp_path / "frozen__seed-0", 0.12, fake_stats(0.06, 1 / 201, 0.5, "neither"))
    runs = [
        {"arm": arm, "seed": 0, "tag": f"{arm}__seed-0", "status": "ok"}
        for arm in ("supervised", "overlap_1", "frozen")
    ]
    verdicts = summarize(runs, tmp_path, n_perm=200)["verdicts"]
    # supervised: index (0.45 - 0.01) / 0.49 = 0.90, interval [0.80, 1.00]; overlap_1: index interval [-0.1, 0.1];
    # frozen: index 0.10, interval [0.002, 0.2] clears 0: a router that learned nothing would not
    assert verdicts["supervised"].startswith("as expected (2 of 2 layer-seed pairs with an index lower bound above")
    assert verdicts["overlap_1"].startswith("as expected (0 of 2 layer-seed pairs clear 0")
    assert verdicts["frozen"].startswith("NOT as expected (2 of 2 layer-seed pairs clear 0")
    few = summarize(runs, tmp_path, n_perm=100)  # 100 permutations cannot reach 0.005: nothing is "specialized"
    assert all(layer["specialized"] is None for row in few["runs"] for layer in row["layers"])
    for arm, verdict in few["verdicts"].items():  # the index intervals still decide the arms
        assert verdict.startswith(verdicts[arm].split(";")[0]) and "--n-perm 199 or more" in verdict, verdict
    no_references = fake_stats(0.001, 1 / 101, 0.5, "neither")
    for layer in no_references["layers"]:
        del layer["references"]
    fake_result(tmp_path / "overlap_1__seed-1", 0.12, no_references)
    runs.append({"arm": "overlap_1", "seed": 1, "tag": "overlap_1__seed-1", "status": "ok"})
    assert summarize(runs, tmp_path, n_perm=200)["verdicts"]["overlap_1"].startswith("incomplete")


def test_known_structure_supervised_routers_are_found_and_shuffled_topics_are_not(tmp_path):
    """The criterion, on a reduced run (1 seed, 150 steps): routers trained to send each topic to its own expert
    are topic-specialized in some layer (index interval clear of 0, p <= 0.01 / 2); with topic labels that carry no
    information (overlap 1) no layer's index interval clears 0."""
    result = run_script(
        KNOWN,
        "--out",
        tmp_path / "known",
        "--seeds",
        1,
        "--arms",
        "supervised,overlap_1",
        "--n-boot",
        100,
        "--n-perm",
        200,
        "--set",
        "train.max_steps=150",
        cwd=tmp_path,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((tmp_path / "known" / "known_structure.json").read_text())
    by_arm = {row["arm"]: row for row in summary["runs"]}
    assert set(by_arm) == {"supervised", "overlap_1"}
    supervised, shuffled = by_arm["supervised"]["layers"], by_arm["overlap_1"]["layers"]
    assert len(supervised) == len(shuffled) == 2
    assert any(layer["specialized"] for layer in supervised), supervised
    assert all(layer["index_ci"][0] <= 0 for layer in shuffled), shuffled
    assert summary["verdicts"]["overlap_1"].startswith("as expected (0 of 2 layer-seed pairs clear 0")
    table = (tmp_path / "known" / "known_structure.md").read_text()
    assert "| supervised | 0 | block 0 |" in table and "index [95% CI]" in table
