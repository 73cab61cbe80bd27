"""Plain autoregressive Hugging Face families: Llama (`LlamaForCausalLM`), Qwen2 (`Qwen2ForCausalLM`)
and Qwen3 (`Qwen3ForCausalLM`). Causal attention, the AR objective, and the Qwen tensor names
(`model.embed_tokens`, `model.layers.{i}.self_attn.{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj`,
`input_layernorm`, `post_attention_layernorm`, `model.norm`, `lm_head`).

- Llama: no biases (`attention_bias` / `mlp_bias` true are refused: our network has no o-proj or MLP
  bias), `head_dim` defaults to hidden_size / heads. `rope_scaling` of type `llama3` (Llama 3.1+)
  is read like linear, dynamic and YaRN (model/rope.py).
- Qwen2: q/k/v biases, always present (the modeling code hard-codes them), no o-proj bias.
- Qwen3: per-head q/k RMSNorm before RoPE, no biases (`attention_bias` true is refused), `head_dim`
  defaults to 128 (Qwen3Config's default, not hidden_size / heads).
Both the legacy `rope_theta` / `rope_scaling` keys and transformers 5's `rope_parameters` are read;
`config_to_hf` writes the legacy keys, which transformers 4.x and 5.x both read. The ModelConfig has
attention "causal", objective "ar", `logit_shift` 1 (position i predicts token i + 1, as the decoders
treat every causal model) and a fixed `block_size` (unused by causal decoding).

The [MASK] id of a causal model. `ModelConfig` needs a mask id, an AR model never sees one: the
engine only uses it to mark positions not generated yet, and it is never proposed (its logit is
suppressed). It is therefore a placeholder that must be a token the model does not need to emit,
and (for `HFTokenizer`) an added token other than EOS and pad. It is, in order: config.json's
`mask_token_id` (`config_to_hf` writes it, so our own converted models round-trip exactly); the
tokenizer files' `mask_token`; an added token with a usual mask name (`<|mask|>`, ...); an added
placeholder token (`<|reserved_special_token_N|>`, `<unused..>`, `<unk>`, `<|fim_pad|>`, ... -
reserved/unused first, then unk, then pad-like names that are not the pad); else the highest-id
special added token that is not BOS, EOS, pad, an end-of-turn or FIM token and that the chat
template does not write. Without any: a UserError asking for `mask_token_id` in config.json.

Our own AR models may have `token_shift` (`prev_embed` / `gap_embed`: embeddings only [MASK] inputs
receive). An AR model never sees [MASK], so they change nothing: `state_to_hf` drops them (a converted
model computes exactly the same function on every input without the mask token).
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch

from ..config import ModelConfig
from ..errors import UserError
from ..tokenizer.hf_ids import END_NAMES, FIM_NAMES, MASK_NAMES
from .qwen import NAMES
from .spec import (FamilySpec, attention_fields, first_id, model_config, need, read_json, rope_scaling_from_hf,
                   rope_scaling_to_hf, token_id, tokenizer_token, unsupported)

CAUSAL_BLOCK_SIZE = 32  # unused by causal decoding (one token per step); a fixed value keeps round trips exact
_INERT = ("prev_embed.weight", "gap_embed.weight")  # token_shift tables: only [MASK] inputs use them

# ---- the placeholder [MASK] of a causal model ------------------------------------------------------
_RESERVED = re.compile(r"reserved|unused", re.I)
_PADLIKE = re.compile(r"pad", re.I)


def placeholder_mask_id(added: Mapping[int, tuple[str, bool]], exclude: set[int],
                        template: str | None = None) -> int | None:
    """The id to use as a causal model's [MASK] among the tokenizer's added tokens
    (`added`: id -> (text, special)), never one of `exclude`; None if none fits (module docstring)."""
    banned = set(END_NAMES) | {t for names in FIM_NAMES for t in names if not _PADLIKE.search(t)}
    ok = {i: text for i, (text, _) in added.items() if i not in exclude and text not in banned}
    for name in MASK_NAMES:
        for i, text in sorted(ok.items()):
            if text == name:
                return i
    for rule in (lambda t: _RESERVED.search(t), lambda t: t == "<unk>", lambda t: _PADLIKE.search(t)):
        hits = [i for i, text in sorted(ok.items()) if rule(text)]
        if hits:
            return hits[0]
    template = template or ""
    special = [i for i, text in ok.items() if added[i][1] and text and text not in template]
    return max(special) if special else None


def _added_tokens(path: Path) -> dict[int, tuple[str, bool]]:
    table: dict[int, tuple[str, bool]] = {}
    tj = path / "tokenizer.json"
    if tj.exists():
        for t in read_json(tj).get("added_tokens") or []:
            if isinstance(t, dict) and isinstance(t.get("id"), int) and isinstance(t.get("content"), str):
                table.setdefault(t["id"], (t["content"], bool(t.get("special"))))
    tc = path / "tokenizer_config.json"
    if tc.exists():
        for i, t in (read_json(tc).get("added_tokens_decoder") or {}).items():
            if isinstance(t, dict) and str(i).isdigit() and isinstance(t.get("content"), str):
                table.setdefault(int(i), (t["content"], bool(t.get("special"))))
    return table


def _template_text(path: Path) -> str:
    f = path / "chat_template.jinja"
    if f.exists():
        return f.read_text(encoding="utf-8", errors="replace")
    tc = path / "tokenizer_config.json"
    tpl = read_json(tc).get("chat_template") if tc.exists() else None
    if isinstance(tpl, list):
        tpl = " ".join(str(t.get("template", "")) for t in tpl if isinstance(t, dict))
    return tpl if isinstance(tpl, str) else ""


def causal_special_ids(raw: dict, path: Path) -> dict[str, int]:
    """mask/eos/pad ids of a causal checkpoint (config.json, then the tokenizer files)."""
    def from_tokenizer(key: str) -> int | None:
        text = tokenizer_token(path, key)
        return token_id(path, text) if text else None

    eos = first_id(raw.get("eos_token_id"))
    eos = from_tokenizer("eos_token") if eos is None else eos
    if eos is None:
        raise UserError(f"{path / 'config.json'}: no eos_token_id, and the tokenizer files name no eos_token; "
                        "set eos_token_id in config.json")
    pad = first_id(raw.get("pad_token_id"))
    pad = from_tokenizer("pad_token") if pad is None else pad
    pad = eos if pad is None else pad
    mask = first_id(raw.get("mask_token_id"))
    if mask is None:
        mask = from_tokenizer("mask_token")
    if mask is None:
        bos = first_id(raw.get("bos_token_id"))
        bos = from_tokenizer("bos_token") if bos is None else bos
        exclude = {i for i in (eos, pad, bos) if i is not None}
        mask = placeholder_mask_id(_added_tokens(path), exclude, _template_text(path))
    if mask is None:
        raise UserError(f"{path / 'config.json'}: this causal model needs a placeholder [MASK] id (never "
                        "generated, see unmask.families.llama) and its tokenizer has no spare added token; "
                        "set mask_token_id in config.json to an added token the model never emits")
    return {"mask_token_id": mask, "eos_token_id": eos, "pad_token_id": pad}


# ---- config.json -----------------------------------------------------------------------------------
def _rope(raw: dict, path: Path, max_pos: int) -> tuple[float, object]:
    """(rope_theta, RopeScaling or None) from the legacy keys or transformers 5's rope_parameters."""
    params = raw.get("rope_parameters") if isinstance(raw.get("rope_parameters"), dict) else {}
    if "full_attention" in params and isinstance(params["full_attention"], dict):
        params = params["full_attention"]
    theta = raw.get("rope_theta", params.get("rope_theta", 10000.0))
    scaling = raw.get("rope_scaling")
    if not scaling and params.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    return float(theta), rope_scaling_from_hf({"rope_scaling": scaling}, path, max_pos)


