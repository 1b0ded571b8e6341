"""Faults after the obvious ones, each refused in one line: damaged files, hand-edited manifests and damaged
checkpoints (what a step wrote is checked byte for byte by the step that reads it), a second writer of a step's
output, and a resampling that would take hours. tests/faults/run_faults.py tries these and more end to end."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from config_utils import PipelineError
from config_utils.config import load_config, parse_override, read_yaml
from config_utils.io import FILE_HASHES, SELF_HASH, check_manifest_seal, read_manifest, write_sealed_manifest
from helpers import (
    REPO,
    check_ok,
    error_line,
    prepare_tiny_data,
    run_step_in_process,
    snapshot,
    step_config_args,
    tiny_sets,
)


def flip_bytes(path: Path, n_bytes: int) -> None:
    """Invert n_bytes in the middle of a file: its size and any header stay as they were."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + n_bytes] = bytes(255 - byte for byte in data[middle : middle + n_bytes])
    path.write_bytes(bytes(data))


# ---- the manifest seal ------------------------------------------------------------------------------------------


@pytest.fixture
def sealed(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.bin").write_bytes(b"x" * 1000)
    (tmp_path / "b.txt").write_text("hello", encoding="utf-8")
    write_sealed_manifest(tmp_path, {"step": "test", "count": 3, "seconds": 1.5})
    return tmp_path


def test_a_sealed_manifest_lists_every_file_and_reads_back(sealed):
    manifest, _ = read_manifest(sealed, "remake it")
    assert sorted(manifest[FILE_HASHES]) == ["b.txt", "sub/a.bin"] and SELF_HASH in manifest


def test_a_damaged_file_is_named(sealed):
    flip_bytes(sealed / "sub" / "a.bin", 4)
    with pytest.raises(PipelineError, match=r"a\.bin is damaged or was replaced.*run `remake it` again"):
        read_manifest(sealed, "remake it")
    manifest = json.loads((sealed / "manifest.json").read_text(encoding="utf-8"))
    check_manifest_seal(sealed / "manifest.json", manifest, "remake it")  # the manifest itself is intact


def test_a_missing_file_is_named(sealed):
    (sealed / "b.txt").unlink()
    with pytest.raises(PipelineError, match=r"b\.txt is missing"):
        read_manifest(sealed, "remake it")


def test_a_hand_edited_manifest_is_refused(sealed):
    path = sealed / "manifest.json"
    manifest = json.loads(path.read_text(encoding="utf-8"))
    path.write_text(json.dumps({**manifest, "count": 4}), encoding="utf-8")
    with pytest.raises(PipelineError, match="edited or damaged"):
        read_manifest(sealed, "remake it")


def test_the_hash_later_steps_record_is_of_the_content_not_the_timing_or_bytes(sealed, tmp_path):
    """A step rerun on the same input with the same settings keeps the runs made from its output: its files' bytes
    may differ (datasets' state.json fingerprints file times), and the manifest's content says what they hold."""
    _, first = read_manifest(sealed, "remake it")
    (sealed / "b.txt").write_text("other", encoding="utf-8")
    write_sealed_manifest(sealed, {"step": "test", "count": 3, "seconds": 9.0})
    assert read_manifest(sealed, "remake it")[1] == first
    write_sealed_manifest(sealed, {"step": "test", "count": 4, "seconds": 1.5})
    assert read_manifest(sealed, "remake it")[1] != first


# ---- the steps ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Steps 1-3 once on the tiny corpus: a run with a final model and checkpoints."""
    tmp_path = tmp_path_factory.mktemp("hashes")
    options = prepare_tiny_data(tmp_path, **{"train.max_steps": 4, "train.save_steps": 2})
    check_ok(run_step_in_process(3, *step_config_args(3), *options, "--tag", "base", cwd=tmp_path))
    return tmp_path, options


@pytest.fixture
def copy_of(trained, tmp_path):
    """A fresh copy of the trained pipeline's folders, and the options pointing at it."""
    folder, options = trained
    for name in ("processed", "masked", "runs"):
        shutil.copytree(folder / name, tmp_path / name)
    return tmp_path, [option.replace(str(folder), str(tmp_path)) for option in options]


def test_step4_refuses_weights_with_flipped_bytes(copy_of):
    folder, options = copy_of
    flip_bytes(folder / "runs" / "base" / "model" / "model.safetensors", 64)
    result = run_step_in_process(4, *step_config_args(4), *options, "--run", "base", cwd=folder)
    line = error_line(result)
    assert "model.safetensors is damaged" in line and "--tag base --overwrite" in line
    assert not (folder / "process_exp_results").exists()


def test_step2_refuses_a_step1_split_with_flipped_bytes_and_keeps_its_output(copy_of):
    folder, options = copy_of
    flip_bytes(folder / "processed" / "test.parquet", 32)
    before = snapshot(folder / "masked")
    line = error_line(run_step_in_process(2, *step_config_args(2), *options, cwd=folder))
    assert "test.parquet is damaged" in line and "load_dataset.py" in line
    assert snapshot(folder / "masked") == before


def test_step3_refuses_step2_data_with_flipped_bytes(copy_of):
    folder, options = copy_of
    arrow = sorted((folder / "masked" / "train").glob("*.arrow"))[0]
    flip_bytes(arrow, 32)
    line = error_line(run_step_in_process(3, *step_config_args(3), *options, "--tag", "other", cwd=folder))
    assert arrow.name in line and "damaged" in line and "dataset.py" in line


@pytest.mark.parametrize("damaged", ["model.safetensors", "optimizer.safetensors"])
def test_resume_refuses_a_checkpoint_with_flipped_bytes(copy_of, damaged):
    folder, options = copy_of
    checkpoint = sorted((folder / "runs" / "base" / "checkpoints").glob("step-*"))[-1]
    flip_bytes(checkpoint / damaged, 64)
    result = run_step_in_process(
        3, *step_config_args(3), *options, "--tag", "base", "--resume", str(checkpoint), cwd=folder
    )
    line = error_line(result)
    assert f"checkpoint {checkpoint} is corrupt ({damaged} differs" in line and "resume from an older one" in line


# ---- a second writer, and work that would take hours -----------------------------------------------------------


def test_a_second_step4_on_the_same_output_is_refused_before_any_work(copy_of):
    folder, options = copy_of
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_AND_WAIT, str(REPO), str(folder / "results" / "base")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = run_step_in_process(
            4, *step_config_args(4), *options, "--run", "base", "--save_path", folder / "results", cwd=folder
        )
        line = error_line(result)
        assert f"is being written by another process (PID {holder.pid})" in line and "--save_path" in line
    finally:
        holder.kill()
        holder.wait()
    assert not (folder / "results" / "base").exists()


LOCK_AND_WAIT = (
    "import sys, time; sys.path.insert(0, sys.argv[1]); from config_utils.io import lock_step_output; "
    "lock_step_output(sys.argv[2], 'x'); print('locked', flush=True); time.sleep(60)"
)


def test_resampling_that_would_take_hours_is_refused_up_front_with_an_estimate(copy_of):
    folder, options = copy_of
    result = run_step_in_process(
        4, *step_config_args(4), *options, "--run", "base", "--n-perm", "10000000000", cwd=folder
    )
    line = error_line(result)
    assert "hours of resampling" in line and "--accept-long" in line
    assert "step 4: " not in result.stderr  # refused before the first phase's progress bar


# ---- resuming another run, a damaged Aim repository, corpora and values at the edges -------------------------------


@pytest.mark.parametrize("how", ["by path", "copied in"])
def test_resuming_another_runs_checkpoint_is_refused(copy_of, how):
    folder, options = copy_of
    checkpoints = folder / "runs" / "base" / "checkpoints"
    if how == "by path":
        resume = ["--tag", "fresh", "--resume", str(sorted(checkpoints.glob("step-*"))[0])]
    else:
        shutil.copytree(checkpoints, folder / "runs" / "fresh" / "checkpoints")
        resume = ["--tag", "fresh", "--resume", "latest"]
    line = error_line(run_step_in_process(3, *step_config_args(3), *options, *resume, cwd=folder))
    assert "is a checkpoint of run 'base', not of 'fresh'" in line and "--tag base --resume latest" in line


def test_a_damaged_aim_repository_stops_training_before_its_first_step(copy_of, trained):
    folder, options = copy_of
    shutil.copytree(trained[0] / ".aim", folder / ".aim")
    for path in (folder / ".aim").rglob("*"):
        if path.is_file():
            path.write_bytes(bytes(range(256)) * 4)
    line = error_line(run_step_in_process(3, *step_config_args(3), *options, "--tag", "new", cwd=folder))
    assert f"the Aim repository {folder / '.aim'} cannot be used" in line and "mv " in line
    assert not list((folder / "runs" / "new").glob("checkpoints/*"))


def test_a_corpus_of_control_characters_is_refused_at_the_tokenizer(tmp_path):
    corpus = tmp_path / "corpus.csv"
    rows = [f'"{chr(1 + i % 8) * 5}\x0b\x0c",{"ab"[i % 2]}' for i in range(200)]
    corpus.write_text("text,topic\n" + "\n".join(rows) + "\n", encoding="utf-8")
    options = tiny_sets(
        tmp_path,
        **{
            "dataset.load_params.source": "files",
            "dataset.load_params.data_files": f"[{corpus}]",
            "dataset.data_params.eval_topics": "[b]",
            "dataset.load_params.train_len": 60,
            "dataset.load_params.topic_len": 20,
        },
    )
    check_ok(run_step_in_process(1, *step_config_args(1), *options, cwd=tmp_path))
    line = error_line(run_step_in_process(2, *step_config_args(2), *options, cwd=tmp_path))
    assert "the tokenizer has no token but its" in line and "text_field" in line


@pytest.mark.parametrize("value", [".nan", ".inf"])
def test_a_learning_rate_that_is_not_a_number_is_refused(value):
    with pytest.raises(PipelineError, match=f"'learning_rate' must be a number >= 0.0, got {value[1:]}"):
        load_config("train", "demo/train_params.yaml", [parse_override(f"train.learning_rate={value}")])


def test_yaml_duplicate_keys_are_refused_and_anchors_work(tmp_path):
    assert read_yaml("a: &x {n: 1}\nb:\n  <<: *x\n  m: 2\n") == {"a": {"n": 1}, "b": {"n": 1, "m": 2}}
    path = tmp_path / "dataset_params.yaml"
    path.write_text("seed: 1\nseed: 2\n", encoding="utf-8")
    with pytest.raises(PipelineError, match=r"duplicate key 'seed' \(lines 1 and 2\)"):
        load_config("dataset", str(path), [])
    with pytest.raises(PipelineError, match="is a folder .* not a file: pass one of its YAML files .dataset_params"):
        load_config("dataset", str(tmp_path), [])


def test_the_fault_probe_lists_a_case_for_every_kind_of_fault():
    """tests/faults/run_faults.py (`make faults`, ten minutes) runs every case end to end; here only its catalogue."""
    listed = subprocess.run(
        [sys.executable, str(REPO / "tests" / "faults" / "run_faults.py"), "--list"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.split()
    groups = {word.split("/")[0] for word in listed if "/" in word}
    assert groups == {"corrupt", "kill", "concurrency", "corpus", "sizes", "resume", "yaml", "perm", "aim", "scale"}
