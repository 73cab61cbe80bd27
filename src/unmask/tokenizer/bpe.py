"""Byte-level BPE: the one tokenizer every unmask model uses.

Byte-level so that *any* Unicode string survives encode -> decode unchanged: there is no
normalizer, no prefix space and no unknown token, and all 256 byte symbols are always in the
vocabulary, so nothing can be dropped or rewritten on the way through.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from ..fsutil import atomic_write_text
from ..errors import UserError
from .vocab import VocabLookup

# The order is part of the on-disk format: these take ids 0..9 in every tokenizer we train, so
# checkpoints, configs and tests may rely on the ids.
SPECIAL_TOKENS: dict[str, str] = {
    "eos": "<|endoftext|>",
    "mask": "<|mask|>",
    "pad": "<|pad|>",
    "fim_prefix": "<|fim_prefix|>",
    "fim_suffix": "<|fim_suffix|>",
    "fim_middle": "<|fim_middle|>",
    "system": "<|system|>",
    "user": "<|user|>",
    "assistant": "<|assistant|>",
    "end": "<|end|>",
}
SPECIAL_IDS: dict[str, int] = {name: i for i, name in enumerate(SPECIAL_TOKENS)}
CHAT_ROLES = ("system", "user", "assistant")
# Below this the vocabulary cannot even hold the special tokens and the 256 byte symbols.
MIN_VOCAB = len(SPECIAL_TOKENS) + 256


class Tokenizer(VocabLookup):
    """A thin wrapper over a HF `tokenizers` byte-level BPE with our special tokens."""

    def __init__(self, hf: _HFTokenizer, source: str = "<memory>"):
        self._tok = hf
        self.source = source
        self._check_specials()

    # ---- loading and saving -------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Tokenizer":
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UserError(
                f"{path}: tokenizer file not found; train one with `unmask tokenizer train`"
            ) from None
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: cannot read the tokenizer ({e}); the file is corrupt") from None
        return cls.from_str(text, source=str(path))

    @classmethod
    def from_str(cls, text: str, source: str = "<string>") -> "Tokenizer":
        try:
            hf = _HFTokenizer.from_str(text)
        except Exception as e:  # tokenizers raises plain Exception for any parse error
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(
                f"{source}: not a valid tokenizer.json ({msg}); the file is corrupt, re-train "
                "or re-copy it"
            ) from None
        return cls(hf, source=source)

    def to_str(self) -> str:
        return self._tok.to_str()

    def save(self, path: str | os.PathLike) -> None:
        """Write tokenizer.json atomically (a directory gets `tokenizer.json` inside it)."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        atomic_write_text(path, self.to_str())

    def sha256(self) -> str:
        return hashlib.sha256(self.to_str().encode("utf-8")).hexdigest()

    def _check_specials(self) -> None:
        for name, tok in SPECIAL_TOKENS.items():
            got = self._tok.token_to_id(tok)
            if got != SPECIAL_IDS[name]:
                raise UserError(
                    f"{self.source}: special token {tok} has id {got}, expected "
                    f"{SPECIAL_IDS[name]}; this tokenizer was not trained by unmask, re-train it "
                    "with `unmask tokenizer train`"
                )

    # ---- encoding -----------------------------------------------------------------------
    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """allow_special=False encodes special-token strings in `text` as plain text: use it for
        anything a user typed, so a prompt cannot smuggle in `<|mask|>` or `<|endoftext|>`."""
        if allow_special:
            return self._tok.encode(text, add_special_tokens=False).ids
        self._tok.encode_special_tokens = True
        try:
            return self._tok.encode(text, add_special_tokens=False).ids
        finally:
            self._tok.encode_special_tokens = False

    def encode_batch(self, texts: Sequence[str], allow_special: bool = True) -> list[list[int]]:
        # encode_batch_fast (tokenizers >= 0.20) skips offset tracking: about twice as fast.
        fn = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        self._tok.encode_special_tokens = not allow_special
        try:
            return [e.ids for e in fn(list(texts), add_special_tokens=False)]
        finally:
            self._tok.encode_special_tokens = False

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def decode_batch(self, seqs: Sequence[Iterable[int]], skip_special: bool = False) -> list[str]:
        return self._tok.decode_batch(
            [[int(i) for i in s] for s in seqs], skip_special_tokens=skip_special
        )

    def same_as(self, other: "Tokenizer") -> bool:
        """Whether both tokenize identically (the same vocabulary, merges and specials)."""
        return self._tok.to_str() == other._tok.to_str()

    # ---- ids ----------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def special_ids(self) -> dict[str, int]:
        return dict(SPECIAL_IDS)

    @property
    def eos_id(self) -> int:
        return SPECIAL_IDS["eos"]

    @property
    def mask_id(self) -> int:
        return SPECIAL_IDS["mask"]

    @property
    def pad_id(self) -> int:
        return SPECIAL_IDS["pad"]

    @property
    def fim_prefix_id(self) -> int:
        return SPECIAL_IDS["fim_prefix"]

    @property
    def fim_suffix_id(self) -> int:
        return SPECIAL_IDS["fim_suffix"]

    @property
    def fim_middle_id(self) -> int:
        return SPECIAL_IDS["fim_middle"]

    @property
    def end_id(self) -> int:
        return SPECIAL_IDS["end"]

    # ---- chat ---------------------------------------------------------------------------
    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the chat template, with every message's content encoded as plain text."""
        self.apply_chat_template(messages, add_generation_prompt)  # validates
        ids: list[int] = []
        newline = self.encode("\n")
        for m in messages:
            ids += [SPECIAL_IDS[m["role"]], *newline, *self.encode(m["content"], allow_special=False),
                    SPECIAL_IDS["end"], *newline]
        if add_generation_prompt:
            ids += [SPECIAL_IDS["assistant"], *newline]
        return ids

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """`<|role|>\\n{content}<|end|>\\n` per message, then `<|assistant|>\\n` to prompt a reply."""
        parts = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise UserError(f"messages[{i}]: expected an object with 'role' and 'content'")
            role, content = m.get("role"), m.get("content")
            if role not in CHAT_ROLES:
                raise UserError(
                    f"messages[{i}].role: {role!r} is not a valid role; use one of "
                    f"{', '.join(CHAT_ROLES)}"
                )
            if not isinstance(content, str):
                raise UserError(f"messages[{i}].content: expected a string, got {type(content).__name__}")
            parts.append(f"{SPECIAL_TOKENS[role]}\n{content}{SPECIAL_TOKENS['end']}\n")
        if add_generation_prompt:
            parts.append(f"{SPECIAL_TOKENS['assistant']}\n")
        return "".join(parts)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, source={self.source!r})"