def causal_config(raw: dict, path: Path, *, family: str, qkv_bias: bool, qk_norm: bool,
                  default_head_dim: int | None) -> ModelConfig:
    """config.json in Llama/Qwen names -> an AR ModelConfig (attention causal, objective ar)."""
    if raw.get("hidden_act", "silu") != "silu":
        raise unsupported(path, f"hidden_act {raw.get('hidden_act')!r}")
    if raw.get("use_sliding_window"):
        raise unsupported(path, "use_sliding_window: true")
    if raw.get("mlp_bias"):
        raise unsupported(path, "mlp_bias: true (biases on the MLP projections)")
    hidden = need(raw, "hidden_size", path)
    heads = need(raw, "num_attention_heads", path)
    head_dim = raw.get("head_dim") or default_head_dim or hidden // heads
    max_pos = need(raw, "max_position_embeddings", path)
    theta, scaling = _rope(raw, path, max_pos)
    kv = raw.get("num_key_value_heads")
    return model_config({
        "family": family,
        "d_model": hidden,
        "n_layers": need(raw, "num_hidden_layers", path),
        "n_heads": heads,
        "n_kv_heads": None if kv in (None, heads) else kv,
        "head_size": None if head_dim * heads == hidden else head_dim,
        "mlp_hidden": need(raw, "intermediate_size", path),
        "max_seq_len": max_pos,
        "rope_theta": theta,
        "rope_scaling": scaling,
        "norm_eps": raw.get("rms_norm_eps", 1e-6),
        "tie_embeddings": bool(raw.get("tie_word_embeddings", False)),
        "qkv_bias": qkv_bias,
        "qk_norm": qk_norm,
        "block_size": CAUSAL_BLOCK_SIZE,
        "logit_shift": 1,  # position i predicts token i + 1 (decode.model_logit_shift says so for any causal model)
        "vocab_size": need(raw, "vocab_size", path),
        **attention_fields("causal"),
        **causal_special_ids(raw, path),
    }, path)


