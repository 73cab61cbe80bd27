"""The tokenizer files `unmask convert` writes: tokenizer.json, and tokenizer_config.json with the
special tokens and the chat template, where the target family's loader and transformers look."""
from __future__ import annotations

import json
from pathlib import Path

from ..config import ModelConfig, atomic_write_text
from ..errors import UserError
from .target import UNMASK


def our_chat_template() -> str:
    """Our tokenizer's chat format (`Tokenizer.apply_chat_template`) as a Hugging Face Jinja template."""
    from ..tokenizer import CHAT_ROLES, SPECIAL_TOKENS

    roles = ", ".join(repr(r) for r in CHAT_ROLES)
    end = SPECIAL_TOKENS["end"]
    return ("{%- for message in messages -%}"
            f"{{%- if message['role'] not in [{roles}] -%}}"
            "{{- raise_exception('unknown role ' + message['role'] + ': use system, user or assistant') -}}"
            "{%- endif -%}"
            f"{{{{- '<|' + message['role'] + '|>\\n' + message['content'] + '{end}\\n' -}}}}"
            "{%- endfor -%}"
            f"{{%- if add_generation_prompt -%}}{{{{- '{SPECIAL_TOKENS['assistant']}\\n' -}}}}{{%- endif -%}}")


def our_tokenizer_config(max_seq_len: int) -> dict:
    """tokenizer_config.json for our byte-level BPE (special ids 0..9, no BOS)."""
    from ..tokenizer import SPECIAL_TOKENS

    named = {"eos", "mask", "pad"}
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": SPECIAL_TOKENS["eos"],
        "pad_token": SPECIAL_TOKENS["pad"],
        "mask_token": SPECIAL_TOKENS["mask"],
        "additional_special_tokens": [t for k, t in SPECIAL_TOKENS.items() if k not in named],
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_seq_len,
        "chat_template": our_chat_template(),
    }


def write_tokenizer(tok, out: Path, cfg: ModelConfig, spec) -> None:
    """tokenizer.json plus tokenizer_config.json (special tokens, chat template) where `spec`'s
    loader and transformers look."""
    from ..tokenizer import Tokenizer, find_chat_template

    tok.save(out / "tokenizer.json")
    if isinstance(tok, Tokenizer):
        atomic_write_text(out / "tokenizer_config.json", json.dumps(our_tokenizer_config(cfg.max_seq_len), indent=2)
                          + "\n")
        return
    # A foreign tokenizer's own files are written verbatim by `save`; fill in what is missing.
    tc_file = out / "tokenizer_config.json"
    tc = json.loads(tc_file.read_text(encoding="utf-8")) if tc_file.is_file() else None
    changed = tc is None
    if tc is None:
        tc = {"tokenizer_class": "PreTrainedTokenizerFast"}
        for key, i in (("eos_token", cfg.eos_token_id), ("pad_token", cfg.pad_token_id),
                       ("mask_token", cfg.mask_token_id), ("bos_token", getattr(tok, "bos_id", None))):
            if i is not None and tok.token_of(i) is not None:
                tc[key] = tok.token_of(i)
    template = getattr(tok, "chat_template", None)
    found = find_chat_template(out, tc) if spec.name == UNMASK else spec.chat_template(out)
    if template is not None and found is None:
        first = spec.chat_template_files[0] if spec.chat_template_files else "tokenizer_config.json"
        if first.endswith(".jinja"):
            atomic_write_text(out / first, template.source)
        else:
            tc["chat_template"] = template.source
            changed = True
    if changed:
        atomic_write_text(tc_file, json.dumps(tc, indent=2, ensure_ascii=False) + "\n")


def tokenizer_notes(out: Path, to: str) -> list[str]:
    """transformers 5 reads a qwen2 directory's tokenizer as Qwen2's, whatever tokenizer.json says: its
    vocabulary and merges with Qwen2's own pre-tokenizer (and NFC)."""
    if to != "qwen2":
        return []
    from ..families.gguf.tokenizer import detect_pre

    try:
        pre = detect_pre(json.loads((out / "tokenizer.json").read_text(encoding="utf-8")), out / "tokenizer.json")
    except (UserError, ValueError):
        pre = None
    if pre == "qwen2":
        return []
    return ["transformers 5 reads a 'qwen2' directory's tokenizer with Qwen2's pre-tokenizer, not this one's: "
            "its AutoTokenizer would split text differently (the weights are unaffected); llama and qwen3 "
            "directories keep tokenizer.json as it is"]

