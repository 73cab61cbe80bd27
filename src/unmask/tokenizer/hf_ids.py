"""Which ids a foreign tokenizer's special tokens have, checked against the model's config.

The model's config (mask_token_id, eos_token_id, ...) is authoritative: the weights were trained
with those ids. The tokenizer files name their special tokens too (`tokenizer_config.json` and
`special_tokens_map.json`: `eos_token`, `mask_token`, ...; `added_tokens_decoder`: id -> text), and
a tokenizer copied from another model disagrees with the config. `resolve_ids` settles each id:

- mask, eos: the caller's id; every file that names the token must give it that id, else a
  one-line UserError naming the file, the token, both ids and what to do. Without a caller id:
  the file's token, else a usual name (`<|mask|>`, `<|mdm_mask|>`, `<|MASK|>`, `|<MASK>|`, ...;
  `<|endoftext|>`, `</s>`, ...). The mask must be an added token (plain text could otherwise
  produce it) and differ from eos and pad.
- pad, bos: the caller's id when given (only checked to exist: real families disagree here by
  design, e.g. Fast-dLLM v2's config pads with `<|im_end|>` while its tokenizer names
  `<|endoftext|>`, and Qwen-based configs name a bos their tokenizer never uses); else the files'
  token; pad falls back to eos, bos to None.
- end of turn: `end_token` when given and in the vocabulary, else the first of `<|im_end|>`, `<|eot_id|>`,
  `<|role_end|>`, ... in the vocabulary; None when there is none.
- FIM: `<|fim_prefix|>`, `<|fim_suffix|>`, `<|fim_middle|>` (or `<fim_prefix>`, ...) when all
  three are in the vocabulary (Qwen-based families), else None.
For every id chosen, `tokenizer_config.json`'s `added_tokens_decoder` must agree with
tokenizer.json about its text. `added_tokens.json` (a slow-tokenizer file) is not read.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _RustTokenizer

from ..errors import UserError

CONFIG_FILE = "tokenizer_config.json"
SPECIAL_MAP_FILE = "special_tokens_map.json"
GENERATION_FILE = "generation_config.json"
# The tokenizer files `HFTokenizer.save` writes back verbatim, besides tokenizer.json.
SIDECAR_FILES = (CONFIG_FILE, SPECIAL_MAP_FILE, "chat_template.jinja", "chat_template.json")
# The named special tokens a chat template sees as variables, when the tokenizer sets them.
NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                "mask_token")

MASK_NAMES = ("<|mask|>", "<|mdm_mask|>", "<|MASK|>", "|<MASK>|", "<MASK>", "<mask>", "[MASK]")
EOS_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>")
END_NAMES = ("<|im_end|>", "<|eot_id|>", "<|role_end|>", "<|end|>", "<end_of_turn>",
             "<|end_of_turn|>", "<|eot|>")
FIM_NAMES = (("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),
             ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"))


def read_json(path: Path) -> dict | None:
    """A JSON object file's content; None when the file does not exist."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path}: cannot read it as JSON ({msg}); the file is corrupt, re-copy it "
                        "from the checkpoint") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(data).__name__}; the file is "
                        "corrupt, re-copy it from the checkpoint")
    return data


