"""Load a tokenizer by hub name or local folder, or train a WordPiece tokenizer on the train split."""
from __future__ import annotations

from typing import Iterable

from config_utils import PipelineError

SPECIAL_TOKENS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                  "mask_token": "[MASK]"}


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except Exception as error:  # offline, unknown name, broken folder: all mean "no tokenizer"
        reason = str(error).splitlines()[0][:160] if str(error) else type(error).__name__
        raise PipelineError(f"cannot load tokenizer '{name}' (data_params.tokenizer_name: {reason}); offline? "
                            f"use a local tokenizer folder or --set dataset.data_params.tokenizer_name=null "
                            f"to train a WordPiece tokenizer on the train split") from None
    if tokenizer.mask_token_id is None or tokenizer.pad_token_id is None:
        raise PipelineError(f"tokenizer '{name}' has no [MASK] or [PAD] token, so it cannot do MLM; "
                            f"pick a BERT-style tokenizer or tokenizer_name: null")
    return tokenizer


def train_wordpiece(texts: Iterable[list[str]], vocab_size: int, n_texts: int):
    """Lower-cased BERT-style WordPiece, trained with `tokenizers`, wrapped as a fast HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast

    tokenizer = Tokenizer(models.WordPiece(unk_token=SPECIAL_TOKENS["unk_token"]))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS.values()),
                                        show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer, length=n_texts)
    cls, sep = SPECIAL_TOKENS["cls_token"], SPECIAL_TOKENS["sep_token"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
        special_tokens=[(cls, tokenizer.token_to_id(cls)), (sep, tokenizer.token_to_id(sep))])
    return BertTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)
