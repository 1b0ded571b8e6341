"""study.py --profile learned: its arms, step 4 along the reference's training and at coarse topics, resuming an
interrupted training; the sweep's step 3 command; the corpus files' coarse_topics."""

import argparse
import json
import shutil
from pathlib import Path

import pytest
from test_experiments import run_script

from config_utils.io import current_manifest_hash
from config_utils.topic_map import coarse_topics
from helpers import REPO, check_ok, error_line
from process_exp_results.experiments.learned import REFIT_BATCHES, bar_markdown, emergence_steps, profile_bar
from process_exp_results.experiments.sweep import execute, recorded_otherwise, run_steps, step_command

STUDY = REPO / "process_exp_results" / "experiments" / "study.py"
ARMS = "moe_top1,supervised_router,dense_equal_active"


@pytest.fixture(scope="module")
def learned_quick(tmp_path_factory):
    """The learned profile on the builtin corpus, the reference, supervised and dense arms only (--arms), one seed."""
    out = tmp_path_factory.mktemp("learned") / "quick"
    result = check_ok(run_script(STUDY, "--quick", "--profile", "learned", "--arms", ARMS, "--out", out, timeout=600))
    return out, result


def test_the_learned_profile_runs_its_arms_then_step_4_along_training_and_at_coarse_topics(learned_quick):
    out, result = learned_quick
    sweep = out / "builtin-seen"
    runs = json.loads((sweep / "sweep.json").read_text())
    assert runs["reference_arm"] == "moe_top1"
    assert [(run["arm"], run["status"]) for run in runs["runs"]] == [
        ("moe_top1", "ok"),
        ("supervised_router", "ok"),
        ("dense_equal_active", "ok"),
    ]
    for step in (5, 10, 20):  # 12.5%, 25%, 50% of 40 steps
        manifest = json.loads((sweep / "emergence" / f"moe_top1__seed-0@step-{step}" / "manifest.json").read_text())
        assert manifest["checkpoint_step"] == step
    coarse = json.loads((sweep / "results_coarse" / "moe_top1__seed-0@families" / "routing_stats.json").read_text())
    assert set(coarse["topics"]) <= {"tech", "leisure"}  # configs/corpora/builtin.yaml's families
    study = json.loads((out / "study.json").read_text())["designs"]["builtin-seen"]["learned"]
    assert [point["step"] for point in study["emergence"]["points"]] == [5, 10, 20, 40]
    assert all(point["layers"]["block 0"]["topic_index"] is not None for point in study["emergence"]["points"])
    assert set(study["loss_curves"]) == {"moe_top1", "dense_equal_active"}
    # the supervised arm was told the builtin corpus's families and is judged at them, in every MoE layer
    assert [(row["told"], row["layer"]) for row in study["power"]] == [("family", "block 0"), ("family", "block 1")]
    assert {row["refit_batches"] for row in study["power"]} == {REFIT_BATCHES}
    told = json.loads(
        (sweep / "results_coarse" / "supervised_router__seed-0@families" / "routing_stats.json").read_text()
    )
    assert [row["topic_index"] for row in study["power"]] == [
        layer["references"]["topic"]["index"] for layer in told["layers"]
    ]
    assert [seed["met"] for seed in study["bar"]["seeds"]] == [False]  # 40 steps on synthetic text: far from 0.35
    table = (out / "study.md").read_text()
    for heading in ("The profile's bar", "The power check", "Emergence: the reference arm", "Two granularities"):
        assert f"#### {heading}" in table
    assert (out / "builtin-seen_emergence.png").stat().st_size > 20_000


def test_report_only_rebuilds_the_tables_from_the_finished_runs_and_runs_nothing(learned_quick, tmp_path):
    out, _ = learned_quick
    (out / "study.md").unlink()
    result = check_ok(
        run_script(STUDY, "--quick", "--profile", "learned", "--arms", ARMS, "--out", out, "--report-only")
    )
    assert "step 3" not in result.stdout and "step 4 on" not in result.stdout and (out / "study.md").is_file()
    line = error_line(run_script(STUDY, "--quick", "--profile", "learned", "--out", tmp_path / "none", "--report-only"))
    assert line.startswith(f"error: {tmp_path / 'none' / 'builtin-seen'}: no sweep.json (no run has started there)")


