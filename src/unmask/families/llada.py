"""LLaDA 8B (Base, Instruct) and LLaDA 1.5: OLMo-style names, full bidirectional attention, no
logit shift. `ff_out` names both the MLP's down projection (inside a block) and the LM head (at the
top level); the templates below are anchored, so each resolves to one tensor of ours."""
from __future__ import annotations

from pathlib import Path

from ..config import ModelConfig
from .spec import FamilySpec, NameMap, attention_fields, model_config, need, rope_scaling_from_hf, \
    rope_scaling_to_hf, special_ids, unsupported

NATIVE_IDS = {"mask": 126336, "eos": 126081, "pad": 126081}

NAMES = NameMap([
    ("embed.weight", "model.transformer.wte.weight"),
    ("layers.{i}.attn_norm.weight", "model.transformer.blocks.{i}.attn_norm.weight"),
    *[(f"layers.{{i}}.attn.{p}_proj.{{w}}", f"model.transformer.blocks.{{i}}.{p}_proj.{{w}}") for p in "qkv"],
    ("layers.{i}.attn.o_proj.weight", "model.transformer.blocks.{i}.attn_out.weight"),
    ("layers.{i}.mlp_norm.weight", "model.transformer.blocks.{i}.ff_norm.weight"),
    ("layers.{i}.mlp.gate_proj.weight", "model.transformer.blocks.{i}.ff_proj.weight"),
    ("layers.{i}.mlp.up_proj.weight", "model.transformer.blocks.{i}.up_proj.weight"),
    ("layers.{i}.mlp.down_proj.weight", "model.transformer.blocks.{i}.ff_out.weight"),
    ("norm.weight", "model.transformer.ln_f.weight"),
    ("lm_head.weight", "model.transformer.ff_out.weight"),
])

# Options of the OLMo code LLaDA ships that our network does not have; a checkpoint using one is refused.
_UNSUPPORTED = {"alibi": True, "include_bias": True, "attention_layer_norm": True, "input_emb_norm": True,
                "scale_logits": True, "rope": False, "bias_for_layer_norm": True}


def config_from_hf(raw: dict, path: Path) -> ModelConfig:
    for key, bad in _UNSUPPORTED.items():
        if key in raw and bool(raw[key]) == bad:
            raise unsupported(path, f"{key}: {str(raw[key]).lower()}")
    if raw.get("block_type", "llama") != "llama":
        raise unsupported(path, f"block_type {raw['block_type']!r}")
    if raw.get("layer_norm_type", "rms") != "rms":
        raise unsupported(path, f"layer_norm_type {raw['layer_norm_type']!r}")
    if raw.get("activation_type", "silu") not in ("silu", "swiglu"):
        raise unsupported(path, f"activation_type {raw['activation_type']!r}")
    d = need(raw, "d_model", path)
    heads = need(raw, "n_heads", path)
    max_pos = raw.get("max_sequence_length", 4096)
    kv = raw.get("n_kv_heads") or (1 if raw.get("multi_query_attention") else heads)
    kv = None if kv == heads else kv  # None: no GQA, as our own configs write it
    return model_config({
        "family": raw["model_type"],
        "d_model": d,
        "n_layers": need(raw, "n_layers", path),
        "n_heads": heads,
        "n_kv_heads": kv,
        "mlp_hidden": raw.get("mlp_hidden_size") or raw.get("mlp_ratio", 4) * d,
        "max_seq_len": max_pos,
        "rope_theta": raw.get("rope_theta", 10000.0),
        "rope_scaling": rope_scaling_from_hf(raw, path, max_pos),
        "norm_eps": raw.get("rms_norm_eps", 1e-5),
        "tie_embeddings": bool(raw.get("weight_tying", False)),
        "qkv_bias": bool(raw.get("include_qkv_bias", False)),
        "block_size": 32,  # full attention; the semi-autoregressive block of LLaDA's chat examples
        "logit_shift": 0,
        "vocab_size": raw.get("embedding_size") or need(raw, "vocab_size", path),
        **attention_fields("full"),
        **special_ids(raw, path, ("<|mdm_mask|>",), NATIVE_IDS),
    }, path)


def config_to_hf(cfg: ModelConfig) -> dict:
    return {
        "architectures": ["LLaDAModelLM"],
        "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig",
                     "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
                     "AutoModel": "modeling_llada.LLaDAModelLM"},
        "model_type": cfg.family,
        "activation_type": "silu", "alibi": False, "block_type": "llama", "layer_norm_type": "rms",
        "include_bias": False, "include_qkv_bias": cfg.qkv_bias, "rope": True,
        "d_model": cfg.d_model, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "n_kv_heads": cfg.kv_heads,
        "mlp_hidden_size": cfg.hidden, "mlp_ratio": 4,
        "max_sequence_length": cfg.max_seq_len, "rope_theta": cfg.rope_theta,
        "rope_scaling": rope_scaling_to_hf(cfg), "rms_norm_eps": cfg.norm_eps,
        "weight_tying": cfg.tie_embeddings, "vocab_size": cfg.vocab_size, "embedding_size": cfg.vocab_size,
        "mask_token_id": cfg.mask_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
        "torch_dtype": "bfloat16",
    }


SPEC = FamilySpec(
    name="LLaDA",
    model_types=("llada",),
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    state_from_hf=NAMES.state_from_hf,
    state_to_hf=NAMES.state_to_hf,
    # ML-GSAI generate.py: low-confidence remasking, one token per step (steps = gen_length), greedy;
    # block_length 32 in chat.py and the README examples.
    generation={"policy": "topk", "steps": None, "block_size": 32, "max_tokens": 128, "temperature": 0.0},
    chat_template_files=("tokenizer_config.json",),
    end_of_turn="<|eot_id|>",
    mask_token="<|mdm_mask|>",
)
