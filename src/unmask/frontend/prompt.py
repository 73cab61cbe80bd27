"""From what the user gave (text, token ids or a chat, plus an optional suffix) to the fixed parts of
the canvas: the tokens before the generated region (`head`) and after it (`tail`)."""
from __future__ import annotations

import operator
from collections.abc import Sequence

from ..errors import UserError

PROMPT_KINDS = "a string, a list of token ids, or a chat (a list of {'role', 'content'} objects)"


def is_chat(prompt) -> bool:
    return isinstance(prompt, (list, tuple)) and len(prompt) > 0 and all(isinstance(m, dict) for m in prompt)


def encode_prompt(tokenizer, prompt: str | Sequence[int] | Sequence[dict], vocab_size: int,
                  template_kwargs: dict | None = None) -> list[int]:
    """Token ids of a prompt. A chat is rendered with the tokenizer's chat template first
    (template_kwargs, such as `tools`, go to a Hugging Face template)."""
    if isinstance(prompt, str):
        return list(tokenizer.encode(prompt, allow_special=False))
    if is_chat(prompt):
        if template_kwargs:
            return list(tokenizer.encode_chat(list(prompt), **template_kwargs))
        return list(tokenizer.encode_chat(list(prompt)))
    if isinstance(prompt, (list, tuple)):
        try:
            ids = [operator.index(t) for t in prompt]
        except TypeError:
            raise UserError(f"prompt must be {PROMPT_KINDS}; got a list with other items") from None
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise UserError(f"prompt token id {bad[0]} is outside the vocabulary of {vocab_size}")
        return ids
    raise UserError(f"prompt must be {PROMPT_KINDS}; got {type(prompt).__name__}")


def layout_prompt(model, prompt, suffix: str | None = None,
                  template_kwargs: dict | None = None) -> tuple[list[int], list[int]]:
    """(head, tail): the canvas is head + [MASK] * max_tokens + tail.

    Without a suffix the tail is empty. With one (fill-in-the-middle), a full-attention model sees it
    natively after the masks; block and causal models cannot look ahead, so the head is the layout
    the model was trained on (its generation config's `fim_layout`), and they generate the middle:
    PSM `<|fim_prefix|> prefix <|fim_suffix|> suffix <|fim_middle|>` or SPM
    `<|fim_suffix|> suffix <|fim_prefix|> prefix`.
    """
    tok = model.tokenizer
    if suffix is not None and is_chat(prompt):
        raise UserError("suffix (fill-in-the-middle) needs a text or token-id prompt, not a chat")
    head = encode_prompt(tok, prompt, model.config.vocab_size, template_kwargs)
    if suffix is None:
        return head, []
    if not isinstance(suffix, str):
        raise UserError(f"suffix must be a string, got {type(suffix).__name__}")
    tail = list(tok.encode(suffix, allow_special=False))
    if model.config.attention == "full":
        return head, tail
    if not has_fim(tok):
        raise UserError("suffix (fill-in-the-middle) needs a model that sees the suffix (full attention) or has "
                        "fill-in-the-middle tokens; this model's tokenizer has no <|fim_prefix|>/<|fim_suffix|>/"
                        "<|fim_middle|>")
    return fim_layout(model, head, tail), []


def has_fim(tokenizer) -> bool:
    return None not in (tokenizer.fim_prefix_id, tokenizer.fim_suffix_id, tokenizer.fim_middle_id)


def fim_layout(model, head: list[int], tail: list[int]) -> list[int]:
    """The prompt a block or causal model fills a middle after: its generation config's layout."""
    tok = model.tokenizer
    if model.generation.fim_layout == "spm":
        return [tok.fim_suffix_id, *tail, tok.fim_prefix_id, *head]
    return [tok.fim_prefix_id, *head, tok.fim_suffix_id, *tail, tok.fim_middle_id]
