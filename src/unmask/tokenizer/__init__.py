"""Tokenizers: our byte-level BPE with fixed special ids (0..9), and any Hugging Face
tokenizer.json behind the same interface (`HFTokenizer`), with its Jinja chat template."""
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
from .chat_template import ChatTemplate, find_chat_template
from .hf import HFTokenizer

__all__ = [
    "CHAT_ROLES",
    "MIN_VOCAB",
    "SPECIAL_IDS",
    "SPECIAL_TOKENS",
    "ChatTemplate",
    "HFTokenizer",
    "Tokenizer",
    "find_chat_template",
    "iter_split_texts",
    "train_from_corpus",
    "train_tokenizer",
]
