"""Step 1 streams its kept rows to Parquet (bounded memory) with the same rows, order and counts as lists."""

import json
from collections import Counter

import datasets
import pyarrow.parquet as pq

# isort: off
from helpers import check_ok, run_step_in_process, step_config_args, tiny_sets
from data_processors import load_dataset  # its import points sys.path[0] at the repo: import helpers first

# isort: on
from data_processors.builtin_corpus import generate_documents
from data_processors.load_dataset import SCHEMA, ParquetRows
from data_processors.splitting import SPLITS, split_corpus

LENS = {"train": 300, "valid": 40, "test": 40}


def split(new_bucket=None, eval_topics=("programming",)):
    kwargs = {} if new_bucket is None else {"new_bucket": new_bucket}
    return split_corpus(generate_documents(600, 4, 0.0, 5), LENS, 40, list(eval_topics), [], **kwargs)


def test_parquet_rows_hold_what_the_lists_hold(tmp_path):
    expected = split()
    writers = {}

    def new_bucket(kind, name):
        writers[(kind, name)] = ParquetRows(tmp_path / f"{kind}_{name}.parquet", rows_per_group=7)
        return writers[(kind, name)]

    streamed = split(new_bucket)
    for writer in writers.values():
        writer.close()
        writer.close()  # closing twice is harmless
    assert set(writers) == {("split", name) for name in SPLITS} | {("topic", "programming")}
    for (kind, name), writer in writers.items():
        rows = (expected.splits if kind == "split" else expected.topics)[name]
        assert len(writer) == len(rows) > 0
        assert writer.topic_counts == Counter(row["topic"] for row in rows)
        assert list(writer.topic_counts) == list(Counter(row["topic"] for row in rows))  # same first-seen order
        parquet = pq.ParquetFile(writer.path)
        assert parquet.schema_arrow.equals(SCHEMA, check_metadata=True)  # the `huggingface` features metadata
        assert max(parquet.metadata.row_group(i).num_rows for i in range(parquet.metadata.num_row_groups)) <= 7
        assert parquet.read().to_pylist() == rows
        assert datasets.Dataset.from_parquet(str(writer.path)).to_list() == rows
    assert streamed.dropped == expected.dropped and streamed.topics_seen == expected.topics_seen


def test_an_empty_bucket_is_a_readable_file_with_the_schema(tmp_path):
    with ParquetRows(tmp_path / "empty.parquet") as writer:
        pass
    assert len(writer) == 0
    table = pq.read_table(tmp_path / "empty.parquet")
    assert table.num_rows == 0 and table.schema.equals(SCHEMA, check_metadata=True)


def test_step1_writes_bounded_row_groups_with_the_rows_split_corpus_keeps(tmp_path, monkeypatch):
    monkeypatch.setattr(load_dataset, "ROWS_PER_GROUP", 64)
    options = tiny_sets(tmp_path)
    check_ok(run_step_in_process(1, *step_config_args(1), *options, cwd=tmp_path))
    processed = tmp_path / "processed"
    manifest = json.loads((processed / "manifest.json").read_text(encoding="utf-8"))

    # the same split, kept in lists (tiny_sets: 600 documents; the demo's seed 11, 4 topics, evaluation topics)
    expected = split_corpus(
        generate_documents(600, 4, 0.0, 11), {"train": 300, "valid": 40, "test": 40}, 40, ["programming", "gaming"], []
    )
    for name in SPLITS:
        path = processed / manifest["files"][name]
        metadata = pq.ParquetFile(path).metadata
        assert all(metadata.row_group(i).num_rows <= 64 for i in range(metadata.num_row_groups))
        assert pq.read_table(path).to_pylist() == expected.splits[name]
        assert manifest["counts"][name] == len(expected.splits[name])
    train_rows = len(expected.splits["train"])
    assert train_rows > 128  # several row groups
    assert pq.ParquetFile(processed / manifest["files"]["train"]).metadata.num_row_groups == -(-train_rows // 64)
    for topic, rows in expected.topics.items():
        assert pq.read_table(processed / manifest["files"]["topics"][topic]).to_pylist() == rows
        assert manifest["counts"]["topics"][topic] == len(rows)
    assert manifest["train_topic_counts"] == dict(
        Counter(row["topic"] for row in expected.splits["train"]).most_common(50)
    )
    assert manifest["dropped"] == dict(expected.dropped)
    assert [path.name for path in tmp_path.iterdir() if ".tmp" in path.name] == []
