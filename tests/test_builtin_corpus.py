"""Tests for the synthetic built-in corpus (data_processors/builtin_corpus.py)."""

import re
from collections import Counter

import numpy as np
import pytest

from data_processors.builtin_corpus import (
    TEMPLATE_WORDS,
    TOPIC_NAMES,
    VOCABULARY,
    builtin_dataset,
    content_words,
    generate_documents,
)

_WORD = re.compile(r"[^a-z]+")


def tokens(text):
    return [w for w in _WORD.split(text.lower()) if w and w not in TEMPLATE_WORDS]


def topic_counters(docs):
    counters = {}
    for d in docs:
        counters.setdefault(d["topic"], Counter()).update(tokens(d["text"]))
    return counters


def js_divergence_bits(c1, c2):
    vocab = sorted(set(c1) | set(c2))
    p = np.array([c1[w] for w in vocab], dtype=float)
    q = np.array([c2[w] for w in vocab], dtype=float)
    p /= p.sum()
    q /= q.sum()
    m = 0.5 * (p + q)

    def kl(a, b):
        nz = a > 0
        return float(np.sum(a[nz] * np.log2(a[nz] / b[nz])))

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def test_topic_names_and_vocabulary():
    assert TOPIC_NAMES == ("programming", "gaming", "cooking", "sports", "music", "science", "travel", "finance")
    all_words = []
    for topic in TOPIC_NAMES:
        sizes = {pos: len(words) for pos, words in VOCABULARY[topic].items()}
        assert sizes == {"nouns": 60, "verbs": 20, "adjectives": 20}
        all_words.extend(content_words(topic))
    assert len(all_words) == len(set(all_words)) == 800
    assert not set(all_words) & TEMPLATE_WORDS
    assert {"the", "a", "of", "to", "in", "and", "with", "is", "was", "it", "this"} <= TEMPLATE_WORDS


def test_deterministic_and_seed_dependent():
    a = list(generate_documents(300, n_topics=4, topic_overlap=0.3, seed=7))
    b = list(generate_documents(300, n_topics=4, topic_overlap=0.3, seed=7))
    c = list(generate_documents(300, n_topics=4, topic_overlap=0.3, seed=8))
    assert a == b
    assert a != c
    assert all(set(d) == {"text", "topic"} and isinstance(d["text"], str) for d in a)
    assert len(a) == 300


def test_dataset_matches_generator_and_is_deterministic():
    ds1 = builtin_dataset(200, 3, 0.2, seed=1)
    ds2 = builtin_dataset(200, 3, 0.2, seed=1)
    assert ds1.column_names == ["text", "topic"]
    assert ds1["text"] == ds2["text"] and ds1["topic"] == ds2["topic"]
    docs = list(generate_documents(200, 3, 0.2, seed=1))
    assert ds1["text"] == [d["text"] for d in docs]
    assert ds1["topic"] == [d["topic"] for d in docs]
    assert len(builtin_dataset(0)) == 0


def test_topics_balanced_and_first_n():
    n = 8000
    counts = Counter(d["topic"] for d in generate_documents(n, n_topics=5, seed=3))
    assert set(counts) == set(TOPIC_NAMES[:5])
    for c in counts.values():
        assert abs(c - n / 5) < 0.1 * n / 5  # ~5 sigma
    assert {d["topic"] for d in generate_documents(50, n_topics=1)} == {"programming"}


def test_overlap_zero_topics_use_disjoint_own_words():
    counters = topic_counters(generate_documents(2000, n_topics=8, topic_overlap=0.0, seed=0))
    assert set(counters) == set(TOPIC_NAMES)
    for topic, counter in counters.items():
        assert set(counter) <= content_words(topic)
    for i, t1 in enumerate(TOPIC_NAMES):
        for t2 in TOPIC_NAMES[i + 1 :]:
            assert not set(counters[t1]) & set(counters[t2])


def test_overlap_controls_divergence():
    def mean_js(overlap):
        c = topic_counters(generate_documents(2000, n_topics=4, topic_overlap=overlap, seed=11))
        pairs = [(a, b) for i, a in enumerate(TOPIC_NAMES[:4]) for b in TOPIC_NAMES[i + 1 : 4]]
        return float(np.mean([js_divergence_bits(c[a], c[b]) for a, b in pairs]))

    js0, js_half, js1 = mean_js(0.0), mean_js(0.5), mean_js(1.0)
    assert js0 == pytest.approx(1.0)  # disjoint supports: JS is exactly 1 bit
    assert js1 < 0.05  # same distribution up to sampling noise
    assert js1 < js_half < js0


def test_overlap_one_labels_uninformative_and_words_shared():
    counters = topic_counters(generate_documents(2000, n_topics=4, topic_overlap=1.0, seed=5))
    pooled = set().union(*(content_words(t) for t in TOPIC_NAMES[:4]))
    for topic, counter in counters.items():
        own = content_words(topic)
        assert set(counter) <= pooled
        frac_own = sum(v for w, v in counter.items() if w in own) / sum(counter.values())
        assert frac_own == pytest.approx(0.25, abs=0.03)


def test_lengths_vary_and_surface_features():
    docs = list(generate_documents(2000, n_topics=4, seed=2))
    sentences = [len(re.findall(r"[.?!](?=\s|$|\")", d["text"])) for d in docs]
    n_words = [len(d["text"].split()) for d in docs]
    assert min(sentences) == 1 and max(sentences) >= 6
    assert len(set(n_words)) > 20
    joined = " ".join(d["text"] for d in docs)
    assert re.search(r"\d", joined) and "%" in joined
    for ch in ".,?!:;'\"()":
        assert ch in joined
    assert all(d["text"][0].isupper() for d in docs)
    assert not re.search(r"\ba [aeiou]", joined)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(n_docs=10, n_topics=0),
        dict(n_docs=10, n_topics=9),
        dict(n_docs=10, topic_overlap=-0.1),
        dict(n_docs=10, topic_overlap=1.5),
        dict(n_docs=10, topic_overlap=float("nan")),
        dict(n_docs=-1),
        dict(n_docs=2.5),
    ],
)
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        generate_documents(**kwargs)  # validated eagerly, before iteration
    with pytest.raises(ValueError):
        builtin_dataset(**kwargs)


def test_too_many_topics_message_mentions_maximum():
    with pytest.raises(ValueError, match="8"):
        generate_documents(10, n_topics=9)
