"""Bad input to a step script: exit code 2, one 'error:' line naming what to fix, and nothing half-written."""

import shutil
from pathlib import Path

import pytest
import yaml

from config_utils import PipelineError, atomic_dir
from config_utils.config import CONFIG_DIR
from helpers import (
    STEP_SCRIPTS,
    check_ok,
    error_line,
    leftover_temporaries,
    prepare_tiny_data,
    run_step,
    run_step_in_process,
    sets,
    snapshot,
    step_config_args,
    tiny_sets,
    without,
)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Steps 1 and 2 done once on a tiny builtin corpus; tests that must not change them compare snapshots."""
    tmp_path = tmp_path_factory.mktemp("pipeline")
    return tmp_path, prepare_tiny_data(tmp_path)


def assert_untouched(folder: Path, before: dict) -> None:
    assert snapshot(folder) == before
    assert leftover_temporaries(folder.parent) == []


def bad_config(tmp_path: Path, role_file: str, edit) -> Path:
    """A copy of a demo config with one edit, written to tmp_path."""
    raw = yaml.safe_load((CONFIG_DIR / "demo" / role_file).read_text(encoding="utf-8"))
    edit(raw)
    path = tmp_path / f"bad_{role_file}"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


# ---- config errors ----------------------------------------------------------------------------------


def _drop_train_len(raw):
    del raw["load_params"]["train_len"]


def _unknown_key(raw):
    raw["data_params"]["mask_probability"] = 0.2


def _string_for_int(raw):
    raw["load_params"]["train_len"] = "300"


def _out_of_range(raw):
    raw["data_params"]["mask_prob"] = 1.5


def _bad_choice(raw):
    raw["load_params"]["source"] = "ftp"


@pytest.mark.parametrize(
    "edit,expected",
    [
        (_drop_train_len, ["missing key 'load_params.train_len'"]),
        (_unknown_key, ["mask_probability", "did you mean 'mask_prob'?"]),
        (_string_for_int, ["'load_params.train_len'", "an integer", "'300'"]),
        (_out_of_range, ["'data_params.mask_prob'", "(0.0, 1.0]", "1.5"]),
        (_bad_choice, ["'load_params.source'", "hub, files, builtin", "'ftp'"]),
    ],
)
def test_step1_bad_dataset_config(tmp_path, edit, expected):
    def edit_and_redirect(raw):
        edit(raw)
        raw["data_params"]["processed_dir"] = str(tmp_path / "processed")

    path = bad_config(tmp_path, "dataset_params.yaml", edit_and_redirect)
    line = error_line(run_step(1, "--config-name", str(path), cwd=tmp_path))
    assert str(path) in line
    for text in expected:
        assert text in line
    assert not (tmp_path / "processed").exists()
    assert leftover_temporaries(tmp_path) == []


def test_step2_bad_model_config_leaves_output_alone(pipeline, tmp_path):
    """A mistyped model key stops step 2 before it touches its earlier output."""
    folder, options = pipeline
    before = snapshot(folder / "masked")
    path = bad_config(tmp_path, "model_params.yaml", lambda raw: raw.update(seq_len=32.5))
    result = run_step(
        2,
        "--config-dataset",
        "demo/dataset_params.yaml",
        "--config-model",
        str(path),
        *without(options, "model.seq_len"),
        cwd=tmp_path,
    )
    line = error_line(result)
    assert str(path) in line and "'seq_len'" in line and "an integer" in line
    assert_untouched(folder / "masked", before)


def test_step3_bad_train_config(pipeline, tmp_path):
    folder, options = pipeline
    path = bad_config(tmp_path, "train_params.yaml", lambda raw: raw.update(batch_size=0))
    result = run_step_in_process(
        3,
        "--config-dataset",
        "demo/dataset_params.yaml",
        "--config-model",
        "demo/model_params.yaml",
        "--config-train",
        str(path),
        *without(options, "train.batch_size"),
        "--set",
        f"train.save_path={tmp_path / 'runs'}",
        "--tag",
        "t",
        cwd=tmp_path,
    )
    line = error_line(result)
    assert str(path) in line and "'batch_size'" in line and ">= 1" in line
    assert not (tmp_path / "runs").exists() and not (tmp_path / ".aim").exists()


@pytest.mark.parametrize(
    "override,expected",
    [
        ("model.n_expert=4", "did you mean 'n_experts'?"),  # a role step 1 does not read
        ("train.max_steps=0", None),  # range is checked only by steps reading train
        ("optim.lr=0.1", "ROLE must be one of dataset, model, train"),
        ("dataset.seed", "expected ROLE.KEY=VALUE"),
        ("dataset.load_params.builtin.n_docs=many", "'load_params.builtin.n_docs'"),
    ],
)
def test_step1_bad_set(tmp_path, override, expected):
    result = run_step(
        1,
        *step_config_args(1),
        *sets(**{"dataset.data_params.processed_dir": tmp_path / "out"}),
        *sets(**{"dataset.load_params.builtin.n_docs": 300}),
        "--set",
        override,
        cwd=tmp_path,
    )
    if expected is None:
        check_ok(result)
        return
    line = error_line(result)
    assert expected in line
    assert f"--set {override}" in line or "(with --set overrides)" in line
    assert not (tmp_path / "out").exists()


def test_missing_config_file(tmp_path):
    line = error_line(run_step(1, "--config-name", "no_such_config.yaml", cwd=tmp_path))
    assert "'no_such_config.yaml' not found" in line


# ---- steps run out of order, or on input made with other settings ----------------------------------


def test_step2_before_step1(tmp_path):
    options = tiny_sets(tmp_path)
    line = error_line(run_step(2, *step_config_args(2), *options, cwd=tmp_path))
    assert str(tmp_path / "processed" / "manifest.json") in line
    assert "python data_processors/load_dataset.py --config-name demo/dataset_params.yaml" in line
    assert not (tmp_path / "masked").exists()
    assert list(tmp_path.iterdir()) == []


def test_step3_before_step2(tmp_path):
    options = tiny_sets(tmp_path)
    line = error_line(run_step(3, *step_config_args(3), *options, "--tag", "t", cwd=tmp_path))
    assert str(tmp_path / "masked" / "manifest.json") in line and "python data_processors/dataset.py" in line
    assert list(tmp_path.iterdir()) == []


def test_step4_before_step3(pipeline, tmp_path):
    if not STEP_SCRIPTS[4].is_file():
        pytest.skip("inference/inference.py does not exist yet")
    folder, options = pipeline
    result = run_step(4, *options, "--set", f"train.save_path={tmp_path / 'runs'}", cwd=tmp_path)
    line = error_line(result)
    assert "train/train.py" in line
    assert list(tmp_path.iterdir()) == []


def test_step2_on_step1_output_made_with_other_settings(pipeline, tmp_path):
    folder, options = pipeline
    before = snapshot(folder / "masked")
    line = error_line(run_step(2, *step_config_args(2), *options, "--set", "dataset.seed=12", cwd=tmp_path))
    assert "seed=11" in line and "seed=12" in line and "load_dataset.py" in line
    assert_untouched(folder / "masked", before)


def test_step2_ignores_settings_step1_does_not_use(pipeline, tmp_path):
    """mask_prob and the tokenizer are step 2's own: changing them must not ask for step 1 again."""
    folder, options = pipeline
    check_ok(
        run_step(
            2,
            *step_config_args(2),
            *options,
            *sets(**{"dataset.data_params.mask_prob": 0.3, "dataset.data_params.masked_dir": tmp_path / "masked"}),
            cwd=tmp_path,
        )
    )
    assert (tmp_path / "masked" / "manifest.json").is_file()


