"""Byte-level BPE tokenizer with unmask's fixed special tokens (ids 0..9)."""
from .bpe import (
    CHAT_ROLES,
    MIN_VOCAB,
    SPECIAL_IDS,
    SPECIAL_TOKENS,
    Tokenizer,
    iter_split_texts,
    train_from_corpus,
    train_tokenizer,
)

__all__ = [
    "CHAT_ROLES",
    "MIN_VOCAB",
    "SPECIAL_IDS",
    "SPECIAL_TOKENS",
    "Tokenizer",
    "iter_split_texts",
    "train_from_corpus",
    "train_tokenizer",
]
