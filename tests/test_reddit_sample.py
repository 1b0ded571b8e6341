"""Step 1 (and 2) on real text: the Reddit sample in ../shared/data, read through the `files` source."""

import json
from collections import Counter
from pathlib import Path

import datasets
import pytest

from helpers import check_ok, run_step, sets, step_config_args

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "reddit_sample"
EVAL_TOPICS = ["programming", "gaming"]
LENS = {"train_len": 300, "valid_len": 60, "test_len": 60, "topic_len": 150}

pytestmark = pytest.mark.skipif(not SAMPLE.is_dir() or not list(SAMPLE.glob("*.csv")), reason=f"{SAMPLE} is absent")


def reddit_sets(tmp_path: Path) -> list[str]:
    return sets(
        **{
            "dataset.load_params.source": "files",
            "dataset.load_params.data_files": f"[{SAMPLE}/*.csv]",
            "dataset.load_params.text_field": "body",
            "dataset.load_params.topic_field": "subreddit",
            **{f"dataset.load_params.{key}": value for key, value in LENS.items()},
            "dataset.data_params.eval_topics": "[programming, gaming]",
            "dataset.data_params.tokenizer_vocab_size": 1000,
            "dataset.data_params.processed_dir": tmp_path / "processed",
            "dataset.data_params.masked_dir": tmp_path / "masked",
            "dataset.data_params.num_proc": 1,
            "model.seq_len": 48,
        }
    )


@pytest.fixture(scope="module")
def step1_output(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("reddit")
    options = reddit_sets(tmp_path)
    result = check_ok(run_step(1, *step_config_args(1), *options, cwd=tmp_path))
    return tmp_path, options, result


def read_rows(path: Path) -> list[dict]:
    return datasets.Dataset.from_parquet(str(path)).to_list()


def test_step1_on_reddit_sample(step1_output):
    tmp_path, _, result = step1_output
    processed = tmp_path / "processed"
    manifest = json.loads((processed / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["config"]["load_params"]["source"] == "files"
    assert sorted(manifest["files"]["topics"]) == sorted(EVAL_TOPICS)

    outputs = {name: read_rows(processed / manifest["files"][name]) for name in ("train", "valid", "test")}
    for topic in EVAL_TOPICS:
        outputs[f"topic:{topic}"] = read_rows(processed / manifest["files"]["topics"][topic])

    # the sample holds 1000 posts per evaluation topic and ~900 others: every bucket is full
    for name in ("train", "valid", "test"):
        assert len(outputs[name]) == manifest["counts"][name] == LENS[f"{name}_len"]
        assert not {row["topic"] for row in outputs[name]} & set(EVAL_TOPICS)
        assert len({row["topic"] for row in outputs[name]}) > 10  # many subreddits, not one
    for topic in EVAL_TOPICS:
        rows = outputs[f"topic:{topic}"]
        assert len(rows) == manifest["counts"]["topics"][topic] == LENS["topic_len"]
        assert {row["topic"] for row in rows} == {topic}

    all_rows = [row for rows in outputs.values() for row in rows]
    texts = [row["text"] for row in all_rows]
    assert all(text.strip() == text and text for text in texts)  # stripped, never empty
    assert len(set(texts)) == len(texts)  # no duplicate across splits and topics
    doc_ids = [row["doc_id"] for row in all_rows]
    assert len(set(doc_ids)) == len(doc_ids)
    assert any("\n" in text for text in texts)  # quoted multi-line bodies were read whole
    assert sum(Counter(row["topic"] for row in outputs["train"]).values()) == manifest["counts"]["train"]
    assert manifest["train_topic_counts"] == dict(Counter(row["topic"] for row in outputs["train"]).most_common(50))
    assert "warning" not in result.stderr


def test_step1_on_reddit_sample_is_reproducible(step1_output, tmp_path):
    first_dir, options, _ = step1_output
    options = [*options, *sets(**{"dataset.data_params.processed_dir": tmp_path / "processed"})]
    check_ok(run_step(1, *step_config_args(1), *options, cwd=tmp_path))
    for name in ("train.parquet", "valid.parquet", "test.parquet", "topics/gaming.parquet"):
        assert read_rows(first_dir / "processed" / name) == read_rows(tmp_path / "processed" / name)


def test_step2_on_reddit_sample(step1_output):
    """Real text through step 2: the trained tokenizer covers it (few [UNK]) and every split is written."""
    from transformers import AutoTokenizer

    tmp_path, options, _ = step1_output
    check_ok(run_step(2, *step_config_args(2), *options, cwd=tmp_path))
    masked = tmp_path / "masked"
    manifest = json.loads((masked / "manifest.json").read_text(encoding="utf-8"))
    tokenizer = AutoTokenizer.from_pretrained(str(masked / "tokenizer"))
    for name in ("train", "valid", "test", "topics/programming", "topics/gaming"):
        data = datasets.load_from_disk(str(masked / name)).with_format("numpy")[:]
        assert data["input_ids"].shape[1] == 48
        real = data["attention_mask"] == 1
        assert (data["input_ids"][real] == tokenizer.unk_token_id).mean() < 0.01
        assert manifest["counts"][name]["documents"] == len(data["doc_id"])