@pytest.mark.parametrize(
    "override,expected",
    [
        ("model.seq_len=16", ["model seq_len=16", "32 tokens", "model.seq_len=32"]),
        ("model.vocab_size=5000", ["model vocab_size=5000", "vocab_size to null"]),
        (
            "dataset.data_params.mask_prob=0.3",
            ["data_params.mask_prob=0.15", "data_params.mask_prob=0.3", "data_processors/dataset.py"],
        ),
    ],
)
def test_step3_refuses_step2_output_made_with_other_settings(pipeline, tmp_path, override, expected):
    folder, options = pipeline
    before = snapshot(folder)
    options = [*options, *sets(**{"train.save_path": tmp_path / "runs", "train.aim_repo": tmp_path})]
    line = error_line(
        run_step_in_process(3, *step_config_args(3), *options, "--set", override, "--tag", "t", cwd=tmp_path)
    )
    for text in expected:
        assert text in line
    assert list(tmp_path.iterdir()) == []
    assert snapshot(folder) == before


def test_step3_corrupt_step2_manifest(pipeline, tmp_path):
    folder, options = pipeline
    masked = tmp_path / "masked"
    shutil.copytree(folder / "masked", masked)
    (masked / "manifest.json").write_text('{"step": "dataset", ', encoding="utf-8")
    options = [*options, *sets(**{"dataset.data_params.masked_dir": masked, "train.save_path": tmp_path / "runs"})]
    line = error_line(run_step_in_process(3, *step_config_args(3), *options, "--tag", "t", cwd=tmp_path))
    assert "corrupt" in line and "data_processors/dataset.py" in line
    assert not (tmp_path / "runs").exists()


