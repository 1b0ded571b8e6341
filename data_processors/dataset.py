"""Step 2: tokenize step 1's splits and mask them into MLM tensors.

Reads data_params.processed_dir (step 1), writes data_params.masked_dir: tokenizer/ (loadable with
AutoTokenizer.from_pretrained), one Arrow dataset per split (train, valid, test) and per evaluation
topic (topics/<file stem>, the manifest maps each label to it) with input_ids, attention_mask, labels
(-100 where not masked), topic,
doc_id and unmasked_ids (for train.masking: dynamic), and manifest.json. Example:
    python data_processors/dataset.py --config-dataset demo/dataset_params.yaml --config-model demo/model_params.yaml
"""

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # run as a script: import the project, not this folder

import gc
import hashlib
import json
import os
import re
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the map forks worker processes after training

import datasets
import numpy as np

from config_utils import PipelineError, atomic_dir, first_line, load_step_configs, read_manifest, run_step, step_parser
from config_utils.contracts import check_settings, dataset_settings, step1_command, step3_command
from config_utils.io import check_output_folder, lock_step_output, write_sealed_manifest
from data_processors.masking import IGNORE_INDEX, document_rng, mask_tokens, maskable_tokens
from data_processors.splitting import SPLITS
from data_processors.tokenizer import load_tokenizer, train_wordpiece

ROWS_PER_PROCESS = 2000  # below this, starting worker processes costs more than it saves
FEATURES = datasets.Features(
    {
        "doc_id": datasets.Value("int64"),
        "topic": datasets.Value("string"),
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        "attention_mask": datasets.Sequence(datasets.Value("int8")),
        "labels": datasets.Sequence(datasets.Value("int32")),
        "unmasked_ids": datasets.Sequence(datasets.Value("int32")),  # always kept: any run may pick dynamic masking
    }
)


# a vocabulary is learnt from many documents, not from one long one: the start of each is enough
TOKENIZER_WORDS_PER_DOCUMENT = 4096
WORD = re.compile(r"[^ \t\n\r]+")  # split only where every tokenizer sees a boundary


def first_words(text: str, n_words: int) -> str:
    """The text up to the end of its n_words-th word (a run without spaces, tabs or newlines).

    Tokenizers split words independently, so when the first seq_len words fill seq_len tokens they are the whole
    text's first seq_len tokens: a 50 MB document costs what its start costs (encode checks that they fill it).
    """
    for count, match in enumerate(WORD.finditer(text), start=1):
        if count == n_words:
            return text[: match.end()]
    return text


def encode(tokenizer, texts: list[str], seq_len: int) -> dict:
    """tokenizer(texts) cut to seq_len tokens, reading only the start of long texts."""

    def tokenize(some_texts):
        return tokenizer(some_texts, truncation=True, padding="max_length", max_length=seq_len)

    starts = [first_words(text, seq_len) for text in texts]
    encoded = tokenize(starts)
    # a cut text whose start did not fill the sequence (words that give no token): encode it whole
    redo = [
        row
        for row, (start, text) in enumerate(zip(starts, texts))
        if len(start) < len(text) and sum(encoded["attention_mask"][row]) < seq_len
    ]
    if redo:
        whole = tokenize([texts[row] for row in redo])
        for key in encoded:
            for index, row in enumerate(redo):
                encoded[key][row] = whole[key][index]
    return encoded


def tokenize_and_mask(
    batch: dict, tokenizer, seq_len: int, seed: int, mask_prob: float, random_token_ids: np.ndarray
) -> dict:
    encoded = encode(tokenizer, batch["text"], seq_len)
    masked_ids, labels, unmasked_ids = [], [], []
    special_token_ids = np.array(tokenizer.all_special_ids)
    for doc_id, ids, attention in zip(batch["doc_id"], encoded["input_ids"], encoded["attention_mask"]):
        ids = encoded_ids = np.asarray(ids, dtype=np.int64)
        maskable = maskable_tokens(ids, attention, special_token_ids)
        ids, doc_labels = mask_tokens(
            ids, maskable, document_rng(seed, doc_id), mask_prob, tokenizer.mask_token_id, random_token_ids
        )
        unmasked_ids.append(encoded_ids)
        masked_ids.append(ids)
        labels.append(doc_labels)
    return {
        "doc_id": batch["doc_id"],
        "topic": batch["topic"],
        "input_ids": masked_ids,
        "attention_mask": encoded["attention_mask"],
        "labels": labels,
        "unmasked_ids": unmasked_ids,
    }


