"""Step 1: load a topic-labelled corpus, hold out the evaluation topics, write the splits.

Writes to data_params.processed_dir: train/valid/test.parquet, topics/<topic>.parquet (one per
evaluation topic) and manifest.json. Example:
    python data_processors/load_dataset.py --config-name demo/dataset_params.yaml
"""
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # run as a script: import the project, not this folder

import re
import time
from collections import Counter

import datasets

from config_utils import PipelineError, atomic_dir, load_step_configs, run_step, step_parser, write_json_atomic
from data_processors.sources import open_source
from data_processors.splitting import SPLITS, iter_with_progress, split_corpus


def topic_file_name(topic: str) -> str:
    """Topic labels come from data; keep file names safe."""
    return re.sub(r"[^\w.-]", "_", topic) + ".parquet"


def write_rows(rows: list[dict], path: Path) -> None:
    columns = {"doc_id": [row["doc_id"] for row in rows], "text": [row["text"] for row in rows],
               "topic": [row["topic"] for row in rows]}
    datasets.Dataset.from_dict(columns).to_parquet(str(path))


def main() -> None:
    parser = step_parser(__doc__, {"dataset": ("--config-name", "dataset_params.yaml")})
    args = parser.parse_args()
    config = load_step_configs(args, ["dataset"])["dataset"]
    load_params, data_params = config.load_params, config.data_params
    overlap = set(data_params.eval_topics) & set(data_params.train_topics)
    if overlap:
        raise PipelineError(f"dataset config: {sorted(overlap)} is in both data_params.eval_topics and "
                            f"train_topics; an evaluation topic must be held out of training")

    started = time.time()
    datasets.disable_progress_bars()  # many tiny reads and writes here; our own bar shows the progress
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # a bad file is reported once, by us, in one line
    rows, expected = open_source(load_params, config.seed)
    split_lens = {name: load_params[f"{name}_len"] for name in SPLITS}
    result = split_corpus(iter_with_progress(rows, expected, f"step 1: reading {load_params.source} corpus"),
                          split_lens, load_params.topic_len, data_params.eval_topics, data_params.train_topics)

    for name in SPLITS:
        if len(result.splits[name]) < split_lens[name]:
            print(f"warning: {name} has {len(result.splits[name])} documents, fewer than {name}_len="
                  f"{split_lens[name]}: the corpus is smaller than asked", file=sys.stderr)
    for topic, topic_rows in result.topics.items():
        if len(topic_rows) < load_params.topic_len:
            print(f"warning: evaluation topic '{topic}' has {len(topic_rows)} documents, fewer than "
                  f"topic_len={load_params.topic_len}", file=sys.stderr)

    out_dir = Path(data_params.processed_dir)
    with atomic_dir(out_dir) as tmp_dir:
        (tmp_dir / "topics").mkdir()
        files = {name: f"{name}.parquet" for name in SPLITS}
        topic_files = {topic: f"topics/{topic_file_name(topic)}" for topic in result.topics}
        for name in SPLITS:
            write_rows(result.splits[name], tmp_dir / files[name])
        for topic, topic_rows in result.topics.items():
            write_rows(topic_rows, tmp_dir / topic_files[topic])
        write_json_atomic(tmp_dir / "manifest.json", {
            "step": "load_dataset",
            "config": config,
            "seed": config.seed,
            "files": {**files, "topics": topic_files},
            "counts": {**{name: len(result.splits[name]) for name in SPLITS},
                       "topics": {topic: len(topic_rows) for topic, topic_rows in result.topics.items()}},
            "train_topic_counts": dict(Counter(row["topic"] for row in result.splits["train"]).most_common(50)),
            "dropped": dict(result.dropped),
            "seconds": round(time.time() - started, 2),
        })

    counts = ", ".join(f"{name} {len(result.splits[name])}" for name in SPLITS)
    topics = ", ".join(f"{topic} {len(topic_rows)}" for topic, topic_rows in result.topics.items())
    print(f"step 1 done: {counts}; evaluation topics: {topics}; dropped {dict(result.dropped) or 'none'}")
    print(f"wrote {out_dir}/ (next: python data_processors/dataset.py)")


if __name__ == "__main__":
    run_step(main)
