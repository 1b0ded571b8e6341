"""A corpus for the study is a small YAML file (configs/corpora/: reddit, agnews, 20newsgroups, builtin):

    source: files                      # files, builtin or hub, as dataset.load_params.source
    data_files: [path/*.csv]           # files: relative to the YAML file (or absolute)
    text_field: text                   # files and hub: the columns of text and topic
    topic_field: topic
    hub_name: ...                      # hub only (hub_config, hub_split optional)
    builtin: {n_topics: 4, n_docs: 1600}   # builtin only
    train_len: 5000                    # the split sizes, as dataset.load_params
    valid_len: 250
    test_len: 750
    topic_len: 1000
    tokenizer_vocab_size: 4000
    held_out: [a, b]                   # the topics the held-out design keeps out of training
    balanced: [a, b, c]                # the topics the balanced arm balances train/valid/test over
    coarse_topics:                     # optional: families of topics, a second granularity (patterns allowed)
      comp: [comp.*]

Every topic the file names must be one of the corpus's topics: checked before any run starts (files and builtin;
a hub corpus cannot be read here beforehand), so a misspelt topic is one line, not a failed arm.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from config_utils import PipelineError
from config_utils.config import read_yaml
from config_utils.topic_map import check_topic_map, coarse_topics

REPO = Path(__file__).resolve().parents[2]
CORPUS_FOLDER = REPO / "configs" / "corpora"
SOURCE_KEYS = {
    "files": {"data_files", "text_field", "topic_field"},
    "builtin": {"builtin"},
    "hub": {"hub_name", "text_field", "topic_field"},
}
OPTIONAL_KEYS = {"hub_config", "hub_split", "coarse_topics"}
SIZE_KEYS = ("train_len", "valid_len", "test_len", "topic_len")
REQUIRED_KEYS = {"source", *SIZE_KEYS, "tokenizer_vocab_size", "held_out", "balanced"}


@dataclass
class Corpus:
    name: str  # the file's stem: the study's folders and tables call the corpus by it
    path: Path
    sets: dict  # the steps' --set overrides: source, files, fields, sizes, vocabulary
    held_out: list[str]
    balanced: list[str]
    coarse_topics: dict[str, list[str]] | None = None  # family -> topic patterns

    @property
    def data_files(self) -> list[str]:
        return self.sets.get("dataset.load_params.data_files", [])


def corpus_path(name_or_path: str) -> Path:
    """A name in configs/corpora/ (reddit) or a path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    named = CORPUS_FOLDER / f"{name_or_path}.yaml"
    if not named.is_file():
        known = ", ".join(sorted(p.stem for p in CORPUS_FOLDER.glob("*.yaml")))
        raise PipelineError(f"--corpus {name_or_path}: no such corpus; name one of {known}, or give a YAML file")
    return named


def load_corpus(name_or_path: str) -> Corpus:
    path = corpus_path(name_or_path)
    try:
        raw = read_yaml(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise PipelineError(f"--corpus {path}: cannot be read ({error.strerror}); check the path") from None
    except PipelineError as error:  # duplicate keys
        raise PipelineError(f"{path}: {error}") from None
    if not isinstance(raw, dict):
        raise PipelineError(f"{path}: a corpus file is a mapping of keys (see configs/corpora/reddit.yaml)")
    source = raw.get("source")
    if source not in SOURCE_KEYS:
        raise PipelineError(f"{path}: key 'source' must be one of {', '.join(SOURCE_KEYS)}, got {source!r}")
    needed = REQUIRED_KEYS | SOURCE_KEYS[source]
    missing = sorted(needed - set(raw))
    if missing:
        raise PipelineError(
            f"{path}: key {missing[0]!r} is missing (a {source} corpus needs {', '.join(sorted(needed))})"
        )
    unknown = sorted(set(raw) - needed - OPTIONAL_KEYS)
    if unknown:
        raise PipelineError(f"{path}: unknown key {unknown[0]!r} (a {source} corpus takes {', '.join(sorted(needed))})")
    for key in ("held_out", "balanced"):
        if not isinstance(raw[key], list) or not all(isinstance(topic, str) for topic in raw[key]):
            raise PipelineError(f"{path}: key {key!r} must be a list of topic names, got {raw[key]!r}")
    coarse = check_topic_map(raw["coarse_topics"], str(path)) if "coarse_topics" in raw else None
    return Corpus(path.stem, path, _sets(raw, path), list(raw["held_out"]), list(raw["balanced"]), coarse)


def _sets(raw: dict, path: Path) -> dict:
    """The corpus as the steps' --set overrides (the step configs check every value's type and range)."""
    load = "dataset.load_params."
    sets = {f"{load}source": raw["source"], **{f"{load}{key}": raw[key] for key in SIZE_KEYS}}
    if raw["source"] == "files":
        files = raw["data_files"] if isinstance(raw["data_files"], list) else [raw["data_files"]]
        sets[f"{load}data_files"] = [str(path.parent / pattern) for pattern in files]  # absolute stays absolute
    if raw["source"] == "builtin":
        sets.update({f"{load}builtin.{key}": value for key, value in (raw["builtin"] or {}).items()})
    for key in ("text_field", "topic_field", "hub_name", "hub_config", "hub_split"):
        if key in raw and raw["source"] != "builtin":
            sets[f"{load}{key}"] = raw[key]
    sets["dataset.data_params.tokenizer_vocab_size"] = raw["tokenizer_vocab_size"]
    return sets


def corpus_topics(corpus: Corpus) -> set[str] | None:
    """The corpus's topics (None for a hub corpus: not readable before step 1)."""
    source = corpus.sets["dataset.load_params.source"]
    if source == "builtin":
        from data_processors.builtin_corpus import TOPIC_NAMES

        return set(TOPIC_NAMES[: corpus.sets.get("dataset.load_params.builtin.n_topics", 4)])
    if source == "files":
        from data_processors.sources import load_files

        topic_field = corpus.sets["dataset.load_params.topic_field"]
        rows = load_files(corpus.data_files, corpus.sets["dataset.load_params.text_field"], topic_field)
        return {str(topic) for topic in rows.unique(topic_field) if topic is not None}
    return None


def check_named_topics(corpus: Corpus) -> None:
    """Refuse, in one line, a file that names a topic its corpus does not have."""
    try:
        topics = corpus_topics(corpus)
    except PipelineError as error:
        raise PipelineError(f"{corpus.path}: {error}") from None
    if topics is None:
        return
    for key in ("held_out", "balanced"):
        absent = [topic for topic in getattr(corpus, key) if topic not in topics]
        if absent:
            shown = ", ".join(sorted(topics)[:25]) + (", ..." if len(topics) > 25 else "")
            raise PipelineError(
                f"{corpus.path}: {key} names {absent[0]!r}, which is not a topic of the corpus ({len(topics)} topics: "
                f"{shown}); fix the file"
            )
    if corpus.coarse_topics:
        coarse_topics(topics, corpus.coarse_topics, f"{corpus.path}: coarse_topics")