# ---- bad or missing data (step 1) ----------------------------------------------------------------------


def test_evaluation_topic_not_in_corpus(pipeline, tmp_path):
    folder, options = pipeline
    before = snapshot(folder / "processed")
    line = error_line(
        run_step(
            1,
            *step_config_args(1),
            *options,
            "--set",
            "dataset.data_params.eval_topics=[programming, knitting]",
            cwd=tmp_path,
        )
    )
    assert "evaluation topic 'knitting' is not in the corpus" in line
    assert "cooking" in line  # names the topics that are there
    assert_untouched(folder / "processed", before)


def test_corpus_empty_after_train_topics_filter(tmp_path):
    options = tiny_sets(tmp_path, **{"dataset.data_params.train_topics": "[knitting]"})
    line = error_line(run_step(1, *step_config_args(1), *options, cwd=tmp_path))
    assert "empty after filtering" in line and "train_topics" in line and "other_topic" in line
    assert list(tmp_path.iterdir()) == []


def test_eval_topic_also_in_train_topics(tmp_path):
    options = tiny_sets(tmp_path, **{"dataset.data_params.train_topics": "[gaming, cooking]"})
    line = error_line(run_step(1, *step_config_args(1), *options, cwd=tmp_path))
    assert "gaming" in line and "eval_topics" in line and "train_topics" in line
    assert list(tmp_path.iterdir()) == []


def files_sets(tmp_path: Path, data_files: str, **extra) -> list[str]:
    return tiny_sets(
        tmp_path,
        **{
            "dataset.load_params.source": "files",
            "dataset.load_params.data_files": data_files,
            "dataset.load_params.text_field": "body",
            "dataset.load_params.topic_field": "subreddit",
            **extra,
        },
    )


def test_csv_with_empty_text_column(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "posts.csv").write_text(
        "title,body,subreddit\na,,programming\nb,,gaming\nc,,cooking\nd,  ,cooking\n", encoding="utf-8"
    )
    line = error_line(run_step(1, *step_config_args(1), *files_sets(tmp_path, f"[{data / 'posts.csv'}]"), cwd=tmp_path))
    assert "empty after filtering" in line and "'empty': 4" in line and "text_field" in line
    assert not (tmp_path / "processed").exists()


def test_csv_that_is_not_utf8(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "latin.csv").write_bytes(b"title,body,subreddit\n\xff\xfe,caf\xe9 \xc3\x28 na\xefve,gaming\n")
    line = error_line(run_step(1, *step_config_args(1), *files_sets(tmp_path, f"[{data / 'latin.csv'}]"), cwd=tmp_path))
    assert f"data file '{data / 'latin.csv'}' could not be read" in line and "UTF-8" in line
    assert not (tmp_path / "processed").exists()


@pytest.mark.parametrize(
    "pattern,expected",
    [
        ("[{data}/*.jsonl]", "not found"),
        ("[{data}/missing.csv]", "not found"),
        ("[]", "data_files is empty"),
        ("[{data}/notes.txt]", "unsupported type"),
    ],
)
def test_data_files_that_do_not_exist_or_fit(tmp_path, pattern, expected):
    data = tmp_path / "data"
    data.mkdir()
    (data / "notes.txt").write_text("hello\n", encoding="utf-8")
    line = error_line(run_step(1, *step_config_args(1), *files_sets(tmp_path, pattern.format(data=data)), cwd=tmp_path))
    assert expected in line
    assert not (tmp_path / "processed").exists()


