"""GGUF vocabularies: a tokenizer rebuilt from a GGUF file's `tokenizer.*` metadata, and the metadata
written for a byte-level BPE tokenizer.json (`write_gguf`).

Reading: a `tokenizer.json` beside the .gguf wins (checked to hold the GGUF's vocabulary); otherwise
one is rebuilt from the metadata with the `tokenizers` package: `tokenizer.ggml.model` "gpt2"
(byte-level BPE; tokens, token types, merges), CONTROL and USER_DEFINED tokens as added tokens
(special and not), llama.cpp's "[PADn]" filler ids left out, and `tokenizer.ggml.pre` choosing the
pre-tokenizer of the original tokenizer.json:
- `gpt-2`: GPT-2's ByteLevel split (what our own tokenizers and the dLLM fixtures use);
- `llama-bpe` / `llama3` / `llama-v3`: Llama 3's Split regex + ByteLevel, merges ignored for whole-word
  vocabulary hits (`ignore_merges`);
- `qwen2`: NFC normalizer + Qwen2's Split regex + ByteLevel (Qwen2, Qwen2.5, Qwen3, Dream).
These are the pipelines of the original tokenizer.json files (not llama.cpp's regex rewrites); the tests
check them against tokenizer.json files that transformers' own Qwen2 and tiktoken (Llama 3) conversions
build, and our GPT-2 style ones. Any other pre-tokenizer is a UserError asking for the model's
tokenizer.json beside the .gguf (so is a missing one: GGUFs from before `tokenizer.ggml.pre` existed).
The chat template comes from `tokenizer.chat_template`; bos/eos/pad/mask/eot/FIM ids from their
`tokenizer.ggml.*_token_id` keys.
"""
from __future__ import annotations

import json
from pathlib import Path

from ...config import ModelConfig
from ...errors import UserError
from ...tokenizer.hf_ids import END_NAMES, FIM_NAMES
from ..spec import FamilySpec

# token types (llama.cpp's LLAMA_TOKEN_TYPE_*)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# The original pre-tokenizer patterns of the Llama 3 and Qwen2 tokenizer.json files.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = ("gpt-2", "llama-bpe", "llama3", "llama-v3", "qwen2")


def special_id(meta: dict, key: str) -> int | None:
    """The id a `tokenizer.ggml.{key}` metadata key names, or None."""
    v = meta.get(f"tokenizer.ggml.{key}")
    return int(v) if isinstance(v, int) else None


def added_tokens(meta: dict) -> dict[int, tuple[str, bool]]:
    """{id: (text, special)} of the CONTROL, USER_DEFINED and UNKNOWN tokens."""
    tokens = meta.get("tokenizer.ggml.tokens") or []
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    return {i: (t, ty == CONTROL) for i, (t, ty) in enumerate(zip(tokens, types))
            if ty in (CONTROL, USER_DEFINED, UNKNOWN)}


# ---- reading ---------------------------------------------------------------------------------------
def _pre_tokenizer(pre: str):
    """(normalizer, pre-tokenizer, ignore_merges) of the original tokenizer.json for `pre`."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    if pre == "gpt-2":
        return None, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), False
    if pre in ("llama-bpe", "llama3", "llama-v3"):
        return None, pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]), True
    if pre == "qwen2":
        return normalizers.NFC(), pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]), False
    return None


def tokenizer_json(meta: dict, file: Path) -> str:
    """tokenizer.json text rebuilt from a GGUF file's `tokenizer.*` metadata (module docstring)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    model = meta.get("tokenizer.ggml.model")
    beside = "; or put the model's tokenizer.json beside the .gguf"
    if model != "gpt2":
        raise UserError(f"{file}: tokenizer.ggml.model {model!r} cannot be rebuilt (only 'gpt2', byte-level BPE)"
                        f"{beside}")
    pre = meta.get("tokenizer.ggml.pre") or "default"
    parts = _pre_tokenizer(pre)
    if parts is None:
        raise UserError(f"{file}: tokenizer.ggml.pre {pre!r} cannot be rebuilt exactly (supported: "
                        f"{', '.join(PRE_TOKENIZERS)}){beside}")
    normalizer, pre_tok, ignore_merges = parts
    tokens = meta.get("tokenizer.ggml.tokens")
    merges = meta.get("tokenizer.ggml.merges")
    if not tokens or merges is None:
        raise UserError(f"{file}: no tokenizer.ggml.tokens or tokenizer.ggml.merges; the file has no vocabulary"
                        f"{beside}")
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise UserError(f"{file}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens; "
                        "the file is corrupt")
    vocab = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if not (ty == UNUSED and t == f"[PAD{i}]")}
    pairs = []
    for entry in merges:
        a, sep, b = entry.partition(" ")
        if not sep or not a or not b or " " in b:
            raise UserError(f"{file}: tokenizer.ggml.merges entry {entry!r} is not 'left right'; the file is corrupt")
        pairs.append((a, b))
    try:
        bpe = models.BPE(vocab=vocab, merges=pairs, ignore_merges=ignore_merges)
    except Exception as e:  # tokenizers raises plain Exception
        raise UserError(f"{file}: the GGUF vocabulary and merges do not form a BPE ({e}); the file is corrupt") \
            from None
    tok = Tokenizer(bpe)
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tok
    tok.decoder = decoders.ByteLevel()
    for i, (text, special) in sorted(added_tokens(meta).items()):
        added = AddedToken(text, special=special, normalized=False)
        (tok.add_special_tokens if special else tok.add_tokens)([added])
        if tok.token_to_id(text) != i:
            raise UserError(f"{file}: token {text!r} appears twice in tokenizer.ggml.tokens; the file is corrupt")
    return tok.to_str()


