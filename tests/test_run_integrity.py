"""Runs you can trust: no step mixes runs, data or tokenizers, and bad input ends in one line, never a traceback.

Each test here reproduces a case that once lost or corrupted results silently (or ended in a traceback).
"""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from safetensors.numpy import load_file

from config_utils.io import safe_file_stem, safe_file_stems
from helpers import (
    REPO,
    check_ok,
    error_line,
    leftover_temporaries,
    run_step_in_process,
    sets,
    step_config_args,
    tiny_sets,
)


def steps_1_2(tmp_path: Path, options: list[str]) -> None:
    for step in (1, 2):
        check_ok(run_step_in_process(step, *step_config_args(step), *options, cwd=tmp_path))


def train(tmp_path: Path, options: list[str], *extra: str):
    return run_step_in_process(3, *step_config_args(3), *options, *extra, cwd=tmp_path)


def weights(run_dir: Path) -> dict:
    return load_file(str(run_dir / "model" / "model.safetensors"))


def printed_command(line: str, flag: str) -> list[str]:
    """The command in backticks of an error line that ends with `flag`, as argv for this interpreter."""
    commands = [text for text in re.findall(r"`([^`]+)`", line) if text.endswith(flag)]
    assert commands, line
    argv = shlex.split(commands[0])
    assert argv[0] == "python"
    return [sys.executable, *argv[1:]]


def run_printed(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("integrity")
    options = tiny_sets(tmp_path, **{"train.save_steps": 1})
    steps_1_2(tmp_path, options)
    return tmp_path, options


# ---- 1. --overwrite and restarting a tag ------------------------------------------------------------------


def test_overwrite_starts_from_an_empty_run_folder(data):
    tmp_path, options = data
    runs = tmp_path / "runs"
    check_ok(train(tmp_path, options, "--tag", "over", *sets(**{"train.max_steps": 3})))
    check_ok(train(tmp_path, options, "--tag", "fresh", *sets(**{"train.random_seed": 5})))
    check_ok(train(tmp_path, options, "--tag", "over", "--overwrite", *sets(**{"train.random_seed": 5})))
    # the overwritten run is exactly a run that never had a predecessor, with only its own checkpoints
    new, fresh = weights(runs / "over"), weights(runs / "fresh")
    assert all(np.array_equal(new[name], fresh[name]) for name in fresh)
    checkpoints = sorted(path.name for path in (runs / "over" / "checkpoints").iterdir())
    assert checkpoints == ["step-000001", "step-000002"]
    for folder in (runs / "over" / "checkpoints").iterdir():
        state = json.loads((folder / "trainer_state.json").read_text())
        assert state["config"]["train"]["random_seed"] == 5 and state["total_steps"] == 2
    assert leftover_temporaries(runs) == []


def test_a_tag_with_checkpoints_is_refused_and_the_hints_work_verbatim(data):
    tmp_path, options = data
    runs = tmp_path / "runs"
    check_ok(train(tmp_path, options, "--tag", "again"))
    (runs / "again" / "model").rename(runs / "again" / "model-gone")  # as if it had been interrupted
    before = sorted(path.name for path in (runs / "again" / "checkpoints").iterdir())
    line = error_line(train(tmp_path, options, "--tag", "again"))
    assert "unfinished run (checkpoints up to step-000002)" in line
    assert sorted(path.name for path in (runs / "again" / "checkpoints").iterdir()) == before
    # both printed commands run as written, from the repository root as the README runs them
    check_ok(run_printed(printed_command(line, "--resume latest"), REPO))
    check_ok(run_printed(printed_command(line, "--overwrite"), REPO))


def test_overwrite_and_resume_together_are_refused(data):
    tmp_path, options = data
    assert "pass one of them" in error_line(
        train(tmp_path, options, "--tag", "both", "--overwrite", "--resume", "latest")
    )


# ---- 2-4. each step checks the whole chain of its inputs -------------------------------------------------


def test_step4_and_resume_refuse_a_run_trained_on_other_step2_data(tmp_path):
    options = tiny_sets(tmp_path)
    steps_1_2(tmp_path, options)
    check_ok(train(tmp_path, options, "--tag", "a"))
    # the same configs but another corpus seed: other documents, another tokenizer, same sizes
    other = [*options, *sets(**{"dataset.seed": 12})]
    steps_1_2(tmp_path, other)
    line = error_line(
        run_step_in_process(
            4, *step_config_args(4), *other, "--run", "a", "--save_path", tmp_path / "results", cwd=tmp_path
        )
    )
    assert "trained on another step-2 output" in line and "--overwrite" in line
    assert not (tmp_path / "results" / "a").exists()
    line = error_line(train(tmp_path, other, "--tag", "a", "--resume", "latest"))
    assert "trained on another step-2 output" in line


def test_step3_refuses_step2_output_made_before_step1_was_rerun_on_changed_data(tmp_path):
    corpus = tmp_path / "corpus.csv"
    rows = [f"doc {i} about {'cats' if i % 2 else 'dogs'} and words {i * 7}" for i in range(200)]
    write_csv(corpus, [(text, "a" if i % 2 else "b") for i, text in enumerate(rows)])
    options = csv_sets(tmp_path, corpus, eval_topics="[b]")
    steps_1_2(tmp_path, options)
    check_ok(run_step_in_process(1, *step_config_args(1), *options, cwd=tmp_path))
    check_ok(train(tmp_path, options, "--tag", "same"))  # step 1 rerun on the same data: same hash, still fine
    write_csv(corpus, [(text + " changed", "a" if i % 2 else "b") for i, text in enumerate(rows)])
    check_ok(run_step_in_process(1, *step_config_args(1), *options, cwd=tmp_path))
    line = error_line(train(tmp_path, options, "--tag", "stale"))
    assert "made from an earlier step-1 output" in line and "data_processors/dataset.py" in line


# ---- 5, 6, 8: topic labels are data, not paths ------------------------------------------------------------


def write_csv(path: Path, rows: list[tuple]) -> None:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["body", "subreddit"])
        writer.writerows(rows)


