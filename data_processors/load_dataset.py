"""Step 1: load a topic-labelled corpus, hold out the evaluation topics, write the splits.

Writes to data_params.processed_dir: train/valid/test.parquet, topics/<file stem>.parquet (one per
evaluation topic; the manifest maps each label to its file) and manifest.json. Topic labels are
stripped of surrounding whitespace; rows with an empty or missing text or topic are dropped and counted.
Rows are written as they are kept, in Parquet row groups of
ROWS_PER_GROUP rows: memory does not grow with the corpus (only the set of text digests that finds
duplicates does, about 100 bytes a document), and step 2 reads the files back a row group at a time.
Example:
    python data_processors/load_dataset.py --config-name demo/dataset_params.yaml
"""

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # run as a script: import the project, not this folder

import contextlib
import time
from collections import Counter

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

from config_utils import PipelineError, atomic_dir, load_step_configs, run_step, step_parser
from config_utils.contracts import step2_command
from config_utils.io import check_output_folder, lock_step_output, safe_file_stems, write_sealed_manifest
from data_processors.sources import open_source
from data_processors.splitting import SPLITS, iter_with_progress, split_corpus

ROWS_PER_GROUP = 10_000  # rows buffered per output file, and the row group size step 2 reads at once
FEATURES = datasets.Features(
    {"doc_id": datasets.Value("int64"), "text": datasets.Value("string"), "topic": datasets.Value("string")}
)
DROP_REASONS = {
    "empty": "empty text",
    "no_topic": "no topic",
    "duplicate": "duplicate text",
    "other_topic": "topic outside train_topics",
    "surplus": "beyond the split sizes",
}
SCHEMA = FEATURES.arrow_schema  # with the `huggingface` metadata, as Dataset.to_parquet writes it


class ParquetRows:
    """A split's rows, appended one at a time and written to a Parquet file every `rows_per_group` rows.

    len() is the number of rows appended; topic_counts counts their topics (in first-seen order).
    Use as a context manager: leaving it writes the last rows and the file's footer.
    """

    def __init__(self, path: Path, rows_per_group: int | None = None):
        self.path, self.rows_per_group = path, rows_per_group or ROWS_PER_GROUP
        self.topic_counts: Counter = Counter()
        self._writer = pq.ParquetWriter(str(path), SCHEMA)
        self._columns: dict[str, list] = {name: [] for name in SCHEMA.names}
        self._count = 0

    def append(self, row: dict) -> None:
        for name, column in self._columns.items():
            column.append(row[name])
        self.topic_counts[row["topic"]] += 1
        self._count += 1
        if len(self._columns["doc_id"]) >= self.rows_per_group:
            self._flush()

    def __len__(self) -> int:
        return self._count

    def _flush(self) -> None:
        if self._columns["doc_id"]:
            self._writer.write_table(pa.Table.from_pydict(self._columns, schema=SCHEMA))
            self._columns = {name: [] for name in SCHEMA.names}

    def close(self) -> None:
        if self._writer is not None:
            try:
                self._flush()
            finally:
                self._writer.close()
                self._writer = None

    def __enter__(self) -> "ParquetRows":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_held_out(data_params) -> None:
    """An evaluation topic must not also be a training topic."""
    overlap = set(data_params.eval_topics) & set(data_params.train_topics)
    if overlap:
        raise PipelineError(
            f"dataset config: {sorted(overlap)} is in both data_params.eval_topics and "
            f"train_topics; an evaluation topic must be held out of training"
        )


def stream_splits(tmp_dir: Path, rows, expected, config, files: dict, topic_files: dict, split_lens: dict):
    """Split the corpus into the splits and evaluation topics, each row written to its Parquet file as it is kept;
    every file is closed (last rows and footer written) on return. Returns split_corpus's result."""
    load_params, data_params = config.load_params, config.data_params
    (tmp_dir / "topics").mkdir()
    with contextlib.ExitStack() as writers:

        def new_bucket(kind: str, name: str) -> ParquetRows:
            path = tmp_dir / (files[name] if kind == "split" else topic_files[name])
            return writers.enter_context(ParquetRows(path))

        return split_corpus(
            iter_with_progress(rows, expected, f"step 1: reading {load_params.source} corpus"),
            split_lens,
            load_params.topic_len,
            data_params.eval_topics,
            data_params.train_topics,
            new_bucket,
        )


