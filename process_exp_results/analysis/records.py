"""The routing records step 4 collects (one row per real token: its document, topic, token and the experts each MoE
layer chose), and the token classes the analysis reads them by (special, punctuation, digit, continuation piece,
function word, capitalized, other word-initial piece).
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

import numpy as np

# Frequent English function words (articles, pronouns, prepositions, conjunctions, auxiliaries).
FUNCTION_WORDS = frozenset(
    """
a an the this that these those
i me my mine we us our ours you your yours he him his she her hers it its they them their theirs
who whom whose which what
of in on at by for with from to into onto over under about after before between through during without
within against among across up down out off than as like
and or but nor so yet if because while although though whether
is am are was were be been being have has had having do does did doing
will would shall should can could may might must
not no there here then also just only very too
""".split()
)


CLASS_ORDER = ("special", "punctuation", "digit", "continuation", "function word", "capitalized", "word-initial")


@dataclass
class RoutingRecords:
    """One row per real (non-padding) token; special tokens are included (they are a token class)."""

    doc_id: np.ndarray  # [n] int64, unique per document
    topic: np.ndarray  # [n] int64, index into topic_names: the topic label of the token's document
    topic_names: list[str]
    token_id: np.ndarray  # [n] int64 (the UNMASKED token id)
    position: np.ndarray  # [n] int32, position in its sequence
    experts: np.ndarray  # [n, n_layers, k] int64; column 0 = the top choice; -1 = no expert
    layer_names: list[str]
    n_experts: int
    held_out: np.ndarray | None = None  # [n] bool: the document's topic was held out of training (None: none was)

    def subset(self, rows: np.ndarray) -> RoutingRecords:
        held_out = None if self.held_out is None else self.held_out[rows]
        return RoutingRecords(
            self.doc_id[rows],
            self.topic[rows],
            self.topic_names,
            self.token_id[rows],
            self.position[rows],
            self.experts[rows],
            self.layer_names,
            self.n_experts,
            held_out,
        )


def _is_punctuation(text: str) -> bool:
    return bool(text) and all(unicodedata.category(ch)[0] in "PS" for ch in text)


def token_classes(tokenizer) -> tuple[np.ndarray, list[str]]:
    """Class index per token id ([len(tokenizer)] int64) and the class names.

    Classes, first match wins: "special" (``tokenizer.all_special_ids``), "punctuation" (all characters
    are Unicode punctuation or symbols, a leading "##" ignored), "digit" (all characters are digits),
    "continuation" ("##" WordPiece pieces), "function word" (``FUNCTION_WORDS``, case-insensitive),
    "capitalized" (first letter upper-case; only when the tokenizer keeps case, i.e. some non-special
    vocabulary entry has an upper-case letter — otherwise the class is left out of the names),
    "word-initial" (everything else).
    """
    n = len(tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(list(range(n)))
    special = {int(i) for i in tokenizer.all_special_ids}
    keeps_case = any(
        tok is not None and i not in special and any(ch.isupper() for ch in tok) for i, tok in enumerate(tokens)
    )
    names = [c for c in CLASS_ORDER if keeps_case or c != "capitalized"]
    index = {c: i for i, c in enumerate(names)}
    out = np.empty(n, dtype=np.int64)
    for i, tok in enumerate(tokens):
        tok = "" if tok is None else tok
        continuation = tok.startswith("##") and len(tok) > 2
        body = tok[2:] if continuation else tok.lstrip("\u2581\u0120")  # also SentencePiece / byte-BPE marks
        if i in special:
            cls = "special"
        elif _is_punctuation(body):
            cls = "punctuation"
        elif body and all(ch.isdigit() for ch in body):
            cls = "digit"
        elif continuation:
            cls = "continuation"
        elif body.lower() in FUNCTION_WORDS:
            cls = "function word"
        elif keeps_case and body[:1].isupper():
            cls = "capitalized"
        else:
            cls = "word-initial"
        out[i] = index[cls]
    return out, names