def csv_sets(tmp_path: Path, corpus: Path, eval_topics: str, **extra) -> list[str]:
    return tiny_sets(
        tmp_path,
        **{
            "dataset.load_params.source": "files",
            "dataset.load_params.data_files": f"[{corpus}]",
            "dataset.load_params.text_field": "body",
            "dataset.load_params.topic_field": "subreddit",
            "dataset.load_params.train_len": 60,
            "dataset.load_params.valid_len": 10,
            "dataset.load_params.test_len": 10,
            "dataset.load_params.topic_len": 30,
            "dataset.data_params.eval_topics": eval_topics,
            **extra,
        },
    )


def test_topic_labels_that_look_like_paths_or_carry_spaces(tmp_path):
    corpus = tmp_path / "corpus.csv"
    topics = ["../train", "Sci/Tech", "programming ", " programming", "world", "sports", "", None]
    rows = [(f"document {i} on {topics[i % 8]} with words {i} {i * 3} {i * 11}", topics[i % 8]) for i in range(800)]
    write_csv(corpus, rows)
    # train_len above the corpus: every row is read, so every row without a topic is counted
    options = csv_sets(
        tmp_path,
        corpus,
        eval_topics="['../train', 'Sci/Tech', 'programming']",
        **{"dataset.load_params.train_len": 1000},
    )
    result = run_step_in_process(1, *step_config_args(1), *options, cwd=tmp_path)
    check_ok(result)
    assert "no topic 200" in result.stdout  # the empty and the missing label: 100 rows each
    processed = tmp_path / "processed"
    manifest = json.loads((processed / "manifest.json").read_text())
    assert manifest["dropped"]["no_topic"] == 200
    counts = manifest["counts"]
    train_rows = pq.read_table(processed / "train.parquet").num_rows
    assert counts["train"] == train_rows == 200 - counts["valid"] - counts["test"]
    # every label has one flat file; 'programming ' and ' programming' are 'programming', held out
    assert sorted(path.parent.name for path in (processed / "topics").rglob("*.parquet")) == ["topics"] * 3
    train_topics = set(pq.read_table(processed / "train.parquet")["topic"].to_pylist())
    assert train_topics == {"world", "sports"}
    assert set(pq.read_table(processed / manifest["files"]["topics"]["programming"])["topic"].to_pylist()) == {
        "programming"
    }
    check_ok(run_step_in_process(2, *step_config_args(2), *options, cwd=tmp_path))
    masked = json.loads((tmp_path / "masked" / "manifest.json").read_text())
    assert masked["counts"]["train"]["documents"] == counts["train"]
    assert all("/" not in folder[len("topics/") :] for folder in masked["topics"].values())
    check_ok(train(tmp_path, options, "--tag", "labels"))
    check_ok(
        run_step_in_process(
            4,
            *step_config_args(4),
            *options,
            "--run",
            "labels",
            "--n-boot",
            5,
            "--n-perm",
            5,
            "--n-random-routers",
            2,
            "--save_path",
            tmp_path / "results",
            cwd=tmp_path,
        )
    )
    figures = {path.name for path in (tmp_path / "results" / "labels" / "figures").iterdir()}
    for topic in ("../train", "Sci/Tech", "programming"):
        assert f"experts_per_layer_{safe_file_stem(topic)}.png" in figures