def test_an_interrupted_training_resumes_from_its_newest_checkpoint(learned_quick):
    out, _ = learned_quick
    sweep = out / "builtin-seen"
    run_dir = sweep / "runs" / "moe_top1__seed-0"
    for name in ("model", "manifest.json"):  # as a study stopped during the run's training leaves it
        shutil.rmtree(run_dir / name) if (run_dir / name).is_dir() else (run_dir / name).unlink()
    shutil.rmtree(sweep / "results" / "moe_top1__seed-0")
    kept = sorted(path.name for path in (sweep / "emergence").iterdir())
    result = check_ok(run_script(STUDY, "--quick", "--profile", "learned", "--arms", ARMS, "--out", out))
    log = (sweep / "logs" / "moe_top1__seed-0.step3.log").read_text()
    assert "--resume latest" in log and "resuming moe_top1__seed-0 from" in log
    assert "dense_equal_active__seed-0: done earlier" in result.stdout
    assert "supervised_router__seed-0: done earlier" in result.stdout
    assert "step 4 on emergence" not in result.stdout  # the checkpoints' results were kept
    assert sorted(path.name for path in (sweep / "emergence").iterdir()) == kept


def test_the_sweep_resumes_or_reuses_a_training_only_with_the_same_settings(tmp_path, monkeypatch):
    args = argparse.Namespace(config_dataset="d", config_model="m", config_train="t", overwrite=False)
    planned = {"model": {"n_experts": 4, "vocab_size": None}, "train": {"learning_rate": 1e-3, "eval_steps": 50}}
    planned["train"]["router_refit_batches"] = 0
    run = {"tag": "a", "overrides": [], "run_dir": str(tmp_path / "a"), "run_settings": planned}
    run |= {"processed_dir": str(tmp_path / "p"), "masked_dir": str(tmp_path / "q"), "data_settings": {1: {}, 2: {}}}
    assert step_command(3, args, run, tmp_path)[-1] == "--overwrite"  # nothing there: start afresh
    checkpoint = tmp_path / "a" / "checkpoints" / "step-000010"
    checkpoint.mkdir(parents=True)
    assert step_command(3, args, run, tmp_path)[-1] == "--overwrite"  # a checkpoint still being written
    # vocab_size resolved by step 2 and eval_steps (a resumable change) do not count; the learning rate does
    saved = {"model": {"n_experts": 4, "vocab_size": 800}, "train": {"learning_rate": 1e-3, "eval_steps": 20}}
    (checkpoint / "trainer_state.json").write_text(json.dumps({"config": saved}))
    assert step_command(3, args, run, tmp_path)[-2:] == ["--resume", "latest"]
    args.overwrite = True
    assert step_command(3, args, run, tmp_path)[-1] == "--overwrite"
    args.overwrite = False
    refit = {**saved, "train": {**saved["train"], "router_refit_batches": 9}}  # acts after training: resumable
    (checkpoint / "trainer_state.json").write_text(json.dumps({"config": refit}))
    assert step_command(3, args, run, tmp_path)[-2:] == ["--resume", "latest"]
    changed = {**saved, "train": {**saved["train"], "learning_rate": 3e-4}}
    (checkpoint / "trainer_state.json").write_text(json.dumps({"config": changed}))
    assert step_command(3, args, run, tmp_path)[-1] == "--overwrite"  # the user lowered it: start afresh

    commands = []
    monkeypatch.setattr(
        "process_exp_results.experiments.sweep.run_logged", lambda command, log: commands.append(command) or (True, "")
    )
    monkeypatch.setattr("process_exp_results.experiments.sweep.data_is_current", lambda *a: True)
    (tmp_path / "a" / "model").mkdir()
    for config, trained_again in ((saved, False), (changed, True)):
        (tmp_path / "a" / "manifest.json").write_text(json.dumps({"config": config}))
        commands.clear()
        run_steps(args, run, tmp_path, {})
        expected = ["train.py", "inference.py"] if trained_again else ["inference.py"]
        assert [Path(command[1]).name for command in commands] == expected


