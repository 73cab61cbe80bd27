"""Token <-> id lookups that our `Tokenizer` and `HFTokenizer` share: both wrap a `tokenizers.Tokenizer`
as `self._tok` and define `decode_batch` and `vocab_size`."""
from __future__ import annotations


class VocabLookup:
    """`token_texts`, `id_of` and `token_of` over `self._tok`."""

    def token_texts(self) -> list[str]:
        """Each id's own text, in id order; special ids (and ids without a token) are empty."""
        return self.decode_batch([[i] for i in range(self.vocab_size)], skip_special=True)

    def id_of(self, token: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise KeyError(f"token {token!r} is not in the vocabulary")
        return i

    def token_of(self, i: int) -> str | None:
        return self._tok.id_to_token(int(i))
