"""Foreign tokenizers: any Hugging Face `tokenizer.json`, behind the interface of our `Tokenizer`.

`HFTokenizer` lets the engine, prompt healing, prompt layout, fine-tuning data and the server run a
checkpoint of another family (LLaDA, Dream, SDAR, ...) with its own tokenizer. It mirrors
`unmask.tokenizer.Tokenizer` method for method; the differences are that the special ids are not
fixed (they come from the model's config, see `from_dir`), that FIM, end-of-turn and BOS ids may be
None, and that chats are rendered with the checkpoint's Jinja chat template (`chat_template.py`).

Control tokens. `encode(text, allow_special=False)` encodes *control tokens* as plain text, and
`decode(ids, skip_special=True)` drops *special ids*:
- control tokens: the added tokens marked special, the added tokens that hold one of our named
  ids (Qwen's `<|fim_prefix|>` is not marked special, but a prompt must not smuggle it in), and the
  added tokens the chat template writes literally (`<think>`, `<tool_call>`, ...; whitespace-only
  ones excepted), so user text can never pose as template markup;
- special ids: the added tokens marked special, EOS, the mask, and the other named ids that are
  added tokens (a config may pad with an ordinary token). Tokens like `<think>` stay in decoded
  text (as `transformers` keeps them), so a reasoning model's output keeps its structure.

Decoding is exact at any cut: a byte-level BPE id sequence that ends inside a UTF-8 character
decodes with one U+FFFD for the incomplete character, exactly as `bytes.decode("utf-8",
"replace")` does on the tokens' bytes, which is what the engine holds back while streaming.
"""
from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken
from tokenizers import Tokenizer as _RustTokenizer

from ..errors import UserError
from ..fsutil import atomic_write_text
from .chat_template import (MARK_END, MARK_START, ChatTemplate, control_pattern, find_chat_template,
                            has_control, mark_control_tokens, plain_data, prepare_messages)
from .hf_ids import GENERATION_FILE, NAMED_TOKENS, SIDECAR_FILES, read_json, resolve_ids
from .vocab import VocabLookup

TOKENIZER_FILE = "tokenizer.json"


def _parse(text: str, source: str) -> _RustTokenizer:
    try:
        return _RustTokenizer.from_str(text)
    except Exception as e:  # tokenizers raises plain Exception for any parse error
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{source}: not a valid tokenizer.json ({msg}); the file is corrupt, "
                        "re-copy it from the checkpoint") from None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read it ({e}); the file is corrupt, re-copy it") from None