def _check_writable(cfg: ModelConfig, family: str, *, qkv_bias_ok: bool, needs_qk_norm: bool) -> None:
    """What a `family` config.json can express of `cfg`; a UserError naming what it cannot."""
    def refuse(what: str, hint: str = "") -> UserError:
        return UserError(f"this model has {what}, which a {family!r} checkpoint cannot express{hint}")

    if cfg.attention != "causal":
        raise refuse(f"{cfg.attention!r} attention", "; only causal (AR) models convert to it")
    if cfg.moe is not None:
        raise refuse("mixture-of-experts layers")
    if cfg.rotary_dim is not None and cfg.rotary_dim != cfg.head_dim:
        raise refuse(f"partial RoPE (rotary_dim={cfg.rotary_dim})")
    if cfg.qkv_bias and not qkv_bias_ok:
        raise refuse("q/k/v biases", "; use qwen2")
    if cfg.qk_norm != needs_qk_norm:
        raise refuse("q/k norms" if cfg.qk_norm else "no q/k norms", "; use qwen3" if cfg.qk_norm else "; use llama")


def _config_to_hf(cfg: ModelConfig, model_type: str, architecture: str) -> dict:
    return {
        "architectures": [architecture],
        "model_type": model_type,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.hidden,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": rope_scaling_to_hf(cfg),
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "vocab_size": cfg.vocab_size,
        "bos_token_id": None,  # not part of ModelConfig; the tokenizer files name it
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "mask_token_id": cfg.mask_token_id,  # unmask's placeholder (see the module docstring); others ignore it
        "torch_dtype": "bfloat16",
    }