def vocab_hash(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return hashlib.blake2b(json.dumps(vocab).encode("utf-8"), digest_size=8).hexdigest()


def token_counts(dataset: datasets.Dataset) -> dict:
    real, masked = 0, 0
    for batch in dataset.with_format("numpy", columns=["attention_mask", "labels"]).iter(batch_size=4096):
        real += int(batch["attention_mask"].sum())
        masked += int((batch["labels"] != IGNORE_INDEX).sum())
    return {"documents": len(dataset), "real_tokens": real, "masked_tokens": masked}


def main() -> None:
    parser = step_parser(
        __doc__,
        {"dataset": ("--config-dataset", "dataset_params.yaml"), "model": ("--config-model", "model_params.yaml")},
    )
    args = parser.parse_args()
    configs = load_step_configs(args, ["dataset", "model"])
    dataset_config, seq_len = configs["dataset"], configs["model"].seq_len
    data_params = dataset_config.data_params
    started = time.time()

    masked_dir = check_output_folder(data_params.masked_dir, "dataset.data_params.masked_dir")
    processed_dir = Path(data_params.processed_dir)
    step1_manifest, step1_hash = read_manifest(processed_dir, step1_command(args))
    check_settings(
        dataset_settings(dataset_config, step=1),
        dataset_settings(step1_manifest["config"], step=1),
        str(processed_dir),
        step1_command(args),
    )
    lock_step_output(masked_dir, "dataset.data_params.masked_dir")  # before the work: a second one stops now
    # each topic's folder is named as step 1 named its file (a safe name, not the label)
    topic_folders = {topic: f"topics/{Path(path).stem}" for topic, path in step1_manifest["files"]["topics"].items()}
    inputs = read_step1_files(processed_dir, step1_manifest["files"], topic_folders, step1_command(args))
    tokenizer = make_tokenizer(data_params, inputs["train"], seq_len)

    counts = {}
    with atomic_dir(masked_dir) as tmp_dir:
        tokenizer.save_pretrained(str(tmp_dir / "tokenizer"))
        for name, dataset in inputs.items():
            masked = mask_dataset(dataset, name, tokenizer, seq_len, dataset_config)
            masked.save_to_disk(str(tmp_dir / name))
            counts[name] = token_counts(masked)
        write_sealed_manifest(
            tmp_dir,
            {
                **manifest(dataset_config, step1_hash, seq_len, tokenizer, topic_folders, counts),
                "seconds": round(time.time() - started, 2),
            },
        )

    test = counts["test"]
    print(
        f"step 2 done: vocab {len(tokenizer)}, seq_len {seq_len}; test: {test['documents']} documents, "
        f"{test['masked_tokens'] / max(test['real_tokens'], 1):.1%} of {test['real_tokens']} real tokens masked"
    )
    print(f"wrote {masked_dir}/ (next: {step3_command(args)})")


def read_step1_files(
    processed_dir: Path, files: dict, topic_folders: dict[str, str], run_first: str
) -> dict[str, datasets.Dataset]:
    """Step 1's splits and topic files, keyed by the folder each is written to here (train, ..., topics/<stem>)."""
    paths = {name: files[name] for name in SPLITS}
    paths.update({topic_folders[topic]: path for topic, path in files["topics"].items()})
    datasets.disable_progress_bars()  # reading a few parquet files is instant; keep the bars for the map
    inputs = {}
    for name, path in paths.items():
        try:
            inputs[name] = datasets.Dataset.from_parquet(str(processed_dir / path))
        except Exception as error:  # a damaged file of an output from before step 1 recorded its files' hashes
            raise PipelineError(
                f"{processed_dir / path} cannot be read ({first_line(error)}): run `{run_first}` again"
            ) from None
    datasets.enable_progress_bars()
    return inputs


def make_tokenizer(data_params: dict, train_texts: datasets.Dataset, seq_len: int):
    """data_params.tokenizer_name loaded, or (null) a WordPiece tokenizer trained on the train split."""
    if data_params.tokenizer_name is None:
        print(
            f"training a WordPiece tokenizer (vocab {data_params.tokenizer_vocab_size}) on "
            f"{len(train_texts)} train documents"
        )

        def text_batches():
            for batch in train_texts.iter(batch_size=1000):
                yield [first_words(text, TOKENIZER_WORDS_PER_DOCUMENT) for text in batch["text"]]

        tokenizer = train_wordpiece(text_batches, data_params.tokenizer_vocab_size, len(train_texts))
    else:
        tokenizer = load_tokenizer(data_params.tokenizer_name)
    tokenizer.model_max_length = seq_len
    if len(tokenizer) <= len(tokenizer.all_special_ids):  # nothing to mask, predict or replace a token with
        raise PipelineError(
            f"the tokenizer has no token but its {len(tokenizer)} special ones: the {len(train_texts)} train texts "
            f"hold nothing it keeps (only control characters or whitespace?); check dataset.load_params.text_field "
            f"and the corpus"
        )
    return tokenizer


def mask_dataset(
    dataset: datasets.Dataset, name: str, tokenizer, seq_len: int, dataset_config: dict
) -> datasets.Dataset:
    """Tokenized and masked, in data_params.num_proc processes where the dataset is large enough to pay for them."""
    random_token_ids = np.array(sorted(set(range(len(tokenizer))) - set(tokenizer.all_special_ids)))
    num_proc = min(dataset_config.data_params.num_proc, len(dataset) // ROWS_PER_PROCESS)
    # one process: map in this one (datasets 5 forks a pool worker and a manager even for num_proc=1)
    num_proc = num_proc if num_proc > 1 else None
    if num_proc:
        # the forked workers share this process's objects copy-on-write: keep the garbage collector's
        # full passes (in here and in them) from touching, hence copying, every page they live on
        gc.freeze()
    try:
        return dataset.map(
            tokenize_and_mask,
            batched=True,
            num_proc=num_proc,
            remove_columns=dataset.column_names,
            features=FEATURES,
            desc=f"step 2: tokenizing and masking {name}",
            fn_kwargs={
                "tokenizer": tokenizer,
                "seq_len": seq_len,
                "seed": dataset_config.seed,
                "mask_prob": dataset_config.data_params.mask_prob,
                "random_token_ids": random_token_ids,
            },
        )
    finally:
        gc.unfreeze()


def manifest(
    dataset_config: dict, step1_hash: str, seq_len: int, tokenizer, topic_folders: dict[str, str], counts: dict
) -> dict:
    """Step 2's manifest.json, all but the seconds it took."""
    data_params = dataset_config.data_params
    return {
        "step": "dataset",
        "input_manifest_hash": step1_hash,
        "config": dataset_config,
        "dataset_settings": dataset_settings(dataset_config, step=2),
        "seed": dataset_config.seed,
        "seq_len": seq_len,
        "mask_prob": data_params.mask_prob,
        "columns": list(FEATURES),  # unmasked_ids: train.masking=dynamic re-masks from these
        "tokenizer": {
            "name": data_params.tokenizer_name or "trained WordPiece",
            "vocab_size": len(tokenizer),
            "vocab_hash": vocab_hash(tokenizer),  # a hub tokenizer can change under the same name
            "pad_token_id": tokenizer.pad_token_id,
            "mask_token_id": tokenizer.mask_token_id,
            "special_token_ids": sorted(tokenizer.all_special_ids),
        },
        "splits": list(SPLITS),
        "topics": topic_folders,  # label -> folder
        "counts": counts,
    }


if __name__ == "__main__":
    run_step(main)
