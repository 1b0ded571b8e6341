"""Load a tokenizer by hub name or local folder, or train a WordPiece tokenizer on the train split."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from config_utils import PipelineError, first_line

SPECIAL_TOKENS = {
    "pad_token": "[PAD]",
    "unk_token": "[UNK]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "mask_token": "[MASK]",
}
# from_pretrained's options that transformers records in init_kwargs (is_local, local_files_only) and
# save_pretrained would write into tokenizer_config.json; they say how one copy was loaded, not what it is.
LOAD_OPTIONS = (
    "is_local",
    "local_files_only",
    "cache_dir",
    "force_download",
    "proxies",
    "token",
    "revision",
    "subfolder",
    "trust_remote_code",
    "_commit_hash",
    "_from_auto",
)


def drop_load_options(tokenizer) -> None:
    """Forget how the tokenizer was loaded, so that saving it writes only what it is."""
    for key in LOAD_OPTIONS:
        tokenizer.init_kwargs.pop(key, None)


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except Exception as error:  # offline, unknown name, broken folder: all mean "no tokenizer"
        reason = first_line(error)
        raise PipelineError(
            f"cannot load tokenizer '{name}' (data_params.tokenizer_name: {reason}); offline? "
            f"use a local tokenizer folder or --set dataset.data_params.tokenizer_name=null "
            f"to train a WordPiece tokenizer on the train split"
        ) from None
    if tokenizer.mask_token_id is None or tokenizer.pad_token_id is None:
        raise PipelineError(
            f"tokenizer '{name}' has no [MASK] or [PAD] token, so it cannot do MLM; "
            f"pick a BERT-style tokenizer or tokenizer_name: null"
        )
    drop_load_options(tokenizer)  # step 2 saves it: tokenizer/tokenizer_config.json stays free of them
    return tokenizer


def train_wordpiece(text_batches: Callable[[], Iterable[list[str]]], vocab_size: int, n_texts: int):
    """Lower-cased BERT-style WordPiece, trained with `tokenizers`, wrapped as a fast HF tokenizer.

    text_batches() yields batches of texts; it is called twice (alphabet, then training).
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast

    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    # The trainer numbers "##c" pieces in hash-map order, which breaks merge ties differently on every
    # run (huggingface/tokenizers#1794); naming them up front, sorted, makes training deterministic.
    continuation_chars = set()
    for batch in text_batches():
        for text in batch:
            for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)):
                continuation_chars.update(word[1:])
    fixed_tokens = list(SPECIAL_TOKENS.values()) + [f"##{char}" for char in sorted(continuation_chars)]
    draft = Tokenizer(models.WordPiece(unk_token=SPECIAL_TOKENS["unk_token"]))
    draft.normalizer, draft.pre_tokenizer = normalizer, pre_tokenizer
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=fixed_tokens, show_progress=False)
    draft.train_from_iterator(text_batches(), trainer=trainer, length=n_texts)

    # rebuild from the learned vocabulary so that only the five real special tokens are "special"
    vocab = draft.get_vocab(with_added_tokens=False)
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    tokenizer.normalizer, tokenizer.pre_tokenizer = normalizer, pre_tokenizer
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    cls, sep = SPECIAL_TOKENS["cls_token"], SPECIAL_TOKENS["sep_token"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}",
        pair=f"{cls} $A {sep} $B:1 {sep}:1",
        special_tokens=[(cls, vocab[cls]), (sep, vocab[sep])],
    )
    return BertTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)
