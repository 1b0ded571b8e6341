"""MLM masking: BERT's 80/10/10 rule on the numbers, and step 2's output tensors end to end."""

import json
import subprocess
import sys

import datasets
import numpy as np
import pytest

from data_processors.masking import IGNORE_INDEX, document_rng, mask_tokens
from helpers import REPO, check_ok, prepare_tiny_data, run_step, step_config_args, tiny_sets

MASK_ID = 4
SPECIAL_IDS = np.array([0, 1, 2, 3, 4])  # pad, unk, cls, sep, mask
RANDOM_IDS = np.arange(5, 1000)


def make_ids(n_tokens: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, 1000, n_tokens)
    special = rng.random(n_tokens) < 0.2  # a fifth of positions are [CLS]/[SEP]/[PAD]
    ids[special] = rng.choice(np.array([0, 2, 3]), special.sum())
    return ids, ~special


def test_mask_statistics_follow_bert():
    ids, maskable = make_ids(250_000)
    assert maskable.sum() > 195_000
    masked, labels = mask_tokens(ids, maskable, np.random.default_rng(5), 0.15, MASK_ID, RANDOM_IDS)
    picked = labels != IGNORE_INDEX

    assert abs(picked[maskable].mean() - 0.15) < 0.005
    assert not picked[~maskable].any()  # special and padding positions are never picked
    assert np.array_equal(masked[~picked], ids[~picked])  # nothing else changes
    assert np.array_equal(labels[picked], ids[picked]) and (labels[~picked] == IGNORE_INDEX).all()

    to_mask = masked[picked] == MASK_ID
    unchanged = masked[picked] == ids[picked]
    replaced = ~to_mask & ~unchanged
    # a random draw can hit the original id (1 in 995), so "unchanged" includes a few of those
    assert abs(to_mask.mean() - 0.80) < 0.015
    assert abs(replaced.mean() - 0.10) < 0.015
    assert abs(unchanged.mean() - 0.10) < 0.015
    assert not np.isin(masked[picked][replaced], SPECIAL_IDS).any()  # random tokens are never special
    # random replacements are spread over the vocabulary, not one id
    assert len(np.unique(masked[picked][replaced])) > 500


@pytest.mark.parametrize("mask_prob", [0.0, 1.0])
def test_mask_prob_edges(mask_prob):
    ids, maskable = make_ids(10_000)
    masked, labels = mask_tokens(ids, maskable, np.random.default_rng(0), mask_prob, MASK_ID, RANDOM_IDS)
    picked = labels != IGNORE_INDEX
    assert np.array_equal(picked, maskable if mask_prob == 1.0 else np.zeros_like(maskable))


def test_mask_is_deterministic_per_document_and_leaves_input_alone():
    ids, maskable = make_ids(512)
    before = ids.copy()
    first = mask_tokens(ids, maskable, document_rng(11, 7), 0.15, MASK_ID, RANDOM_IDS)
    again = mask_tokens(ids, maskable, document_rng(11, 7), 0.15, MASK_ID, RANDOM_IDS)
    other_doc = mask_tokens(ids, maskable, document_rng(11, 8), 0.15, MASK_ID, RANDOM_IDS)
    other_seed = mask_tokens(ids, maskable, document_rng(12, 7), 0.15, MASK_ID, RANDOM_IDS)
    assert np.array_equal(ids, before)
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    assert not np.array_equal(first[1], other_doc[1])
    assert not np.array_equal(first[1], other_seed[1])


# ---- step 2 end to end ------------------------------------------------------------------------------

SPLITS = ("train", "valid", "test")


@pytest.fixture(scope="module")
def step2_output(tmp_path_factory):
    """Steps 1 and 2 on a tiny builtin corpus; returns (tmp folder, the --set options used)."""
    tmp_path = tmp_path_factory.mktemp("masking")
    return tmp_path, prepare_tiny_data(tmp_path, **{"dataset.data_params.mask_prob": 0.2})


def load_masked(folder, name) -> dict:
    """All columns of a step-2 dataset as numpy arrays (topic as a list of str)."""
    dataset = datasets.load_from_disk(str(folder / name))
    assert set(dataset.column_names) == {"doc_id", "topic", "input_ids", "attention_mask", "labels", "unmasked_ids"}
    columns = dataset.with_format("numpy")[:]
    return {**columns, "topic": list(columns["topic"])}


