"""Where step 1's documents come from: the hub (streamed), local files, or the builtin corpus.

Each source yields rows {"text": str | None, "topic": str} in a seeded random order and says how
many rows it expects (None when unknown), so the splitter does not care where rows came from.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from pathlib import Path

from config_utils import ConfigSection, PipelineError, first_line

FILE_BUILDERS = {".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
HUB_SHUFFLE_BUFFER = 10_000
DEMO_HINT = (
    "offline? run the demo (`--config-name demo/dataset_params.yaml`) or read local files with "
    "`--set dataset.load_params.source=files --set dataset.load_params.data_files=[PATH.csv]`"
)


def open_source(load_params: ConfigSection, seed: int) -> tuple[Iterator[dict], int | None]:
    """Return (rows, expected row count or None) for the configured source."""
    if load_params.source == "builtin":
        from data_processors.builtin_corpus import generate_documents

        builtin = load_params.builtin
        rows = generate_documents(builtin.n_docs, builtin.n_topics, builtin.topic_overlap, seed)
        return rows, builtin.n_docs
    if load_params.source == "files":
        dataset = load_files(load_params.data_files, load_params.text_field, load_params.topic_field)
        return _iter_columns(dataset.shuffle(seed=seed).flatten_indices(), load_params), len(dataset)
    return _iter_hub(load_params, seed), None


def expand_data_files(patterns: list[str]) -> list[Path]:
    if not patterns:
        raise PipelineError(
            "dataset config: load_params.data_files is empty; list .csv/.jsonl/.parquet "
            "paths or globs, e.g. --set dataset.load_params.data_files=[data/*.csv]"
        )
    paths: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True))
        if not matches:
            raise PipelineError(f"data file '{pattern}' not found (load_params.data_files); check the path")
        paths.extend(Path(match) for match in matches)
    for path in paths:
        try:
            path.resolve(strict=True)
        except (OSError, RuntimeError):  # RuntimeError: a symbolic link loop (Python < 3.13)
            raise PipelineError(
                f"data file '{path}' is a symbolic link that leads nowhere or in a loop ({path} -> "
                f"{os.readlink(path) if path.is_symlink() else '?'}); point load_params.data_files at the real file"
            ) from None
        if path.suffix.lower() not in FILE_BUILDERS:
            raise PipelineError(f"data file '{path}' has an unsupported type; use {', '.join(FILE_BUILDERS)}")
    return paths


def load_files(patterns: list[str], text_field: str, topic_field: str):
    """Read every file through `datasets` (one at a time, so an error names its file), then concatenate."""
    import datasets

    parts = []
    for path in expand_data_files(patterns):
        try:
            part = datasets.load_dataset(FILE_BUILDERS[path.suffix.lower()], data_files=str(path), split="train")
        except Exception as error:  # datasets wraps parser errors in several types; all mean "unreadable"
            cause = error
            while cause.__cause__ is not None or cause.__context__ is not None:
                cause = cause.__cause__ or cause.__context__
            reason = first_line(cause, 1000)
            if isinstance(cause, UnicodeDecodeError):
                reason = "not UTF-8 text"
            raise PipelineError(
                f"data file '{path}' could not be read ({reason}); save it as UTF-8 {path.suffix.lower()[1:].upper()}"
            ) from None
        missing = [field for field in (text_field, topic_field) if field not in part.column_names]
        if missing:
            raise PipelineError(
                f"data file '{path}' has no column {missing[0]!r} (columns: "
                f"{', '.join(part.column_names)}); set dataset.load_params.text_field / "
                f"topic_field"
            )
        if _type_name(part.features[text_field]) not in TEXT_TYPES and all(text is None for text in part[text_field]):
            raise PipelineError(  # a reader types a column with no value at all as numbers
                f"data file '{path}': text column {text_field!r} is empty in every row; point "
                f"dataset.load_params.text_field at a column of text"
            )
        check_column_types(part.features, path, text_field, topic_field)
        parts.append(
            part.select_columns([text_field, topic_field]).cast(
                datasets.Features({text_field: datasets.Value("string"), topic_field: datasets.Value("string")})
            )
        )
    return datasets.concatenate_datasets(parts)


TEXT_TYPES = {"string", "large_string"}
LABEL_TYPES = TEXT_TYPES | {
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "bool",
    "class label",
}


def _type_name(feature) -> str:
    import datasets

    if isinstance(feature, datasets.Value):
        return feature.dtype
    if isinstance(feature, datasets.ClassLabel):
        return "class label"
    return type(feature).__name__.lower()  # List, Json (objects), Sequence, ...


def check_column_types(features, path: Path, text_field: str, topic_field: str) -> None:
    """Text must be text and a topic a plain label: casting a number or a list to a string would train on noise."""
    text_type, topic_type = _type_name(features[text_field]), _type_name(features[topic_field])
    if text_type not in TEXT_TYPES:
        raise PipelineError(
            f"data file '{path}': text column {text_field!r} holds {text_type} values, not strings; "
            f"point dataset.load_params.text_field at a column of text"
        )
    if topic_type not in LABEL_TYPES:
        raise PipelineError(
            f"data file '{path}': topic column {topic_field!r} holds {topic_type} values (objects or "
            f"lists), not labels; give every row one string or integer topic, or set "
            f"dataset.load_params.topic_field"
        )


def _checked_hub_row(row: dict, name: str, text_field: str, topic_field: str) -> dict:
    text, topic = row[text_field], row[topic_field]
    if text is not None and not isinstance(text, str):
        raise PipelineError(
            f"hub dataset '{name}': text column {text_field!r} holds {type(text).__name__} values, "
            f"not strings; set dataset.load_params.text_field to a text column"
        )
    if topic is not None and not isinstance(topic, (str, int)):
        raise PipelineError(
            f"hub dataset '{name}': topic column {topic_field!r} holds {type(topic).__name__} values, "
            f"not labels; set dataset.load_params.topic_field to a label column"
        )
    return {"text": text, "topic": topic}


def _iter_columns(dataset, load_params: ConfigSection) -> Iterator[dict]:
    for batch in dataset.iter(batch_size=1000):
        for text, topic in zip(batch[load_params.text_field], batch[load_params.topic_field]):
            yield {"text": text, "topic": topic}


def _iter_hub(load_params: ConfigSection, seed: int) -> Iterator[dict]:
    """Stream the hub dataset: nothing is downloaded beyond the rows we keep.

    Connects before returning, so that an offline machine fails before any progress bar starts.
    """
    import itertools

    import datasets

    name = load_params.dataset_url
    try:
        stream = datasets.load_dataset(name, split="train", streaming=True)
        rows = iter(stream.shuffle(seed=seed, buffer_size=HUB_SHUFFLE_BUFFER))
        first = next(rows)
    except StopIteration:
        raise PipelineError(f"hub dataset '{name}' is empty; check load_params.dataset_url") from None
    except Exception as error:  # offline, unknown name, auth: all leave us without data
        reason = first_line(error, 200)
        raise PipelineError(f"cannot stream hub dataset '{name}' ({reason}); {DEMO_HINT}") from None
    missing = [field for field in (load_params.text_field, load_params.topic_field) if field not in first]
    if missing:
        raise PipelineError(
            f"hub dataset '{name}' has no column {missing[0]!r} (columns: {', '.join(first)}); "
            f"set dataset.load_params.text_field / topic_field"
        )
    return (
        _checked_hub_row(row, name, load_params.text_field, load_params.topic_field)
        for row in itertools.chain([first], rows)
    )