def test_a_finished_run_whose_arm_changed_since_is_redone_not_kept(tmp_path, monkeypatch):
    args = argparse.Namespace(config_dataset="d", config_model="m", config_train="t", overwrite=False, overrides=[])
    planned = {"model": {"n_experts": 4}, "train": {"router_supervision": "family", "router_refit_batches": 9}}
    planned["train"] |= {"eval_steps": 50, "router_z_loss_coef": 0.0}
    run = {"tag": "a", "run_dir": str(tmp_path / "runs" / "a"), "results_dir": str(tmp_path / "results" / "a")}
    run |= {"run_settings": planned, "processed_dir": str(tmp_path / "p"), "masked_dir": str(tmp_path / "q")}
    for folder in ("runs", "results"):
        (tmp_path / folder / "a").mkdir(parents=True)
    (tmp_path / "results" / "a" / "metrics.csv").write_text("group,accuracy\n")
    redone = []
    monkeypatch.setattr(
        "process_exp_results.experiments.sweep.run_steps",
        lambda args, run, *rest: redone.append(run["tag"]) or run.update(status="ok"),
    )
    # an evaluation interval does not change what was trained, the router's target does; a manifest written before
    # a key existed ran with its default (no refit: redone; z-loss at its default 0: kept)
    for recorded, again in (
        ({"router_supervision": "family", "router_refit_batches": 9, "eval_steps": 5}, []),
        ({"router_supervision": "topic", "router_refit_batches": 9}, ["a"]),
        ({"router_supervision": "family"}, ["a"]),
    ):
        (tmp_path / "runs" / "a" / "manifest.json").write_text(json.dumps({"config": {"train": recorded}}))
        redone.clear()
        run["status"] = None
        execute(args, [run], tmp_path, {})
        assert redone == again, recorded
    assert recorded_otherwise(tmp_path / "runs" / "a" / "manifest.json", run)
    assert not recorded_otherwise(tmp_path / "runs" / "b" / "manifest.json", run)  # nothing finished there


def test_a_finished_run_is_stale_when_its_data_its_routers_families_or_its_training_changed(tmp_path, monkeypatch):
    data_current = {"value": True}
    monkeypatch.setattr("process_exp_results.experiments.sweep.data_is_current", lambda *a: data_current["value"])
    masked, run_dir = tmp_path / "q", tmp_path / "runs" / "a"
    for folder in (masked, run_dir):
        folder.mkdir(parents=True)
    (masked / "manifest.json").write_text(json.dumps({"step": "dataset", "seed": 1}))
    first_map = tmp_path / "corpus.yaml"
    first_map.write_text("coarse_topics:\n  comp: [comp.*]\n  rec: [rec.*]\n")
    planned = {"model": {"n_experts": 4}, "train": {"router_supervision": "family", "router_topic_map": None}}
    run = {"tag": "a", "run_dir": str(run_dir), "run_settings": planned, "data_settings": {1: {}, 2: {}}}
    run |= {"processed_dir": str(tmp_path / "p"), "masked_dir": str(masked)}
    told = {"comp.graphics": "comp", "rec.autos": "rec"}
    record = {
        "config": {"model": {"n_experts": 4}, "train": {"router_supervision": "family", "router_topic_map": "gone"}},
        "input_manifest_hash": current_manifest_hash(masked),
        "router_supervision": {"family_of_topic": told},
    }
    manifest = run_dir / "manifest.json"
    manifest.write_text(json.dumps(record))

    def stale(topic_map: Path) -> bool:
        planned["train"]["router_topic_map"] = str(topic_map)
        return recorded_otherwise(manifest, run)

    # the map is judged by the families it tells, not by its path: a copy elsewhere (another clone) matches
    copy = tmp_path / "elsewhere" / "corpus.yaml"
    copy.parent.mkdir()
    shutil.copy(first_map, copy)
    assert not stale(first_map) and not stale(copy)
    copy.write_text("coarse_topics:\n  computers: [comp.*]\n  rec: [rec.*]\n")  # a family renamed: other targets
    assert stale(copy)
    copy.write_text("coarse_topics:\n  comp: [comp.*]\n")  # rec.autos in no family
    assert stale(copy)
    # the data: step 2 remade since (its manifest changed), or made with other settings
    (masked / "manifest.json").write_text(json.dumps({"step": "dataset", "seed": 2}))
    assert stale(first_map)
    record["input_manifest_hash"] = current_manifest_hash(masked)
    manifest.write_text(json.dumps(record))
    assert not stale(first_map)
    data_current["value"] = False
    assert stale(first_map)
    data_current["value"] = True
    # step 4's results are of the weights it evaluated: other weights there since (trained again) make them stale
    results = tmp_path / "results" / "a" / "manifest.json"
    results.parent.mkdir(parents=True)
    evaluated = {key: value for key, value in record.items() if key != "router_supervision"}
    manifest.write_text(json.dumps({**record, "file_sha256": {"model/model.safetensors": "aa"}}))
    results.write_text(json.dumps({**evaluated, "weights_sha256": "aa", "checkpoint_step": None}))
    assert not recorded_otherwise(results, run)
    manifest.write_text(json.dumps({**record, "file_sha256": {"model/model.safetensors": "bb"}}))
    assert recorded_otherwise(results, run)
    manifest.unlink()  # the run folder deleted, its results kept: nothing says they are stale
    assert not recorded_otherwise(results, run)
    # a checkpoint's results: by that checkpoint's weights (a resumed run keeps them, and them)
    checkpoint = run_dir / "checkpoints" / "step-000500"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"file_sha256": {"model.safetensors": "cc"}}))
    results.write_text(json.dumps({**evaluated, "weights_sha256": "cc", "checkpoint_step": 500}))
    assert not recorded_otherwise(results, run)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"file_sha256": {"model.safetensors": "dd"}}))
    assert recorded_otherwise(results, run)


