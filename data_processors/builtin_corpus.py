"""Built-in synthetic corpus: seeded, offline, topic-labelled English-like text.

Everything here is SYNTHETIC. No real corpus is read and no network is used;
the documents are generated from hand-written word lists with a seeded
``numpy.random.Generator``. The point is (a) that the MoE-encoder pipeline can
run anywhere without downloads and (b) that a routing analysis can be checked
against a *known* ground truth: which topic each document came from, and how
much the topics share.

What it models
--------------
* **Topics.** Eight topics, in the fixed order of :data:`TOPIC_NAMES`
  (programming, gaming, cooking, sports, music, science, travel, finance).
  Each topic owns a content vocabulary of real English words split by part of
  speech: exactly 60 nouns, 20 verbs (base form) and 20 adjectives.
  The vocabularies are thematically coherent and pairwise disjoint; they are
  also disjoint from the shared function words (checked at import time).
* **Shared surface.** All topics share the same function words (determiners,
  prepositions, modals, pronouns, "is", "was", ...), punctuation
  (``. , ? ! : ; ' " ( )``), occasional numbers (``"42"``, ``"2019"``,
  ``"37%"``), capitalised sentence starts and the same set of sentence
  templates (slot sequences such as ``Det Adj Noun Modal Verb Det Noun .``).
  Hence topics differ *only* in which content words fill the Noun/Verb/Adj
  slots.
* **Zipfian frequencies.** Inside every part-of-speech list a word of rank r
  has probability proportional to ``1 / r**1.1``. The rank order is FIXED: it
  is the order of the hand-written list (roughly most common word first), so
  it does not depend on the seed. Every topic's list of a given part of
  speech has the same length, so all topics share the same rank distribution.
* **Lengths.** The number of sentences per document is lognormal-ish
  (``round(exp(N(log 3, 0.6)))``), clipped to 1..8.
* **Topic overlap.** With ``topic_overlap = o`` every content word of a
  document is drawn from the document's own topic distribution with
  probability ``1 - o`` and otherwise from the pooled distribution, i.e. the
  uniform mixture of the ``n_topics`` topic distributions (a topic is picked
  uniformly at random - possibly the document's own - and the word is drawn
  from it). ``o = 0``: topical words of different topics are disjoint.
  ``o = 1``: every topic is drawn from the same distribution and the labels
  carry no information about the text.

Determinism
-----------
Same arguments (including ``seed``) give identical output. Random numbers
are consumed in the same way regardless of ``topic_overlap``, so two corpora
with the same seed, ``n_docs`` and ``n_topics`` but different overlaps share
topic labels, lengths, sentence templates, function words and word *ranks*;
only the topic each content word is taken from differs. (A shorter corpus is
not guaranteed to be a prefix of a longer one with the same seed.)

API
---
``TOPIC_NAMES``, ``generate_documents(...)`` (iterator of
``{"text": str, "topic": str}``), ``builtin_dataset(...)``
(``datasets.Dataset`` with columns ``text`` and ``topic``), plus
``VOCABULARY`` and ``TEMPLATE_WORDS`` for analyses and tests.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Iterator, Mapping
from types import MappingProxyType

import numpy as np

__all__ = [
    "TOPIC_NAMES",
    "VOCABULARY",
    "TEMPLATE_WORDS",
    "ZIPF_EXPONENT",
    "MAX_SENTENCES",
    "generate_documents",
    "builtin_dataset",
    "content_words",
]

ZIPF_EXPONENT = 1.1
MAX_SENTENCES = 8
_CHUNK_SIZE = 8192  # documents generated per vectorised batch

# --------------------------------------------------------------------------
# Content vocabularies (hand-written, list order = Zipf rank order).
# --------------------------------------------------------------------------

_VOCAB_TEXT: dict[str, dict[str, str]] = {
    "programming": {
        "nouns": """
            code function variable compiler server database bug module library
            framework repository commit branch loop array string integer pointer
            thread process kernel script syntax parser interpreter debugger stack
            queue heap algorithm interface class object method exception terminal
            editor query schema cache socket protocol endpoint package dependency
            container cluster deployment runtime benchmark patch regex lambda
            iterator callback closure tuple dictionary bytecode linter
        """,
        "verbs": """
            compile debug deploy refactor install parse execute import merge push
            render optimize initialize declare iterate serialize fork recompile
            instantiate encrypt
        """,
        "adjectives": """
            recursive asynchronous deprecated binary static dynamic mutable
            immutable concurrent modular verbose scalable virtual buggy nullable
            stateless idempotent readable portable threaded
        """,
    },
    "gaming": {
        "nouns": """
            gamer console controller level boss quest dungeon inventory avatar
            character sword shield potion spell dragon castle checkpoint joystick
            headset cartridge arcade lobby guild raid loot sniper grenade zombie
            wizard knight goblin villain hero puzzle platformer shooter sequel
            expansion leaderboard achievement speedrun glitch mod emulator pixel
            sprite cutscene mana crafting campaign tutorial minimap gamepad
            streamer clan mission armor crossbow treasure portal
        """,
        "verbs": """
            respawn grind unlock equip craft spawn snipe parry dodge heal upgrade
            stream teleport summon enchant reload pause conquer battle slay
        """,
        "adjectives": """
            epic legendary pixelated multiplayer cooperative competitive hardcore
            casual cinematic procedural retro immersive overpowered rare enchanted
            haunted undead magical laggy addictive
        """,
    },
    "cooking": {
        "nouns": """
            recipe oven pan skillet garlic onion butter flour sugar salt pepper
            sauce soup broth dough bread pasta noodle cheese tomato basil oregano
            cinnamon ginger lemon vinegar olive spatula whisk knife chef kitchen
            stove pot casserole omelette pancake cookie pastry custard yogurt
            honey mushroom spinach carrot potato rice bean lentil chicken salmon
            shrimp egg cream marinade ladle colander grater apron saucepan
        """,
        "verbs": """
            bake simmer chop stir saute roast boil fry grill drizzle knead dice
            mince marinate peel blend garnish braise poach taste
        """,
        "adjectives": """
            crispy savory spicy tender juicy creamy tangy crunchy fluffy smoky
            buttery zesty golden caramelized bitter sweet salty roasted fresh
            homemade
        """,
    },
    "sports": {
        "nouns": """
            team coach athlete stadium match goal referee tournament league
            championship trophy medal striker goalkeeper defender midfielder pitch
            court racket ball bat glove helmet jersey whistle penalty foul inning
            quarterback touchdown marathon sprint relay hurdle stamina playoff
            fixture umpire scoreboard halftime overtime rebound dribble tackle
            offside podium locker captain rookie veteran sprinter gymnast swimmer
            cyclist rival fan arena treadmill dugout puck
        """,
        "verbs": """
            score kick pass shoot defend block serve win lose qualify dunk volley
            intercept jog swim cycle outrun concede celebrate cheer
        """,
        "adjectives": """
            athletic offensive defensive undefeated fierce muscular agile tactical
            unbeaten professional amateur olympic injured fit aerobic sporty
            victorious relentless speedy acrobatic
        """,
    },
    "music": {
        "nouns": """
            song album band guitar piano drum melody chord rhythm concert singer
            lyric violin orchestra symphony composer tempo harmony bass verse
            chorus microphone amplifier record vinyl playlist studio gig saxophone
            trumpet cello flute keyboard conductor soloist bassist drummer
            guitarist pianist octave note scale riff ballad opera anthem jazz
            blues hymn sonata concerto choir stage encore headphone metronome
            cadence crescendo tuba harp
        """,
        "verbs": """
            sing strum compose perform rehearse hum tune improvise harmonize
            conduct remix orchestrate yodel serenade transpose chant pluck croon
            arrange mix
        """,
        "adjectives": """
            melodic acoustic rhythmic harmonic symphonic lyrical catchy soulful
            orchestral electronic loud soft upbeat mellow operatic choral
            instrumental classical jazzy funky
        """,
    },
    "science": {
        "nouns": """
            experiment hypothesis theory molecule atom cell protein gene enzyme
            electron photon particle laboratory microscope telescope specimen
            sample reaction catalyst compound element isotope neutron proton
            quantum galaxy planet comet asteroid fossil mineral crystal acid
            solution gravity momentum velocity wavelength spectrum magnet circuit
            voltage bacteria virus organism species evolution chromosome nucleus
            membrane beaker pipette centrifuge thermometer equation physicist
            chemist biologist researcher observation
        """,
        "verbs": """
            measure observe analyze hypothesize synthesize isolate dissolve
            evaporate calibrate replicate mutate catalyze oxidize magnify dilute
            sequence irradiate classify quantify ionize
        """,
        "adjectives": """
            chemical molecular genetic cellular atomic organic magnetic
            radioactive empirical experimental microscopic acidic thermal nuclear
            cosmic biological electric solar toxic stellar
        """,
    },
    "travel": {
        "nouns": """
            airport flight passport hotel luggage suitcase ticket beach island
            mountain museum tourist guide itinerary visa hostel train station
            cruise ferry harbor souvenir backpack map border customs embassy
            resort village cathedral monument landmark coastline desert jungle
            glacier volcano canyon waterfall lagoon postcard camera reservation
            gate runway pilot compass tent campsite lodge inn villa balcony sunset
            horizon voyage journey destination traveler tram
        """,
        "verbs": """
            travel explore fly book pack hike wander sail visit depart arrive
            roam sightsee navigate board commute trek photograph unpack relax
        """,
        "adjectives": """
            exotic scenic tropical remote coastal sunny crowded picturesque
            foreign ancient historic rustic luxurious touristy overseas
            mountainous sandy breathtaking charming adventurous
        """,
    },
    "finance": {
        "nouns": """
            bank loan mortgage stock bond dividend investor portfolio market
            interest inflation budget revenue profit asset liability equity credit
            debt tax currency dollar euro accountant auditor banker broker trader
            hedge fund share deposit withdrawal savings pension insurance premium
            audit ledger invoice payroll salary wage recession shareholder
            valuation merger acquisition capital collateral annuity bankruptcy
            treasury yield commodity exchange wallet cheque receipt fee
        """,
        "verbs": """
            invest borrow lend save spend earn withdraw trade refinance default
            bankrupt diversify liquidate amortize reimburse underwrite insure owe
            repay appraise
        """,
        "adjectives": """
            financial fiscal monetary profitable bullish bearish volatile liquid
            taxable lucrative solvent insolvent economic affordable expensive
            cheap quarterly annual wealthy inflationary
        """,
    },
}

_POS = ("nouns", "verbs", "adjectives")
_POS_SIZES = {"nouns": 60, "verbs": 20, "adjectives": 20}

TOPIC_NAMES: tuple[str, ...] = tuple(_VOCAB_TEXT)

VOCABULARY: Mapping[str, Mapping[str, tuple[str, ...]]] = MappingProxyType(
    {
        topic: MappingProxyType({pos: tuple(text.split()) for pos, text in lists.items()})
        for topic, lists in _VOCAB_TEXT.items()
    }
)

# --------------------------------------------------------------------------
# Shared function words, numbers and sentence templates.
# --------------------------------------------------------------------------

# slot name -> (words, relative weights); shared by every topic.
_FUNCTION_SLOTS: dict[str, tuple[tuple[str, ...], tuple[float, ...]]] = {
    # determiners ("a" becomes "an" before a vowel in post-processing)
    "D": (
        ("the", "a", "this", "that", "every", "each", "one", "our", "their", "its", "my", "your"),
        (45, 20, 8, 6, 4, 4, 3, 3, 3, 2, 2, 2),
    ),
    # prepositions
    "P": (
        (
            "of",
            "in",
            "with",
            "for",
            "on",
            "to",
            "at",
            "from",
            "by",
            "about",
            "after",
            "before",
            "during",
            "without",
            "near",
            "under",
            "into",
            "through",
        ),
        (18, 14, 12, 10, 8, 7, 6, 5, 4, 3, 3, 3, 2, 2, 2, 2, 2, 2),
    ),
    # modals / auxiliaries followed by a base-form verb
    "M": (
        ("can", "will", "should", "might", "must", "could", "would", "did not", "cannot"),
        (14, 14, 10, 8, 6, 8, 8, 5, 4),
    ),
    # subject pronouns that take a base-form verb
    "R": (("we", "they", "I", "you"), (35, 35, 15, 15)),
}

# Templates: {N} noun, {V} verb (base form), {A} adjective, {D} determiner,
# {P} preposition, {M} modal, {R} pronoun, {X} small number, {Y} year,
# {Q} percentage. Every template starts with a slot or a capitalised literal,
# so capitalising the first character capitalises the sentence start.
_TEMPLATES: tuple[tuple[str, float], ...] = (
    ("{D} {A} {N} {M} {V} {D} {N}.", 12),
    ("{D} {N} {P} {D} {N} was {A}.", 10),
    ("{R} {V} {D} {A} {N} {P} {D} {N}.", 10),
    ("{D} {N} is {A}, and {D} {N} is {A}.", 7),
    ("Why did {D} {N} {V} {D} {N}?", 6),
    ("{R} {M} {V} {D} {N} {P} {D} {A} {N}.", 8),
    ('{R} said: "{D} {N} {M} {V} {D} {N}."', 4),
    ("{D} {N} ({D} {A} {N}) {M} {V} {D} {N}!", 4),
    ("It was {D} {A} {N}; {R} {V} {D} {N} {P} {D} {N}.", 5),
    ("Is {D} {N} {A} enough?", 4),
    ("This {N} is not {A}, it is {A}.", 4),
    ("The '{N}' was {A} {P} {D} {N}.", 3),
    ("{R} really {V} {D} {N}!", 4),
    ("{D} {A} {N}, {D} {A} {N} and {D} {N}: {R} {V} them all.", 3),
    ("In {Y}, {D} {A} {N} {M} {V} {D} {N}.", 3),
    ("About {Q} of {D} {N} {P} {D} {N} was {A}.", 3),
    ("After {X} hours, {D} {N} was {A} and {A}.", 3),
)

_CONTENT_SLOTS = {"N": "nouns", "V": "verbs", "A": "adjectives"}
_NUMBER_SLOTS = ("X", "Y", "Q")
_SLOT_NAMES = tuple(_CONTENT_SLOTS) + tuple(_FUNCTION_SLOTS) + _NUMBER_SLOTS
_SLOT_CODE = {name: i for i, name in enumerate(_SLOT_NAMES)}
_SLOT_RE = re.compile(r"\{([A-Z])\}")
_WORD_RE = re.compile(r"[a-z]+")
_A_AN_RE = re.compile(r"\b([Aa]) (?=[aeiouAEIOU])")


def _template_words() -> frozenset[str]:
    words: set[str] = {"an"}  # produced by the a/an rule
    for slot_words, _ in _FUNCTION_SLOTS.values():
        for w in slot_words:
            words.update(_WORD_RE.findall(w.lower()))
    for template, _ in _TEMPLATES:
        words.update(_WORD_RE.findall(_SLOT_RE.sub(" ", template).lower()))
    return frozenset(words)


# The words every topic shares: the templates' and the function slots'. Not the analysis' English function-word
# list (process_exp_results/analysis/statistics.py FUNCTION_WORDS); this is the generator's own vocabulary.
TEMPLATE_WORDS: frozenset[str] = _template_words()


def content_words(topic: str) -> frozenset[str]:
    """All content words (nouns, verbs, adjectives) of one topic."""
    if topic not in VOCABULARY:
        raise ValueError(f"unknown topic {topic!r}; known topics: {TOPIC_NAMES}")
    return frozenset(w for pos in _POS for w in VOCABULARY[topic][pos])


def _check_vocabulary() -> None:
    seen: dict[str, str] = {}
    for topic in TOPIC_NAMES:
        for pos in _POS:
            words = VOCABULARY[topic][pos]
            if len(words) != _POS_SIZES[pos]:
                raise AssertionError(f"{topic}/{pos}: {len(words)} words, expected {_POS_SIZES[pos]}")
            for w in words:
                if not w.isascii() or not w.isalpha() or not w.islower():
                    raise AssertionError(f"{topic}/{pos}: bad word {w!r}")
                if w in TEMPLATE_WORDS:
                    raise AssertionError(f"{topic}/{pos}: {w!r} is a function word")
                if w in seen:
                    raise AssertionError(f"{w!r} appears in both {seen[w]} and {topic}/{pos}")
                seen[w] = f"{topic}/{pos}"


_check_vocabulary()


def _compile_templates():
    formats, weights, slot_lists = [], [], []
    for template, weight in _TEMPLATES:
        slots = _SLOT_RE.findall(template)
        formats.append(_SLOT_RE.sub("{}", template))
        weights.append(weight)
        slot_lists.append([_SLOT_CODE[s] for s in slots])
    n_slots = np.array([len(s) for s in slot_lists], dtype=np.int64)
    kind_matrix = np.full((len(slot_lists), int(n_slots.max())), -1, dtype=np.int64)
    for i, slots in enumerate(slot_lists):
        kind_matrix[i, : len(slots)] = slots
    w = np.asarray(weights, dtype=float)
    return tuple(formats), w / w.sum(), n_slots, kind_matrix


_TEMPLATE_FORMATS, _TEMPLATE_P, _TEMPLATE_NSLOTS, _TEMPLATE_KINDS = _compile_templates()


def _zipf_cdf(n: int) -> np.ndarray:
    p = 1.0 / np.arange(1, n + 1, dtype=float) ** ZIPF_EXPONENT
    return np.cumsum(p / p.sum())


_ZIPF_CDF = {pos: _zipf_cdf(size) for pos, size in _POS_SIZES.items()}
# (topic, rank) -> word, one object array per part of speech
_VOCAB_ARRAYS = {pos: np.array([list(VOCABULARY[t][pos]) for t in TOPIC_NAMES], dtype=object) for pos in _POS}
_FUNCTION_ARRAYS = {
    slot: (np.array(words, dtype=object), np.asarray(w, dtype=float) / sum(w))
    for slot, (words, w) in _FUNCTION_SLOTS.items()
}

# --------------------------------------------------------------------------
# Generation.
# --------------------------------------------------------------------------


def _validate(n_docs, n_topics, topic_overlap) -> float:
    if isinstance(n_docs, bool) or not isinstance(n_docs, numbers.Integral) or n_docs < 0:
        raise ValueError(f"n_docs must be a non-negative integer, got {n_docs!r}")
    if isinstance(n_topics, bool) or not isinstance(n_topics, numbers.Integral):
        raise ValueError(f"n_topics must be an integer, got {n_topics!r}")
    if not 1 <= n_topics <= len(TOPIC_NAMES):
        raise ValueError(
            f"n_topics must be between 1 and {len(TOPIC_NAMES)} (the maximum number of built-in topics), got {n_topics}"
        )
    if isinstance(topic_overlap, bool) or not isinstance(topic_overlap, numbers.Real):
        raise ValueError(f"topic_overlap must be a float in [0, 1], got {topic_overlap!r}")
    overlap = float(topic_overlap)
    if math.isnan(overlap) or not 0.0 <= overlap <= 1.0:
        raise ValueError(f"topic_overlap must be in [0, 1], got {topic_overlap!r}")
    return overlap


def _generate_chunk(rng: np.random.Generator, n: int, n_topics: int, overlap: float):
    """Generate ``n`` documents; returns (texts, topic indices)."""
    topics = rng.integers(n_topics, size=n)
    n_sent = np.clip(np.rint(rng.lognormal(math.log(3.0), 0.6, size=n)), 1, MAX_SENTENCES)
    n_sent = n_sent.astype(np.int64)
    templates = rng.choice(len(_TEMPLATE_FORMATS), size=int(n_sent.sum()), p=_TEMPLATE_P)

    # Flatten all slots of all sentences of the chunk, in reading order.
    slot_counts = _TEMPLATE_NSLOTS[templates]
    kinds_padded = _TEMPLATE_KINDS[templates]
    kinds = kinds_padded[kinds_padded >= 0]
    slot_doc = np.repeat(np.repeat(np.arange(n), n_sent), slot_counts)
    tokens = np.empty(kinds.size, dtype=object)

    # Content words: own topic w.p. 1 - overlap, else pooled (uniform topic).
    # The same random numbers are drawn whatever the overlap is.
    for slot, pos in _CONTENT_SLOTS.items():
        mask = kinds == _SLOT_CODE[slot]
        k = int(mask.sum())
        use_pool = rng.random(k) < overlap
        pooled_topic = rng.integers(n_topics, size=k)
        source = np.where(use_pool, pooled_topic, topics[slot_doc[mask]])
        cdf = _ZIPF_CDF[pos]
        rank = np.minimum(np.searchsorted(cdf, rng.random(k), side="right"), cdf.size - 1)
        tokens[mask] = _VOCAB_ARRAYS[pos][source, rank]

    for slot, (words, p) in _FUNCTION_ARRAYS.items():
        mask = kinds == _SLOT_CODE[slot]
        tokens[mask] = words[rng.choice(words.size, size=int(mask.sum()), p=p)]

    for slot, low, high, fmt in (("X", 2, 100, "{}"), ("Y", 1950, 2025, "{}"), ("Q", 1, 100, "{}%")):
        mask = kinds == _SLOT_CODE[slot]
        values = rng.integers(low, high, size=int(mask.sum()))
        tokens[mask] = [fmt.format(v) for v in values.tolist()]

    # Fill the templates sentence by sentence, capitalise, join per document.
    token_list = tokens.tolist()
    sentences = []
    start = 0
    for t, c in zip(templates.tolist(), slot_counts.tolist()):
        s = _TEMPLATE_FORMATS[t].format(*token_list[start : start + c])
        sentences.append(s[0].upper() + s[1:])
        start += c
    bounds = np.concatenate(([0], np.cumsum(n_sent))).tolist()
    docs = [" ".join(sentences[bounds[i] : bounds[i + 1]]) for i in range(n)]
    # a -> an before a vowel (texts contain no newlines, so one pass per chunk)
    texts = _A_AN_RE.sub(r"\1n ", "\n".join(docs)).split("\n")
    return texts, topics


def generate_documents(n_docs: int, n_topics: int = 4, topic_overlap: float = 0.0, seed: int = 0) -> Iterator[dict]:
    """Yield ``n_docs`` synthetic documents ``{"text": str, "topic": str}``.

    Topics are the first ``n_topics`` entries of :data:`TOPIC_NAMES`, assigned
    uniformly at random per document. ``topic_overlap`` in [0, 1] is the
    probability that a content word is drawn from the pooled (all-topic)
    distribution instead of the document's own topic. The output is a pure
    function of the arguments (``np.random.default_rng(seed)``).

    Arguments are validated eagerly (``ValueError``), before the first document
    is requested.
    """
    overlap = _validate(n_docs, n_topics, topic_overlap)
    return _iter_documents(int(n_docs), int(n_topics), overlap, seed)


def _iter_documents(n_docs: int, n_topics: int, overlap: float, seed) -> Iterator[dict]:
    rng = np.random.default_rng(seed)
    done = 0
    while done < n_docs:
        n = min(_CHUNK_SIZE, n_docs - done)
        texts, topics = _generate_chunk(rng, n, n_topics, overlap)
        for text, t in zip(texts, topics.tolist()):
            yield {"text": text, "topic": TOPIC_NAMES[t]}
        done += n


def builtin_dataset(n_docs: int, n_topics: int = 4, topic_overlap: float = 0.0, seed: int = 0):
    """The same documents as :func:`generate_documents`, as a ``datasets.Dataset``.

    Columns: ``text`` (str) and ``topic`` (str, a name from :data:`TOPIC_NAMES`).
    Built in memory from lists (no cache files), so it is deterministic.
    """
    import datasets  # local import: the generator itself only needs numpy

    texts, topics = [], []
    for doc in generate_documents(n_docs, n_topics, topic_overlap, seed):
        texts.append(doc["text"])
        topics.append(doc["topic"])
    features = datasets.Features({"text": datasets.Value("string"), "topic": datasets.Value("string")})
    return datasets.Dataset.from_dict({"text": texts, "topic": topics}, features=features)
