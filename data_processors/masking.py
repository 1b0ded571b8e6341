"""MLM masking (BERT's rule): pick `mask_prob` of the real tokens that are not special tokens ([CLS], [SEP],
[PAD], and [UNK] too, as transformers' DataCollatorForLanguageModeling does); of those 80% -> [MASK],
10% -> a random regular token, 10% unchanged. Labels hold the original id there and -100 elsewhere.

Each document draws from its own generator seeded by (seed, doc_id), so the result does not depend
on batch size or on how many processes run the map. Dynamic masking (train.masking: dynamic) re-masks
the unmasked ids every epoch with a generator seeded by (seed, doc_id, epoch).
"""

from __future__ import annotations

import numpy as np

IGNORE_INDEX = -100


def maskable_tokens(input_ids: np.ndarray, attention_mask: np.ndarray, special_token_ids: np.ndarray) -> np.ndarray:
    """[T] bool: the real tokens MLM may pick. Every special id is excluded, [UNK] included: real text gives
    [UNK] tokens, and predicting "unknown" teaches nothing (the tokenizer's special-tokens mask misses it)."""
    return (np.asarray(attention_mask) != 0) & ~np.isin(input_ids, special_token_ids)


def mask_tokens(
    input_ids: np.ndarray,
    maskable: np.ndarray,
    rng: np.random.Generator,
    mask_prob: float,
    mask_token_id: int,
    random_token_ids: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """input_ids, maskable: [T]; returns (masked input ids, labels)."""
    picked = maskable & (rng.random(input_ids.shape) < mask_prob)
    action = rng.random(input_ids.shape)
    random_tokens = random_token_ids[rng.integers(0, len(random_token_ids), input_ids.shape)]
    masked_ids = input_ids.copy()
    masked_ids[picked & (action < 0.8)] = mask_token_id
    replace = picked & (action >= 0.8) & (action < 0.9)
    masked_ids[replace] = random_tokens[replace]
    labels = np.where(picked, input_ids, IGNORE_INDEX)
    return masked_ids, labels


def document_rng(seed: int, doc_id: int, epoch: int | None = None) -> np.random.Generator:
    """Static masks (step 2) use (seed, doc_id); dynamic masks add the epoch, so each epoch differs."""
    return np.random.default_rng([seed, doc_id] if epoch is None else [seed, doc_id, epoch])