def gguf_tokenizer(meta: dict, file: Path, cfg: ModelConfig, spec: FamilySpec):
    """The HFTokenizer of a GGUF file: tokenizer.json beside it, else rebuilt from the metadata."""
    from ...tokenizer import ChatTemplate, HFTokenizer

    tokens = meta.get("tokenizer.ggml.tokens") or []
    if (file.parent / "tokenizer.json").is_file():
        tok = HFTokenizer.from_dir(file.parent, mask_id=cfg.mask_token_id, eos_id=cfg.eos_token_id,
                                   pad_id=cfg.pad_token_id, end_token=spec.end_of_turn)
        types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
        for i, (t, ty) in enumerate(zip(tokens, types)):
            if ty != UNUSED and tok.token_of(i) != t:
                raise UserError(f"{file.parent / 'tokenizer.json'}: token {i} is {tok.token_of(i)!r} but {file.name} "
                                f"has {t!r}; that tokenizer.json belongs to another model, remove it or use the "
                                "model's own")
        return tok
    text = tokenizer_json(meta, file)
    ids = {t: i for i, t in enumerate(tokens)}

    def find(names) -> int | None:
        return next((ids[n] for n in names if n in ids), None)

    end = special_id(meta, "eot_token_id")
    if end is None:
        end = find([spec.end_of_turn] if spec.end_of_turn else END_NAMES)
    fim = tuple(special_id(meta, k) for k in ("fim_pre_token_id", "fim_suf_token_id", "fim_mid_token_id"))
    if None in fim:
        fim = next((tuple(ids[n] for n in names) for names in FIM_NAMES if all(n in ids for n in names)), None)
    bos = special_id(meta, "bos_token_id")
    named = {"bos_token": bos, "eos_token": cfg.eos_token_id, "unk_token": special_id(meta, "unknown_token_id"),
             "pad_token": special_id(meta, "padding_token_id")}
    template_tokens = {k: tokens[i] for k, i in named.items() if i is not None and 0 <= i < len(tokens)}
    tpl = meta.get("tokenizer.chat_template")
    tpl = tpl if isinstance(tpl, str) and tpl else None
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", **template_tokens,
                  **({"chat_template": tpl} if tpl else {})}
    stops = [i for i in (special_id(meta, "eot_token_id"), special_id(meta, "eom_token_id")) if i is not None]
    return HFTokenizer(text, mask_id=cfg.mask_token_id, eos_id=cfg.eos_token_id, pad_id=cfg.pad_token_id,
                       bos_id=bos, end_id=end, fim_ids=fim, extra_stop_ids=stops,
                       chat_template=ChatTemplate(tpl, f"{file} (tokenizer.chat_template)") if tpl else None,
                       template_tokens=template_tokens,
                       files={"tokenizer_config.json": json.dumps(tok_config, indent=2) + "\n"}, source=str(file))


# ---- writing ---------------------------------------------------------------------------------------
def detect_pre(tj: dict, source: Path) -> str:
    """The tokenizer.ggml.pre name of a tokenizer.json whose pipeline is one we rebuild exactly."""
    pre, norm = tj.get("pre_tokenizer") or {}, tj.get("normalizer")
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space") \
            and norm is None:
        return "gpt-2"
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if steps and len(steps) == 2 and steps[0].get("type") == "Split" and steps[1].get("type") == "ByteLevel" \
            and not steps[1].get("use_regex") and not steps[1].get("add_prefix_space"):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        if regex == _LLAMA3_SPLIT and norm is None:
            return "llama-bpe"
        if regex == _QWEN2_SPLIT and (norm or {}).get("type") == "NFC":
            return "qwen2"
    raise UserError(f"{source}: its pre-tokenizer is none that a GGUF file can name exactly (supported: GPT-2 "
                    "ByteLevel, Llama 3, Qwen2)")


def vocab_metadata(src: Path, vocab_size: int) -> dict:
    """The GGUF vocabulary of the checkpoint directory `src`'s tokenizer.json (pre-tokenizer name, tokens
    and their types padded to `vocab_size`, merges, bos id)."""
    from tokenizers import Tokenizer

    tj_file = src / "tokenizer.json"
    try:
        tj = json.loads(tj_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{tj_file}: cannot read it ({e})") from None
    if (tj.get("model") or {}).get("type") != "BPE":
        raise UserError(f"{tj_file}: only byte-level BPE tokenizers can be written to GGUF")
    tok = Tokenizer.from_str(json.dumps(tj))
    added = tok.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(vocab_size):
        text = tok.id_to_token(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        else:
            tokens.append(text)
            types.append((CONTROL if added[i].special else USER_DEFINED) if i in added else NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"].get("merges", [])]
    bos = None
    tc = src / "tokenizer_config.json"
    if tc.is_file():
        b = json.loads(tc.read_text(encoding="utf-8")).get("bos_token")
        b = b.get("content") if isinstance(b, dict) else b
        bos = tok.token_to_id(b) if isinstance(b, str) else None
    return {"pre": detect_pre(tj, tj_file), "tokens": tokens, "types": types, "merges": merges, "bos": bos}