def test_data_file_without_the_text_column(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "posts.jsonl").write_text('{"text": "hello", "subreddit": "gaming"}\n', encoding="utf-8")
    line = error_line(
        run_step(1, *step_config_args(1), *files_sets(tmp_path, f"[{data / 'posts.jsonl'}]"), cwd=tmp_path)
    )
    assert "no column 'body'" in line and "text" in line and "text_field" in line


def test_hub_offline_points_to_the_demo_and_files(tmp_path):
    """The full-scale config streams from the hub; offline that fails at once with a way out."""
    result = run_step(
        1, *sets(**{"dataset.data_params.processed_dir": tmp_path / "processed"}), cwd=tmp_path, timeout=60
    )
    line = error_line(result)
    assert "sentence-transformers/reddit-title-body" in line
    assert "--config-name demo/dataset_params.yaml" in line and "source=files" in line
    assert not (tmp_path / "processed").exists()


def test_missing_tokenizer_folder(pipeline, tmp_path):
    folder, options = pipeline
    options = [
        *options,
        *sets(
            **{
                "dataset.data_params.tokenizer_name": tmp_path / "no_tokenizer",
                "dataset.data_params.masked_dir": tmp_path / "masked",
            }
        ),
    ]
    line = error_line(run_step(2, *step_config_args(2), *options, cwd=tmp_path))
    assert "cannot load tokenizer" in line and "tokenizer_name=null" in line
    assert not (tmp_path / "masked").exists()


# ---- checkpoints -----------------------------------------------------------------------------------------


@pytest.fixture
def saved_model(pipeline, tmp_path):
    from transformers import AutoTokenizer

    from models import MoEEncoderConfig, MoEEncoderForMaskedLM
    from train.final_model import save_model

    folder, _ = pipeline
    tokenizer = AutoTokenizer.from_pretrained(str(folder / "masked" / "tokenizer"))
    config = MoEEncoderConfig(
        vocab_size=len(tokenizer),
        embedding_dim=16,
        seq_len=32,
        num_head=2,
        n_encoder_blocks=1,
        n_experts=2,
        top_k_experts=1,
        moe_dim=16,
        pad_token_id=tokenizer.pad_token_id,
    )
    return save_model(MoEEncoderForMaskedLM(config), tokenizer, tmp_path / "model", {"step": 1})


def test_load_model_round_trip(saved_model):
    from train.final_model import load_model

    model, tokenizer = load_model(saved_model)
    assert model.config.n_experts == 2 and len(tokenizer) == model.config.vocab_size
    assert not list(saved_model.glob("*.bin")) and not list(saved_model.glob("*.pt"))  # safetensors only
    assert leftover_temporaries(saved_model.parent) == []


def test_load_model_without_weights(saved_model):
    from train.final_model import load_model

    (saved_model / "model.safetensors").unlink()
    with pytest.raises(PipelineError, match="model.safetensors is missing"):
        load_model(saved_model)


def test_load_model_truncated_weights(saved_model):
    from train.final_model import load_model

    weights = saved_model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(PipelineError) as caught:
        load_model(saved_model)
    assert "corrupt" in str(caught.value) and str(saved_model) in str(caught.value)
    assert "\n" not in str(caught.value)


def test_load_model_corrupt_config(saved_model):
    from train.final_model import load_model

    (saved_model / "config.json").write_text("{", encoding="utf-8")
    with pytest.raises(PipelineError, match="corrupt"):
        load_model(saved_model)


def test_find_run_without_finished_run(tmp_path):
    from train.final_model import find_run

    with pytest.raises(PipelineError, match="no finished training run"):
        find_run(str(tmp_path), None, "python train/train.py")
    (tmp_path / "half").mkdir()
    with pytest.raises(PipelineError, match="no finished model"):
        find_run(str(tmp_path), "half", "python train/train.py")


# ---- atomic outputs -----------------------------------------------------------------------------------------


def test_atomic_dir_keeps_the_old_output_when_interrupted(tmp_path):
    final = tmp_path / "out"
    with atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("old", encoding="utf-8")
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(final) as tmp:
            (tmp / "a.txt").write_text("new, half", encoding="utf-8")
            raise KeyboardInterrupt
    assert (final / "a.txt").read_text(encoding="utf-8") == "old"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]
    with atomic_dir(final) as tmp:
        (tmp / "b.txt").write_text("new", encoding="utf-8")
    assert sorted(path.name for path in final.iterdir()) == ["b.txt"]  # replaced, not merged
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]