def _new_hf() -> _HFTokenizer:
    tok = _HFTokenizer(models.BPE())
    # use_regex keeps GPT-2 style word boundaries; add_prefix_space=False so nothing is inserted.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE; the same texts in the same order give the same tokenizer."""
    if vocab_size < MIN_VOCAB:
        raise UserError(
            f"vocab_size={vocab_size} is too small; it must be at least {MIN_VOCAB} "
            "(special tokens + 256 bytes)"
        )
    if vocab_size > 2**32 - 1:
        raise UserError(f"vocab_size={vocab_size} is too large; keep it below 2**32")
    hf = _new_hf()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(hf, source="<trained>")


def _split_path(corpus_dir: str | os.PathLike, split: str) -> Path:
    path = Path(corpus_dir) / "text" / f"{split}.jsonl"
    if not path.is_file():
        raise UserError(
            f"{path}: not found; build the corpus first with `unmask data build --out {corpus_dir}`"
        )
    return path


def iter_split_texts(corpus_dir: str | os.PathLike, split: str = "train") -> Iterable[str]:
    """The documents of one split of a built corpus, exactly as they are tokenized for training."""
    from ..data.shards import document_text  # lazy: data imports this package

    path = _split_path(corpus_dir, split)
    return _iter_docs(path, corpus_dir, document_text)


def _iter_docs(path: Path, corpus_dir, document_text) -> Iterable[str]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            try:
                rec = json.loads(line)
                yield document_text(rec["package"], rec["path"], rec["text"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(
                    f"{path}:{lineno}: not a JSON object with package, path and text; the corpus "
                    f"is corrupt, rebuild it with `unmask data build --out {corpus_dir}`"
                ) from None


def train_from_corpus(
    corpus_dir: str | os.PathLike, out_dir: str | os.PathLike, vocab_size: int = 8192
) -> Path:
    """Train on the train split of a built corpus and write `out_dir/tokenizer.json`."""
    texts = iter_split_texts(corpus_dir, "train")  # raises now if the split is missing
    tok = train_tokenizer(texts, vocab_size)
    out = Path(out_dir) / "tokenizer.json"
    tok.save(out)
    return out