def test_step2_writes_the_contracted_tensors(step2_output):
    from transformers import AutoTokenizer

    tmp_path, _ = step2_output
    masked_dir = tmp_path / "masked"
    manifest = json.loads((masked_dir / "manifest.json").read_text(encoding="utf-8"))
    tokenizer = AutoTokenizer.from_pretrained(str(masked_dir / "tokenizer"))
    assert len(tokenizer) == manifest["tokenizer"]["vocab_size"] <= 300
    assert manifest["seq_len"] == 32 and manifest["mask_prob"] == 0.2
    assert sorted(manifest["topics"]) == ["gaming", "programming"]
    assert tokenizer.mask_token_id == manifest["tokenizer"]["mask_token_id"]
    special_ids = np.array(sorted(tokenizer.all_special_ids))

    step1 = json.loads((tmp_path / "processed" / "manifest.json").read_text(encoding="utf-8"))
    maskable_total, picked_total = 0, 0
    for name in [*SPLITS, "topics/gaming", "topics/programming"]:
        data = load_masked(masked_dir, name)
        expected_rows = step1["counts"][name] if name in SPLITS else step1["counts"]["topics"][name.split("/")[1]]
        ids, attention, labels = data["input_ids"], data["attention_mask"], data["labels"]
        n_rows = len(data["doc_id"])
        assert n_rows == expected_rows == manifest["counts"][name]["documents"]
        assert ids.shape == attention.shape == labels.shape == (n_rows, 32)
        if name.startswith("topics/"):
            assert set(data["topic"]) == {name.split("/")[1]}
        else:
            assert not {"gaming", "programming"} & set(data["topic"])

        picked = labels != IGNORE_INDEX
        assert (ids[:, 0] == tokenizer.cls_token_id).all()  # [CLS] is never masked
        assert not picked[:, 0].any()
        lengths = attention.sum(axis=1)
        rows = np.arange(n_rows)
        assert (ids[rows, lengths - 1] == tokenizer.sep_token_id).all()  # nor [SEP]
        assert not picked[rows, lengths - 1].any()
        assert (ids[attention == 0] == tokenizer.pad_token_id).all()  # nor [PAD]
        assert not picked[attention == 0].any()
        assert not np.isin(labels[picked], special_ids).any()  # labels hold real (unmasked) tokens
        assert (ids[picked] != tokenizer.pad_token_id).all()
        assert int(attention.sum()) == manifest["counts"][name]["real_tokens"]
        assert int(picked.sum()) == manifest["counts"][name]["masked_tokens"]
        maskable_total += int(attention.sum()) - 2 * n_rows
        picked_total += int(picked.sum())
        # most picked positions carry [MASK]
        assert (ids[picked] == tokenizer.mask_token_id).mean() > 0.6

    rate = picked_total / maskable_total
    assert maskable_total > 5000
    assert abs(rate - 0.2) < 0.02, rate


def test_step2_labels_are_the_tokenized_text(step2_output):
    """Where a token is picked its label is the id the tokenizer gives the text; elsewhere ids are untouched."""
    from transformers import AutoTokenizer

    tmp_path, _ = step2_output
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "masked" / "tokenizer"))
    texts = datasets.Dataset.from_parquet(str(tmp_path / "processed" / "test.parquet"))[:]
    data = load_masked(tmp_path / "masked", "test")
    encoded = tokenizer(texts["text"], truncation=True, padding="max_length", max_length=32, return_tensors="np")
    assert np.array_equal(data["doc_id"], np.array(texts["doc_id"]))
    picked = data["labels"] != IGNORE_INDEX
    assert np.array_equal(data["labels"][picked], encoded["input_ids"][picked])
    assert np.array_equal(data["input_ids"][~picked], encoded["input_ids"][~picked])
    assert np.array_equal(data["attention_mask"], encoded["attention_mask"])