class HFTokenizer(VocabLookup):
    """A Hugging Face fast tokenizer with the public interface of unmask's `Tokenizer`."""

    def __init__(self, tokenizer_json: str, *, mask_id: int, eos_id: int, pad_id: int,
                 bos_id: int | None = None, end_id: int | None = None,
                 fim_ids: tuple[int, int, int] | None = None, extra_stop_ids: Iterable[int] = (),
                 chat_template: ChatTemplate | None = None,
                 template_tokens: Mapping[str, str] | None = None,
                 files: Mapping[str, str] | None = None, source: str = "<memory>",
                 parsed: _RustTokenizer | None = None):
        """Prefer `from_dir`, which resolves and checks the ids. `tokenizer_json`: the text of
        tokenizer.json (`parsed`: the same, already parsed); `template_tokens`: the named
        special-token strings the chat template sees (`bos_token`, ...); `files`: the other
        tokenizer files, written back verbatim by `save`."""
        self.source = source
        self._json = tokenizer_json
        self._tok = parsed if parsed is not None else _parse(tokenizer_json, source)
        self.chat_template = chat_template
        self._template_tokens = dict(template_tokens or {})
        self._files = dict(files or {})
        self._vocab_size = self._count_ids()
        fim = fim_ids or (None, None, None)
        self._ids: dict[str, int | None] = {
            "eos": eos_id, "mask": mask_id, "pad": pad_id, "fim_prefix": fim[0],
            "fim_suffix": fim[1], "fim_middle": fim[2], "end": end_id, "bos": bos_id}
        for name, i in self._ids.items():
            if i is not None and not 0 <= i < self._vocab_size:
                raise UserError(f"{source}: {name} id {i} is outside the tokenizer's "
                                f"{self._vocab_size} ids; pass an id the tokenizer has")
        added = self._tok.get_added_tokens_decoder()
        # A config may pad with an ordinary token: only added tokens count, besides EOS and mask.
        named = {i for i in self._ids.values() if i in added} | {eos_id, mask_id}
        self._skip = frozenset(named | {i for i, t in added.items() if t.special})
        literal = "\0".join(chat_template.literals()) if chat_template is not None else ""
        control = {i: t.content for i, t in added.items()
                   if t.content and (t.special or i in named
                                     or (not t.content.isspace() and t.content in literal))}
        self._control_ids = {content: i for i, content in control.items()}
        self._control_re = control_pattern(control.values())
        alt = self._control_re.pattern if self._control_re is not None else "(?!)"
        self._marked_re = re.compile(f"{MARK_START}(?P<marked>{alt}){MARK_END}"
                                     f"|(?P<lone>[{MARK_START}{MARK_END}])|(?P<ctl>{alt})")
        self._plain = self._plain_tokenizer(set(control))
        stops = {eos_id} | ({end_id} if end_id is not None else set())
        self._stop_ids = frozenset(stops | {int(i) for i in extra_stop_ids
                                            if 0 <= int(i) < self._vocab_size})

    def _plain_tokenizer(self, control_ids: set[int]) -> _RustTokenizer:
        """A copy whose control tokens are all marked special and always split into plain text."""
        plain = _parse(self._json, self.source)
        added = plain.get_added_tokens_decoder()
        plain.add_special_tokens([  # re-adding an added token only changes its flags
            AddedToken(t.content, single_word=t.single_word, lstrip=t.lstrip, rstrip=t.rstrip,
                       normalized=t.normalized, special=True)
            for i, t in added.items() if i in control_ids and not t.special])
        plain.encode_special_tokens = True
        return plain

    def _count_ids(self) -> int:
        """Highest id + 1, counting added tokens (get_vocab_size is a count, blind to gaps)."""
        n = self._tok.get_vocab_size(with_added_tokens=False)
        if n and self._tok.id_to_token(n - 1) is None:  # a gap in the model's ids: look at all
            n = max(self._tok.get_vocab(with_added_tokens=False).values(), default=-1) + 1
        return max([n, *(i + 1 for i in self._tok.get_added_tokens_decoder())])

    # ---- loading and saving -------------------------------------------------------------
    @classmethod
    def from_dir(cls, path: str | os.PathLike, *, mask_id: int | None = None,
                 eos_id: int | None = None, pad_id: int | None = None, bos_id: int | None = None,
                 end_token: str | None = None) -> "HFTokenizer":
        """Load a checkpoint directory's tokenizer.json, tokenizer_config.json,
        special_tokens_map.json, chat template and generation_config.json (its `eos_token_id`s
        join `stop_ids`). The ids are the model config's (authoritative); see `hf_ids.resolve_ids`
        for how each is checked against the tokenizer files and what a missing one defaults to.
        `end_token`: the end-of-turn token, when it is not one of the usual ones."""
        directory = Path(path)
        if directory.name == TOKENIZER_FILE and directory.is_file():
            directory = directory.parent
        tj = directory / TOKENIZER_FILE
        try:
            text = tj.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UserError(
                f"{tj}: not found; unmask reads Hugging Face tokenizers from tokenizer.json only "
                "(convert a vocab.json/merges.txt or tokenizer.model one with transformers: "
                "AutoTokenizer.from_pretrained(dir).save_pretrained(dir))") from None
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{tj}: cannot read the tokenizer ({e}); the file is corrupt") from None
        hf = _parse(text, str(tj))
        ids, declared = resolve_ids(hf, directory, mask_id=mask_id, eos_id=eos_id, pad_id=pad_id,
                                    bos_id=bos_id, end_token=end_token)
        template = find_chat_template(directory, read_json(directory / "tokenizer_config.json"))
        files = {name: _read_text(directory / name) for name in SIDECAR_FILES
                 if (directory / name).is_file()}
        gen = read_json(directory / GENERATION_FILE) or {}
        stops = gen.get("eos_token_id")
        stops = stops if isinstance(stops, list) else [stops]
        return cls(text, **ids, extra_stop_ids=[i for i in stops if type(i) is int],
                   chat_template=template,
                   template_tokens={k: v for k, v in declared.items() if k in NAMED_TOKENS},
                   files=files, source=str(directory), parsed=hf)

    def to_str(self) -> str:
        """The text of tokenizer.json, as it was read."""
        return self._json

    def save(self, path: str | os.PathLike) -> None:
        """Write tokenizer.json atomically (a directory gets `tokenizer.json` inside it), and the
        other tokenizer files it was loaded with (tokenizer_config.json, special_tokens_map.json,
        chat template) next to it, verbatim."""
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        atomic_write_text(path, self._json)
        for name, text in self._files.items():
            atomic_write_text(path.parent / name, text)

    def sha256(self) -> str:
        """The SHA-256 of tokenizer.json's text (that of the file `save` writes)."""
        return hashlib.sha256(self._json.encode("utf-8")).hexdigest()

    def same_as(self, other: Any) -> bool:
        """Whether both tokenize identically (the same tokenizer.json)."""
        return self.to_str() == other.to_str()

    # ---- encoding -----------------------------------------------------------------------
    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """allow_special=False encodes control-token strings in `text` as plain text: use it for
        anything a user typed, so a prompt cannot smuggle in the mask, EOS or FIM tokens."""
        tok = self._tok if allow_special else self._plain
        return tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], allow_special: bool = True) -> list[list[int]]:
        tok = self._tok if allow_special else self._plain
        fn = getattr(tok, "encode_batch_fast", tok.encode_batch)
        return [e.ids for e in fn(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        ids = [int(i) for i in ids]
        if skip_special:
            ids = [i for i in ids if i not in self._skip]
        return self._tok.decode(ids, skip_special_tokens=False)

    def decode_batch(self, seqs: Sequence[Iterable[int]], skip_special: bool = False) -> list[str]:
        seqs = [[int(i) for i in s] for s in seqs]
        if skip_special:
            seqs = [[i for i in s if i not in self._skip] for s in seqs]
        return self._tok.decode_batch(seqs, skip_special_tokens=False)

    # ---- ids ----------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """The tokenizer's size (highest id + 1); a model's embedding may be larger (padded)."""
        return self._vocab_size

    @property
    def special_ids(self) -> dict[str, int]:
        """The named ids this tokenizer has (eos, mask, pad; fim_*, end, bos when present)."""
        return {k: v for k, v in self._ids.items() if v is not None}

    @property
    def eos_id(self) -> int:
        return self._ids["eos"]  # type: ignore[return-value]

    @property
    def mask_id(self) -> int:
        return self._ids["mask"]  # type: ignore[return-value]

    @property
    def pad_id(self) -> int:
        return self._ids["pad"]  # type: ignore[return-value]

    @property
    def fim_prefix_id(self) -> int | None:
        return self._ids["fim_prefix"]

    @property
    def fim_suffix_id(self) -> int | None:
        return self._ids["fim_suffix"]

    @property
    def fim_middle_id(self) -> int | None:
        return self._ids["fim_middle"]

    @property
    def end_id(self) -> int | None:
        """The end-of-turn token (`<|im_end|>`, `<|eot_id|>`, `<|role_end|>`, ...) or None."""
        return self._ids["end"]

    @property
    def bos_id(self) -> int | None:
        return self._ids["bos"]

    @property
    def stop_ids(self) -> frozenset[int]:
        """Where a chat reply ends: EOS, the end-of-turn token, and generation_config.json's
        `eos_token_id`s."""
        return self._stop_ids

    # ---- chat ---------------------------------------------------------------------------
    def _render(self, messages: Any, add_generation_prompt: bool, kwargs: dict[str, Any],
                mark: bool) -> tuple[str, bool]:
        """(the rendered text, whether any user-supplied string holds a control token); with
        `mark`, those tokens are wrapped in markers (see `chat_template.mark_control_tokens`)."""
        if self.chat_template is None:
            raise UserError(f"{self.source}: this tokenizer has no chat template (no "
                            "chat_template.jinja, and no chat_template in tokenizer_config.json); "
                            "send a text prompt instead, or add the model's chat template")
        msgs = prepare_messages(messages)
        tools = plain_data(kwargs.pop("tools", None), "tools")
        documents = plain_data(kwargs.pop("documents", None), "documents")
        extra = plain_data(kwargs, "chat template arguments")
        found = has_control([msgs, tools, documents, extra], self._control_re)
        if mark and found:
            msgs, tools, documents, extra = mark_control_tokens(
                [msgs, tools, documents, extra], self._control_re)  # type: ignore[arg-type]
        text = self.chat_template.render(
            msgs, add_generation_prompt=bool(add_generation_prompt), tools=tools,
            documents=documents, **{**self._template_tokens, **extra})
        return text, found

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            **template_kwargs: Any) -> str:
        """The chat template's text for `messages` (exactly what transformers renders). Encoding
        it with allow_special=True would turn control tokens *inside* messages into real ones:
        use `encode_chat` for ids."""
        return self._render(messages, add_generation_prompt, dict(template_kwargs), mark=False)[0]

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    **template_kwargs: Any) -> list[int]:
        """Token ids of the chat template's text, where only the template itself writes control
        tokens; those inside messages, tools or keyword arguments are encoded as plain text.

        transformers by default parses every special-token string in the rendered text, so a user
        can type `<|im_end|>` to close their turn. Here, when a user-supplied string holds a control
        token, the chat is rendered a second time with each such token wrapped in private-use
        markers, which tells the template's own control tokens from the user's. The text is then
        cut at the template's control tokens and each piece between them is encoded as plain text.
        The cut is made in the unmarked text when both renderings hold the same control tokens in
        the same order (markers can change what string methods such as `lstrip` do), else in the
        marked one, minus its markers (a lone marker, left where the template split a marked token,
        cuts the piece). With no control token in the inputs (the usual case) the ids are exactly
        transformers' `apply_chat_template(..., tokenize=True)`."""
        text, found = self._render(messages, add_generation_prompt, dict(template_kwargs), mark=False)
        if not found:
            return self.encode(text, allow_special=True)
        marked, _ = self._render(messages, add_generation_prompt, dict(template_kwargs), mark=True)
        pieces = self._pieces(marked)
        tokens = [(kind, piece) for kind, piece in pieces if kind in ("user", "template")]
        found = list(self._control_re.finditer(text))  # type: ignore[union-attr]
        if [piece for _, piece in tokens] == [m.group(0) for m in found]:
            pieces, pos = [], 0
            for (kind, _), m in zip(tokens, found):
                pieces += [("text", text[pos:m.start()]), (kind, m.group(0))]
                pos = m.end()
            pieces.append(("text", text[pos:]))
        return self._encode_pieces(pieces)

    def _pieces(self, marked: str) -> list[tuple[str, str]]:
        """A marked rendering as (kind, string) pieces: "text"; "user", a control token from a
        user-supplied string (it was marked); "template", one the template wrote; "cut", a lone
        marker."""
        out: list[tuple[str, str]] = []
        pos = 0
        for m in self._marked_re.finditer(marked):
            out.append(("text", marked[pos:m.start()]))
            pos = m.end()
            if m.group("marked") is not None:
                out.append(("user", m.group("marked")))
            elif m.group("ctl") is not None:
                out.append(("template", m.group("ctl")))
            else:
                out.append(("cut", ""))
        out.append(("text", marked[pos:]))
        return out

    def _encode_pieces(self, pieces: list[tuple[str, str]]) -> list[int]:
        """Template control tokens become their ids; the text between them (user control tokens
        included) is joined and encoded as plain text, separately on each side of a cut."""
        ids: list[int] = []
        buf: list[str] = []

        def flush() -> None:
            text = "".join(buf)
            buf.clear()
            if text:
                ids.extend(self.encode(text, allow_special=False))

        for kind, piece in pieces:
            if kind in ("template", "cut"):
                flush()
                if kind == "template":
                    ids.append(self._control_ids[piece])
            else:
                buf.append(piece)
        flush()
        return ids

    def __repr__(self) -> str:
        return f"HFTokenizer(vocab_size={self.vocab_size}, source={self.source!r})"