def token_text(value: Any) -> str | None:
    """A special token as the files write it: a string, or an object with `content`."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


class _Files:
    """The declared special tokens of a directory's tokenizer files."""

    def __init__(self, hf: _RustTokenizer, directory: Path):
        self.hf, self.directory = hf, directory
        self.files = [(name, data) for name in (CONFIG_FILE, SPECIAL_MAP_FILE)
                      if (data := read_json(directory / name)) is not None]
        added = (dict(self.files).get(CONFIG_FILE) or {}).get("added_tokens_decoder")
        self.added: dict = added if isinstance(added, dict) else {}

    def declared(self, key: str) -> dict[str, str]:
        """file name -> the token text it names for `key` (e.g. "eos_token")."""
        return {name: t for name, data in self.files if (t := token_text(data.get(key)))}

    def first(self, key: str) -> str | None:
        return next(iter(self.declared(key).values()), None)

    def id_in_vocab(self, name: str, token: str, key: str) -> int:
        i = self.hf.token_to_id(token)
        if i is None:
            raise UserError(f"{self.directory / name}: {key} {token!r} is not in tokenizer.json's "
                            "vocabulary; the tokenizer files do not belong together, re-copy them "
                            "from the checkpoint")
        return i

    def check(self, key: str, config_key: str, want: int) -> None:
        """Every file naming `key` must give it the id `want` (from the model's config)."""
        for name, token in self.declared(key).items():
            got = self.id_in_vocab(name, token, key)
            if got != want:
                raise UserError(
                    f"{self.directory / name}: {key} {token!r} has id {got} in tokenizer.json but "
                    f"the model config says {config_key}={want}; use the checkpoint's own "
                    f"tokenizer files, or fix {config_key} in config.json")

    def exists(self, config_key: str, i: int) -> None:
        if self.hf.id_to_token(int(i)) is None:
            raise UserError(
                f"{self.directory / 'tokenizer.json'}: the model config says {config_key}={i} but "
                f"the tokenizer has no token with that id; use the checkpoint's own tokenizer.json, "
                f"or fix {config_key} in config.json")

    def agrees(self, config_key: str, i: int) -> None:
        """tokenizer_config.json's added_tokens_decoder must give id `i` tokenizer.json's text."""
        entry = token_text(self.added.get(str(i)))
        actual = self.hf.id_to_token(i)
        if entry is not None and entry != actual:
            raise UserError(
                f"{self.directory / CONFIG_FILE}: added_tokens_decoder names id {i} "
                f"({config_key}) {entry!r} but tokenizer.json has {actual!r}; the tokenizer files "
                "do not belong together, re-copy them from the checkpoint")

    def find(self, names: tuple[str, ...], added_only: bool = False) -> int | None:
        added = self.hf.get_added_tokens_decoder()
        for n in names:
            i = self.hf.token_to_id(n)
            if i is not None and (not added_only or i in added):
                return i
        return None


def resolve_ids(hf: _RustTokenizer, directory: Path, *, mask_id: int | None, eos_id: int | None,
                pad_id: int | None, bos_id: int | None, end_token: str | None
                ) -> tuple[dict[str, Any], dict[str, str]]:
    """(keyword arguments of `HFTokenizer`: mask_id, eos_id, pad_id, bos_id, end_id, fim_ids;
    the named special-token texts the files declare). See the module docstring for the rules."""
    f = _Files(hf, directory)
    where = directory / "tokenizer.json"

    def strict(key: str, config_key: str, given: int | None, names: tuple[str, ...]) -> int:
        if given is not None:
            f.exists(config_key, given)
            f.check(key, config_key, given)
            return int(given)
        for name, token in f.declared(key).items():
            return f.id_in_vocab(name, token, key)
        found = f.find(names, added_only=True)
        if found is None:
            raise UserError(f"{where}: no {key.replace('_', ' ')} found (none named in "
                            f"{CONFIG_FILE} or {SPECIAL_MAP_FILE}, none of {', '.join(names)}); "
                            f"pass {config_key} from the model's config")
        return found

    def lenient(key: str, config_key: str, given: int | None) -> int | None:
        if given is not None:
            f.exists(config_key, given)
            return int(given)
        for name, token in f.declared(key).items():
            return f.id_in_vocab(name, token, key)
        return None

    mask = strict("mask_token", "mask_token_id", mask_id, MASK_NAMES)
    eos = strict("eos_token", "eos_token_id", eos_id, EOS_NAMES)
    pad = lenient("pad_token", "pad_token_id", pad_id)
    pad = eos if pad is None else pad
    bos = lenient("bos_token", "bos_token_id", bos_id)
    if mask not in hf.get_added_tokens_decoder():
        raise UserError(f"{where}: the mask id {mask} is {hf.id_to_token(mask)!r}, an ordinary "
                        "token that plain text can produce; the mask must be an added token, fix "
                        "mask_token_id in config.json")
    for other, key in ((eos, "eos_token_id"), (pad, "pad_token_id")):
        if mask == other:
            raise UserError(f"{where}: the mask id {mask} is also the {key}; a masked-diffusion "
                            f"model needs a mask token of its own, fix {key} in config.json")
    # The family's end-of-turn token when the tokenizer has it (a model converted into another
    # family's layout keeps its own tokenizer), else the first of the usual names.
    end = hf.token_to_id(end_token) if end_token is not None else None
    if end is None:
        end = f.find(END_NAMES)
    fim = None
    for names in FIM_NAMES:
        found = [hf.token_to_id(n) for n in names]
        if all(i is not None for i in found):
            fim = tuple(found)
            break
    for config_key, i in (("mask_token_id", mask), ("eos_token_id", eos), ("pad_token_id", pad),
                          ("bos_token_id", bos), ("end of turn", end)):
        if i is not None:
            f.agrees(config_key, i)
    declared = {key: t for key in NAMED_TOKENS if (t := f.first(key)) is not None}
    return dict(mask_id=mask, eos_id=eos, pad_id=pad, bos_id=bos, end_id=end, fim_ids=fim), declared
