"""Step 1's core: drop empty and duplicate texts, hold out evaluation topics, fill the splits.

Rows arrive in a seeded random order. Topic labels are stripped of surrounding whitespace (so
'programming ' is the held-out 'programming'), and rows without text or without a topic are dropped.
Each evaluation topic keeps its first `topic_len` documents;
every other document goes to the split (train, valid, test) furthest below its target, so a corpus
smaller than asked for still yields splits in the requested proportions. With `train_topics` the
splits are also balanced over those topics. Reading stops as soon as every bucket is full.

A bucket is anything with append(row) and len(): a list by default, or (step 1) a writer that streams
the rows to a file as they come, so the kept rows are never all held in memory.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from config_utils import PipelineError

SPLITS = ("train", "valid", "test")


class Bucket(Protocol):
    """Where a split's (or an evaluation topic's) rows go, in the order they are kept."""

    def append(self, row: dict) -> None: ...

    def __len__(self) -> int: ...


def list_bucket(kind: str, name: str) -> Bucket:
    return []


@dataclass
class SplitResult:
    splits: dict[str, Bucket]  # train/valid/test rows {"doc_id", "text", "topic"}
    topics: dict[str, Bucket]  # evaluation topic -> rows
    dropped: Counter = field(default_factory=Counter)  # empty, duplicate, other_topic, surplus
    topics_seen: Counter = field(default_factory=Counter)
    # the kept rows' texts and topics in order: with the config, it pins what step 1 wrote (later steps compare it)
    content: hashlib._Hash = field(default_factory=lambda: hashlib.blake2b(digest_size=16))


def normalize_label(label) -> str:
    """Topic labels as step 1 writes them: text without surrounding whitespace ('' for a missing one)."""
    return "" if label is None else str(label).strip()


def split_corpus(
    rows: Iterable[dict],
    split_lens: dict[str, int],
    topic_len: int,
    eval_topics: list[str],
    train_topics: list[str],
    new_bucket: Callable[[str, str], Bucket] = list_bucket,
) -> SplitResult:
    """new_bucket("split", name) / new_bucket("topic", topic) makes each bucket (default: a list)."""
    result = SplitResult(
        splits={name: new_bucket("split", name) for name in SPLITS},
        topics={topic: new_bucket("topic", topic) for topic in dict.fromkeys(eval_topics)},
    )
    quotas = _split_quotas(split_lens, train_topics)
    filled: Counter = Counter()  # (split, topic or None) -> rows kept
    seen_hashes: set[bytes] = set()
    next_doc_id = 0
    for row in rows:
        text = (row["text"] or "").strip()
        topic = normalize_label(row["topic"])
        if not text:
            result.dropped["empty"] += 1
            continue
        if not topic:  # a missing label is not a topic named "None"
            result.dropped["no_topic"] += 1
            continue
        digest = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
        if digest in seen_hashes:
            result.dropped["duplicate"] += 1
            continue
        seen_hashes.add(digest)
        result.topics_seen[topic] += 1
        if train_topics and topic not in train_topics and topic not in result.topics:
            result.dropped["other_topic"] += 1
            continue
        bucket = _choose_bucket(topic, result, quotas, filled, topic_len, train_topics)
        if bucket is None:
            result.dropped["surplus"] += 1
        else:
            bucket.append({"doc_id": next_doc_id, "text": text, "topic": topic})
            result.content.update(digest + topic.encode("utf-8") + b"\0")
            next_doc_id += 1
        if _all_full(result, quotas, filled, topic_len):
            break
    _check_result(result, eval_topics)
    return result


def _split_quotas(split_lens: dict[str, int], train_topics: list[str]) -> dict[tuple, int]:
    """Targets per (split, topic); topic None when the splits are not balanced over topics."""
    if not train_topics:
        return {(name, None): split_lens[name] for name in SPLITS}
    return {(name, topic): max(1, split_lens[name] // len(train_topics)) for name in SPLITS for topic in train_topics}


def _choose_bucket(
    topic: str, result: SplitResult, quotas: dict, filled: Counter, topic_len: int, train_topics: list[str]
) -> list | None:
    if topic in result.topics:
        held_out = result.topics[topic]
        return held_out if len(held_out) < topic_len else None
    key_topic = topic if train_topics else None
    open_splits = [name for name in SPLITS if filled[(name, key_topic)] < quotas[(name, key_topic)]]
    if not open_splits:
        return None
    # the split furthest below its target gets the row: proportions hold even for a small corpus
    name = min(open_splits, key=lambda s: (filled[(s, key_topic)] / quotas[(s, key_topic)], SPLITS.index(s)))
    filled[(name, key_topic)] += 1
    return result.splits[name]


def _all_full(result: SplitResult, quotas: dict, filled: Counter, topic_len: int) -> bool:
    return all(filled[key] >= quota for key, quota in quotas.items()) and all(
        len(rows) >= topic_len for rows in result.topics.values()
    )


def _check_result(result: SplitResult, eval_topics: list[str]) -> None:
    common = ", ".join(f"{name} ({count})" for name, count in result.topics_seen.most_common(8))
    # an empty corpus first: with no text at all every evaluation topic is missing too, and the cause is the text
    if len(result.splits["train"]) == 0:
        raise PipelineError(
            f"the corpus is empty after filtering ({dict(result.dropped)} dropped; topics seen: "
            f"{common or 'none'}); check load_params.text_field, data_params.eval_topics "
            f"and train_topics"
        )
    for topic in eval_topics:
        if len(result.topics[topic]) == 0:
            raise PipelineError(
                f"evaluation topic '{topic}' is not in the corpus (most common topics: "
                f"{common or 'none'}); fix data_params.eval_topics"
            )


def iter_with_progress(rows: Iterable[dict], total: int | None, description: str) -> Iterator[dict]:
    from tqdm.auto import tqdm

    yield from tqdm(rows, total=total, desc=description, unit=" docs", mininterval=0.5)