def test_step2_is_deterministic_across_runs_and_processes(step2_output, tmp_path, monkeypatch):
    """Step 2 again, with step 1's saved tokenizer and 2 worker processes (forced on tiny splits): same tensors.

    The tokenizer is fixed here so that this checks one thing: masking depends only on (seed, doc_id), not
    on processes or batches.
    """
    import data_processors.dataset as step2

    first_dir, options = step2_output
    second_masked = tmp_path / "masked2"
    saved_path = list(sys.path)
    monkeypatch.setattr(step2, "ROWS_PER_PROCESS", 10)  # so that even 32 rows are split over 2 processes
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "dataset.py",
            *step_config_args(2),
            *options,
            "--set",
            f"dataset.data_params.masked_dir={second_masked}",
            "--set",
            f"dataset.data_params.tokenizer_name={first_dir / 'masked' / 'tokenizer'}",
            "--set",
            "dataset.data_params.num_proc=2",
        ],
    )
    try:
        step2.main()
    finally:
        sys.path[:] = saved_path  # the script points sys.path[0] at the repository
    first = json.loads((first_dir / "masked" / "manifest.json").read_text(encoding="utf-8"))
    second = json.loads((second_masked / "manifest.json").read_text(encoding="utf-8"))
    assert first["counts"] == second["counts"]
    assert first["input_manifest_hash"] == second["input_manifest_hash"]
    for name in [*SPLITS, "topics/gaming", "topics/programming"]:
        a, b = load_masked(first_dir / "masked", name), load_masked(second_masked, name)
        for column in ("doc_id", "input_ids", "attention_mask", "labels"):
            assert np.array_equal(a[column], b[column]), (name, column)
        assert a["topic"] == b["topic"]


def test_trained_tokenizer_is_reproducible(step2_output):
    """Training the WordPiece tokenizer on the same split in fresh processes gives the same vocabulary.

    Fresh processes matter: the trainer's hash maps are seeded per process (huggingface/tokenizers#1794).
    """
    tmp_path, _ = step2_output
    script = (
        "import sys, json, datasets; from data_processors.tokenizer import train_wordpiece; "
        "texts = list(datasets.Dataset.from_parquet(sys.argv[1])['text']); "
        "print(json.dumps(sorted(train_wordpiece(lambda: [texts], 300, len(texts)).get_vocab().items())))"
    )
    vocabularies = [
        subprocess.run(
            [sys.executable, "-c", script, str(tmp_path / "processed" / "train.parquet")],
            capture_output=True,
            text=True,
            check=True,
            cwd=REPO,
        ).stdout
        for _ in range(3)
    ]
    assert vocabularies[0] == vocabularies[1] == vocabularies[2]
    assert len(json.loads(vocabularies[0])) > 100


def test_step2_rerun_with_another_seed_changes_the_masks(step2_output, tmp_path):
    """The seed does reach the masking: steps 1+2 with another dataset seed give other labels."""
    first_dir, _ = step2_output
    options = tiny_sets(tmp_path, **{"dataset.data_params.mask_prob": 0.2, "dataset.seed": 12})
    check_ok(run_step(1, *step_config_args(1), *options, cwd=tmp_path))
    check_ok(run_step(2, *step_config_args(2), *options, cwd=tmp_path))
    a, b = load_masked(first_dir / "masked", "train"), load_masked(tmp_path / "masked", "train")
    assert not (a["input_ids"].shape == b["input_ids"].shape and np.array_equal(a["labels"], b["labels"]))


def test_step2_never_picks_unk_or_other_special_tokens():
    """Real text gives [UNK] tokens; like transformers' DataCollatorForLanguageModeling, MLM never picks one
    (the tokenizer's special-tokens mask marks [CLS], [SEP] and [PAD] only)."""
    from data_processors.dataset import tokenize_and_mask
    from data_processors.tokenizer import train_wordpiece

    texts = ["the cat sat on the mat and the dog sat too"] * 50
    tokenizer = train_wordpiece(lambda: iter([texts]), 100, len(texts))
    unknown = ["€ ☃ ✈ 中 文 字 ♞ ♜ " * 4 + str(i) for i in range(40)]  # characters the vocabulary never saw
    random_ids = np.array(sorted(set(range(len(tokenizer))) - set(tokenizer.all_special_ids)))
    batch = {"doc_id": list(range(40)), "topic": ["t"] * 40, "text": unknown}
    out = tokenize_and_mask(batch, tokenizer, seq_len=32, seed=0, mask_prob=1.0, random_token_ids=random_ids)
    ids = np.array(out["unmasked_ids"])
    labels = np.array(out["labels"])
    assert (ids == tokenizer.unk_token_id).sum() > 100  # the text really is mostly [UNK]
    assert not np.isin(labels[labels != IGNORE_INDEX], tokenizer.all_special_ids).any()
    regular = (np.array(out["attention_mask"]) == 1) & ~np.isin(ids, tokenizer.all_special_ids)
    assert ((labels != IGNORE_INDEX) == regular).all()  # mask_prob 1: every regular token is picked