def _state_to_hf(state: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    return NAMES.state_to_hf({k: v for k, v in state.items() if k not in _INERT}, cfg)


# ---- Llama ---------------------------------------------------------------------------------------
def llama_config_from_hf(raw: dict, path: Path) -> ModelConfig:
    if raw.get("attention_bias"):
        raise unsupported(path, "attention_bias: true (a bias on o_proj)")
    return causal_config(raw, path, family="llama", qkv_bias=False, qk_norm=False, default_head_dim=None)


def llama_config_to_hf(cfg: ModelConfig) -> dict:
    _check_writable(cfg, "llama", qkv_bias_ok=False, needs_qk_norm=False)
    return {**_config_to_hf(cfg, "llama", "LlamaForCausalLM"), "mlp_bias": False}


# ---- Qwen2 ---------------------------------------------------------------------------------------
def qwen2_config_from_hf(raw: dict, path: Path) -> ModelConfig:
    return causal_config(raw, path, family="qwen2", qkv_bias=True, qk_norm=False, default_head_dim=None)


def qwen2_config_to_hf(cfg: ModelConfig) -> dict:
    _check_writable(cfg, "qwen2", qkv_bias_ok=True, needs_qk_norm=False)
    out = _config_to_hf(cfg, "qwen2", "Qwen2ForCausalLM")
    out.pop("attention_bias")  # Qwen2 hard-codes q/k/v biases and has no such field
    return {**out, "use_sliding_window": False}


def qwen2_state_to_hf(state: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Qwen2 always has q/k/v biases: a model without them gets zeros (the same function)."""
    out = _state_to_hf(state, cfg)
    if not cfg.qkv_bias:
        for i in range(cfg.n_layers):
            for p in "qkv":
                w = out[f"model.layers.{i}.self_attn.{p}_proj.weight"]
                out[f"model.layers.{i}.self_attn.{p}_proj.bias"] = torch.zeros(w.shape[0], dtype=w.dtype)
    return out


# ---- Qwen3 ---------------------------------------------------------------------------------------
def qwen3_config_from_hf(raw: dict, path: Path) -> ModelConfig:
    if raw.get("attention_bias"):
        raise unsupported(path, "attention_bias: true (a bias on o_proj)")
    return causal_config(raw, path, family="qwen3", qkv_bias=False, qk_norm=True, default_head_dim=128)


def qwen3_config_to_hf(cfg: ModelConfig) -> dict:
    _check_writable(cfg, "qwen3", qkv_bias_ok=False, needs_qk_norm=True)
    return {**_config_to_hf(cfg, "qwen3", "Qwen3ForCausalLM"), "use_sliding_window": False}


LLAMA = FamilySpec(
    name="Llama",
    model_types=("llama",),
    config_from_hf=llama_config_from_hf,
    config_to_hf=llama_config_to_hf,
    state_from_hf=NAMES.state_from_hf,
    state_to_hf=_state_to_hf,
    generation={"temperature": 0.0, "max_tokens": 256},
    chat_template_files=("chat_template.jinja", "tokenizer_config.json"),
    end_of_turn=None,  # found by name (<|eot_id|>, ...) when the tokenizer has one; Llama 2 has none
    mask_token="<|mask|>",  # only what tiny checkpoints add; real ones get a placeholder (module docstring)
)

QWEN2 = FamilySpec(
    name="Qwen2",
    model_types=("qwen2",),
    config_from_hf=qwen2_config_from_hf,
    config_to_hf=qwen2_config_to_hf,
    state_from_hf=NAMES.state_from_hf,
    state_to_hf=qwen2_state_to_hf,
    generation={"temperature": 0.0, "max_tokens": 256},
    chat_template_files=("chat_template.jinja", "tokenizer_config.json"),
    end_of_turn="<|im_end|>",
    mask_token="<|mask|>",
)

QWEN3 = FamilySpec(
    name="Qwen3",
    model_types=("qwen3",),
    config_from_hf=qwen3_config_from_hf,
    config_to_hf=qwen3_config_to_hf,
    state_from_hf=NAMES.state_from_hf,
    state_to_hf=_state_to_hf,
    generation={"temperature": 0.0, "max_tokens": 256},
    chat_template_files=("chat_template.jinja", "tokenizer_config.json"),
    end_of_turn="<|im_end|>",
    mask_token="<|mask|>",
)

SPECS = (LLAMA, QWEN2, QWEN3)
