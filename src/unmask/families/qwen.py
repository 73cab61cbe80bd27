"""The Qwen2 / Qwen3 checkpoint layout, shared by Dream, SDAR and Fast-dLLM v2 (each adds its own
fields and conventions in its own file)."""
from __future__ import annotations

from pathlib import Path

from ..config import ModelConfig
from .spec import NameMap, attention_fields, model_config, need, rope_scaling_from_hf, rope_scaling_to_hf, \
    special_ids, unsupported

NAMES = NameMap([
    ("embed.weight", "model.embed_tokens.weight"),
    ("layers.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    *[(f"layers.{{i}}.attn.{p}_proj.{{w}}", f"model.layers.{{i}}.self_attn.{p}_proj.{{w}}") for p in "qkvo"],
    ("layers.{i}.attn.q_norm.weight", "model.layers.{i}.self_attn.q_norm.weight"),
    ("layers.{i}.attn.k_norm.weight", "model.layers.{i}.self_attn.k_norm.weight"),
    ("layers.{i}.mlp_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    *[(f"layers.{{i}}.mlp.{p}_proj.weight", f"model.layers.{{i}}.mlp.{p}_proj.weight") for p in ("gate", "up", "down")],
    ("norm.weight", "model.norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
])


def qwen_config(raw: dict, path: Path, *, attention: str, block_size: int, logit_shift: int, qkv_bias: bool,
                qk_norm: bool, mask_tokens: tuple[str, ...], native_ids: dict[str, int]) -> ModelConfig:
    """config.json in Qwen2/Qwen3 names -> ModelConfig (the family decides attention, shift and biases)."""
    if raw.get("use_sliding_window"):
        raise unsupported(path, "use_sliding_window: true")
    if raw.get("hidden_act", "silu") != "silu":
        raise unsupported(path, f"hidden_act {raw.get('hidden_act')!r}")
    max_pos = need(raw, "max_position_embeddings", path)
    return model_config({
        "family": raw["model_type"],
        "d_model": need(raw, "hidden_size", path),
        "n_layers": need(raw, "num_hidden_layers", path),
        "n_heads": need(raw, "num_attention_heads", path),
        "n_kv_heads": None if raw.get("num_key_value_heads") in (None, raw.get("num_attention_heads")) \
        else raw["num_key_value_heads"],
        "head_size": raw.get("head_dim"),
        "mlp_hidden": need(raw, "intermediate_size", path),
        "max_seq_len": max_pos,
        "rope_theta": raw.get("rope_theta", 10000.0),
        "rope_scaling": rope_scaling_from_hf(raw, path, max_pos),
        "norm_eps": raw.get("rms_norm_eps", 1e-6),
        "tie_embeddings": bool(raw.get("tie_word_embeddings", False)),
        "qkv_bias": qkv_bias,
        "qk_norm": qk_norm,
        "block_size": block_size,
        "logit_shift": logit_shift,
        "vocab_size": need(raw, "vocab_size", path),
        **attention_fields(attention),
        **special_ids(raw, path, mask_tokens, native_ids),
    }, path)


def qwen_config_to_hf(cfg: ModelConfig, architecture: str, auto_map: dict[str, str]) -> dict:
    """The Qwen-named config.json of `cfg` (family-specific fields are added by the caller)."""
    return {
        "architectures": [architecture],
        "auto_map": auto_map,  # what the real directories carry; never executed by unmask
        "model_type": cfg.family,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        **({"head_dim": cfg.head_size} if cfg.head_size else {}),
        "intermediate_size": cfg.hidden,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": rope_scaling_to_hf(cfg),
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "use_sliding_window": False,
        "vocab_size": cfg.vocab_size,
        "bos_token_id": cfg.eos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "torch_dtype": "bfloat16",
    }