def test_safe_file_stems_are_flat_and_unique():
    labels = ["../train", "..", "Sci/Tech", "Sci_Tech", "a b", "a_b", "c++", "c__", "gaming", "", "日本"]
    stems = safe_file_stems(labels, "topics")
    assert len(set(stems.values())) == len(labels)
    assert stems["gaming"] == "gaming" and stems["Sci_Tech"] == "Sci_Tech"
    assert all(re.fullmatch(r"[A-Za-z0-9_-]+", stem) for stem in stems.values())


# ---- 7. one writer per run folder --------------------------------------------------------------------------


def test_a_second_writer_of_a_tag_is_refused_with_the_holders_pid(data):
    tmp_path, options = data
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, time; sys.path.insert(0, sys.argv[1]); from train.run_folder import lock_run_folder; "
                "lock = lock_run_folder(sys.argv[2], 'locked'); print('locked', flush=True); time.sleep(60)"
            ),
            str(REPO),
            str(tmp_path / "runs"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        line = error_line(train(tmp_path, options, "--tag", "locked"))
        assert f"PID {holder.pid}" in line and "another training process" in line
        assert not (tmp_path / "runs" / "locked").exists()
    finally:
        holder.kill()
        holder.wait()
    check_ok(train(tmp_path, options, "--tag", "locked"))  # the lock went with its process


# ---- tracebacks and misleading output -------------------------------------------------------------------


def test_dense_baseline_is_evaluated_without_routing(tmp_path):
    options = tiny_sets(tmp_path, **{"model.n_experts": 1, "model.top_k_experts": 1})
    steps_1_2(tmp_path, options)
    check_ok(train(tmp_path, options, "--tag", "dense"))
    result = check_ok(
        run_step_in_process(
            4, *step_config_args(4), *options, "--run", "dense", "--save_path", tmp_path / "results", cwd=tmp_path
        )
    )
    assert "no routing to analyse" in result.stderr
    metrics = (tmp_path / "results" / "dense" / "metrics.csv").read_text().splitlines()
    assert metrics[0].startswith("group,") and len(metrics) == 1 + 3  # test + two held-out topics


@pytest.mark.parametrize("option,value", [("--batch_size", 0), ("--batch_size", -3), ("--max-docs-per-group", 0)])
def test_step4_rejects_non_positive_sizes(data, option, value):
    tmp_path, options = data
    line = error_line(run_step_in_process(4, *step_config_args(4), *options, option, value, cwd=tmp_path))
    assert option in line and "positive" in line


@pytest.mark.parametrize(
    "key",
    [
        "dataset.data_params.processed_dir",
        "dataset.data_params.masked_dir",
        "train.save_path",
        "train.aim_repo",
        "--save_path",
    ],
)
def test_an_output_path_that_is_a_file(data, tmp_path, key):
    folder, options = data
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder\n", encoding="utf-8")
    step = {
        "dataset.data_params.processed_dir": 1,
        "dataset.data_params.masked_dir": 2,
        "train.save_path": 3,
        "train.aim_repo": 3,
        "--save_path": 4,
    }[key]
    extra = ["--save_path", a_file] if key == "--save_path" else sets(**{key: a_file})
    if step == 3:
        extra += ["--tag", "file"]
    line = error_line(run_step_in_process(step, *step_config_args(step), *options, *extra, cwd=folder))
    assert key in line and "is a file" in line
    assert a_file.read_text(encoding="utf-8") == "not a folder\n"


def test_mask_prob_zero_is_refused(tmp_path):
    line = error_line(
        run_step_in_process(
            1, *step_config_args(1), *tiny_sets(tmp_path), *sets(**{"dataset.data_params.mask_prob": 0}), cwd=tmp_path
        )
    )
    assert "mask_prob" in line and "(0.0, 1.0]" in line


def test_learning_rate_in_e_notation_is_a_number(tmp_path):
    from config_utils.config import load_config, parse_override

    config = load_config("train", "demo/train_params.yaml", [parse_override("train.learning_rate=1e-3")])
    assert config.learning_rate == 0.001
    line = error_line(
        run_step_in_process(
            1, *step_config_args(1), *tiny_sets(tmp_path), "--set", "dataset.data_params.mask_prob='1e-1'", cwd=tmp_path
        )
    )
    assert "'1e-1'" in line  # quoted, it is still a string


@pytest.mark.parametrize("kind", ["int_text", "list_text", "object_topic"])
def test_columns_that_are_not_text_or_labels(tmp_path, kind):
    if kind == "list_text":
        path = tmp_path / "posts.parquet"
        pq.write_table(pa.table({"body": [["a", "b"], ["c"]], "subreddit": ["x", "y"]}), path)
    else:
        path = tmp_path / "posts.jsonl"
        rows = (
            [{"body": 5, "subreddit": "a"}, {"body": 7, "subreddit": "b"}]
            if kind == "int_text"
            else [{"body": "hello", "subreddit": "a"}, {"body": "there", "subreddit": {"name": "b"}}]
        )
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    options = csv_sets(tmp_path, path, eval_topics="[a]")
    line = error_line(run_step_in_process(1, *step_config_args(1), *options, cwd=tmp_path))
    column = "'subreddit'" if kind == "object_topic" else "'body'"
    assert str(path) in line and column in line
    assert not (tmp_path / "processed").exists()


def test_stale_temporaries_of_a_killed_writer_are_removed(data, tmp_path):
    folder, options = data
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".processed.tmp-{dead.pid}"
    stale.mkdir()
    (stale / "train.parquet").write_bytes(b"half")
    check_ok(
        run_step_in_process(
            1,
            *step_config_args(1),
            *options,
            *sets(**{"dataset.data_params.processed_dir": tmp_path / "processed"}),
            cwd=folder,
        )
    )
    assert not stale.exists()
    assert (tmp_path / "processed" / "manifest.json").is_file()


def test_disk_full_is_one_line_and_keeps_the_previous_output(data, tmp_path):
    folder, options = data
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        filler = small / "filler"
        filler.write_bytes(b"0" * (os.statvfs(small).f_bavail * os.statvfs(small).f_frsize - 16 * 1024))
        for step, key in ((1, "dataset.data_params.processed_dir"), (2, "dataset.data_params.masked_dir")):
            target = small / key.rsplit(".", 1)[1]
            target.mkdir()
            (target / "previous.txt").write_text("earlier output\n", encoding="utf-8")
            line = error_line(
                run_step_in_process(step, *step_config_args(step), *options, *sets(**{key: target}), cwd=folder)
            )
            assert "no space left" in line and str(small) in line and "needs at least" in line
            assert (target / "previous.txt").read_text(encoding="utf-8") == "earlier output\n"
            assert leftover_temporaries(small) == []
        line = error_line(train(folder, options, "--tag", "full", *sets(**{"train.save_path": small / "runs"})))
        assert "no space left" in line
    finally:
        subprocess.run(["umount", "-l", str(small)], capture_output=True)  # lazy: a mapped file may still be open


# ---- long documents: step 2 reads only what seq_len can use -------------------------------------------------

REDDIT = REPO.parent / "shared" / "data" / "reddit_sample"


def test_encode_reads_the_start_of_long_texts_and_gives_the_plain_result():
    from data_processors.dataset import encode
    from data_processors.tokenizer import train_wordpiece

    texts = [f"Sentence {i}: the cat's toy (a ball) cost ${i}.99, didn't it?\n" for i in range(200)]
    if REDDIT.is_dir():  # real text: markdown, URLs, emoji, code
        import csv

        for path in sorted(REDDIT.glob("*.csv")):
            with open(path, newline="", encoding="utf-8") as handle:
                texts += [row["body"] for row in csv.DictReader(handle)][:400]
    tokenizer = train_wordpiece(lambda: iter([texts]), 500, len(texts))
    # words that give no token (control characters) and one word that never ends
    texts += ["\x00 \x01 " * 40 + "end of it", "x" * 5000, "word " * 100_000]
    for seq_len in (8, 32, 128):
        plain = tokenizer(texts, truncation=True, padding="max_length", max_length=seq_len)
        fast = encode(tokenizer, texts, seq_len)
        for key in plain:
            assert fast[key] == plain[key], (seq_len, key)
    seen = []  # what the tokenizer is given for a 50 MB document: its start, not the whole (timing is a benchmark's)

    class Recording:
        def __call__(self, texts, **options):
            seen.extend(len(text) for text in texts)
            return tokenizer(texts, **options)

    encode(Recording(), ["word " * 10_000_000], 64)
    assert seen and max(seen) < 1000


def test_pruning_removes_the_temporaries_of_a_killed_checkpoint_write(tmp_path):
    from train.checkpoints import prune_checkpoints

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    checkpoints = tmp_path / "run" / "checkpoints"
    for name in (
        f".step-000004.tmp-{dead.pid}",
        f".step-000002.deleting-{dead.pid}",
        f".step-000006.tmp-{os.getpid()}",
    ):
        (checkpoints / name).mkdir(parents=True)
    prune_checkpoints(tmp_path / "run", keep=3)
    assert sorted(path.name for path in checkpoints.iterdir()) == [f".step-000006.tmp-{os.getpid()}"]  # ours: alive


def test_pruning_takes_the_checkpoints_interruptions_wrote_before_the_regular_ones(tmp_path):
    """step 4 --checkpoint reads the regular ones (every save_steps): an interruption must not push one out."""
    from config_utils.contracts import STATE_FILE
    from train.checkpoints import prune_checkpoints

    checkpoints = tmp_path / "run" / "checkpoints"
    for step in (10, 17, 20, 23, 30, 33):  # 17, 23 and 33 written by interruptions (save_steps 10)
        (checkpoints / f"step-{step:06d}").mkdir(parents=True)
        (checkpoints / f"step-{step:06d}" / STATE_FILE).write_text("{}")
    prune_checkpoints(tmp_path / "run", keep=4, save_steps=10)
    assert sorted(path.name for path in checkpoints.iterdir()) == [f"step-0000{s}" for s in (10, 20, 30, 33)]
    prune_checkpoints(tmp_path / "run", keep=2, save_steps=10)  # 33 is the newest: the one to resume from
    assert sorted(path.name for path in checkpoints.iterdir()) == ["step-000030", "step-000033"]