def test_the_bar_reads_the_agreement_two_evaluations_before_the_last_and_shows_the_frozen_routers_beside_it(tmp_path):
    def finished(tag: str, arm: str, top1: list[float]) -> tuple[dict, dict]:
        results = tmp_path / tag
        results.mkdir()
        saturation = {layer: {"steps": [1, 2, 3, 4], "top1": top1} for layer in ("block 0", "block 1")}
        (results / "routing_stats.json").write_text(json.dumps({"saturation": saturation}))
        row = {"tag": tag, "arm": arm, "status": "done earlier", "common_accuracy": 0.4}
        return row, {"tag": tag, "results_dir": str(results)}

    made = [
        finished("ref0", "moe_top1", [0.5, 0.96, 0.97, 1.0]),
        finished("ref1", "moe_top1", [0.5, 0.90, 0.99, 1.0]),
        finished("frozen0", "frozen_router", [0.8, 0.93, 0.96, 1.0]),
    ]
    design = {"runs": [row for row, _ in made] + [{"tag": "frozen1", "arm": "frozen_router", "status": "planned"}]}
    bar = profile_bar(design, [run for _, run in made], "moe_top1")
    assert [seed["met"] for seed in bar["seeds"]] == [True, False]  # 0.90 < 0.95 two evaluations before the last
    assert bar["frozen"] == [{"tag": "frozen0", "agreement_two_before_last": {"block 0": 0.93, "block 1": 0.93}}]
    assert "frozen0 (routers that never change" in bar_markdown(bar) and "frozen1" not in bar_markdown(bar)


def test_emergence_steps_are_checkpoints_at_an_eighth_a_quarter_and_a_half():
    assert emergence_steps(4000, 500) == [500, 1000, 2000]
    assert emergence_steps(40, 5) == [5, 10, 20]
    assert emergence_steps(100, 30) == [30, 60]  # the nearest checkpoints: 12.5 -> 30, 25 -> 30, 50 -> 60


def test_coarse_topics_need_exactly_one_family_per_topic():
    families = {"comp": ["comp.*"], "religion": ["alt.atheism", "soc.religion.christian"]}
    assert coarse_topics(["comp.graphics", "alt.atheism"], families, "f") == {
        "alt.atheism": "religion",
        "comp.graphics": "comp",
    }
    from config_utils import PipelineError

    with pytest.raises(PipelineError, match="'sci.space' matches no family"):
        coarse_topics(["comp.graphics", "sci.space"], families, "f")
    with pytest.raises(PipelineError, match=r"matches 2 families \(comp, all\)"):
        coarse_topics(["comp.graphics"], {**families, "all": ["*"]}, "f")


def test_a_corpus_file_whose_families_miss_a_topic_is_refused_before_any_run(tmp_path):
    text = (REPO / "configs" / "corpora" / "builtin.yaml").read_text()
    corpus = tmp_path / "mine.yaml"
    corpus.write_text(text.replace("tech: [programming, gaming]", "tech: [programming]"))
    line = error_line(run_script(STUDY, "--profile", "learned", "--corpus", corpus, "--out", tmp_path / "s"))
    assert line == f"error: {corpus}: coarse_topics: topic 'gaming' matches no family; every topic needs exactly one"
    assert not (tmp_path / "s").exists()


def test_the_20newsgroups_families_cover_its_groups():
    from process_exp_results.experiments.corpora import corpus_topics, load_corpus

    corpus = load_corpus("20newsgroups")
    if not Path(corpus.data_files[0]).is_file():
        pytest.skip("../shared/data/20newsgroups is absent")
    families = coarse_topics(corpus_topics(corpus), corpus.coarse_topics, "20newsgroups")
    assert len(families) == 20
    assert sorted(set(families.values())) == ["comp", "forsale", "politics", "rec", "religion", "sci"]