def warn_short(result, split_lens: dict, topic_len: int) -> None:
    """A warning on stderr for each split and evaluation topic with fewer documents than asked."""
    for name in SPLITS:
        if len(result.splits[name]) < split_lens[name]:
            print(
                f"warning: {name} has {len(result.splits[name])} documents, fewer than {name}_len="
                f"{split_lens[name]}: the corpus is smaller than asked",
                file=sys.stderr,
            )
    for topic, topic_rows in result.topics.items():
        if len(topic_rows) < topic_len:
            print(
                f"warning: evaluation topic '{topic}' has {len(topic_rows)} documents, fewer than "
                f"topic_len={topic_len}",
                file=sys.stderr,
            )


def write_manifest(folder: Path, config, result, files: dict, topic_files: dict, started: float) -> None:
    write_sealed_manifest(
        folder,
        {
            "step": "load_dataset",
            "config": config,
            "seed": config.seed,
            "files": {**files, "topics": topic_files},
            "counts": {
                **{name: len(result.splits[name]) for name in SPLITS},
                "topics": {topic: len(topic_rows) for topic, topic_rows in result.topics.items()},
            },
            "train_topic_counts": dict(result.splits["train"].topic_counts.most_common(50)),
            "dropped": dict(result.dropped),
            "content_hash": result.content.hexdigest(),  # changes when the corpus does, even at equal counts
            "seconds": round(time.time() - started, 2),
        },
    )


def print_done(result, out_dir: Path, args) -> None:
    """The one-line summary (documents per split and topic, drops by reason) and the next step's command."""
    counts = ", ".join(f"{name} {len(result.splits[name])}" for name in SPLITS)
    topics = ", ".join(f"{topic} {len(topic_rows)}" for topic, topic_rows in result.topics.items())
    dropped = ", ".join(f"{DROP_REASONS.get(reason, reason)} {count}" for reason, count in result.dropped.items())
    print(f"step 1 done: {counts}; evaluation topics: {topics}; dropped: {dropped or 'none'}")
    print(f"wrote {out_dir}/ (next: {step2_command(args)})")


def main() -> None:
    parser = step_parser(__doc__, {"dataset": ("--config-name", "dataset_params.yaml")})
    args = parser.parse_args()
    config = load_step_configs(args, ["dataset"])["dataset"]
    load_params, data_params = config.load_params, config.data_params
    check_held_out(data_params)

    started = time.time()
    datasets.disable_progress_bars()  # many tiny reads and writes here; our own bar shows the progress
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # a bad file is reported once, by us, in one line
    rows, expected = open_source(load_params, config.seed)
    split_lens = {name: load_params[f"{name}_len"] for name in SPLITS}
    files = {name: f"{name}.parquet" for name in SPLITS}
    stems = safe_file_stems(data_params.eval_topics, "dataset config: data_params.eval_topics")
    topic_files = {topic: f"topics/{stem}.parquet" for topic, stem in stems.items()}

    out_dir = check_output_folder(data_params.processed_dir, "dataset.data_params.processed_dir")
    lock_step_output(out_dir, "dataset.data_params.processed_dir")
    # the rows stream into the temporary folder as they are kept; an error (or Ctrl-C) removes it whole
    with atomic_dir(out_dir) as tmp_dir:
        result = stream_splits(tmp_dir, rows, expected, config, files, topic_files, split_lens)
        warn_short(result, split_lens, load_params.topic_len)
        write_manifest(tmp_dir, config, result, files, topic_files, started)
    print_done(result, out_dir, args)


if __name__ == "__main__":
    run_step(main)
