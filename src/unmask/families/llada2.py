"""LLaDA2.0 / LLaDA2.1 (mini, flash): BailingMoeV2 weights. Fused query_key_value (rows: every q head,
then every k head, then every v head), per-head q/k RMSNorm (always on), RoPE on the first
head_dim * partial_rotary_factor dims, dense MLP in the first `first_k_dense_replace` layers and
sigmoid-routed experts with a shared expert after. Block-causal attention (blocks of 32, a generate()
argument), no logit shift."""
from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from ..config import ModelConfig
from .checkpoint import CheckpointReader
from .spec import FamilySpec, NameMap, Shapes, attention_fields, model_config, need, rope_scaling_from_hf, \
    rope_scaling_to_hf, special_ids, unsupported

NATIVE_IDS = {"mask": 156895, "eos": 156892, "pad": 156892}
_MLP = ("gate", "up", "down")

NAMES = NameMap([
    ("embed.weight", "model.word_embeddings.weight"),
    ("layers.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("layers.{i}.attn.o_proj.weight", "model.layers.{i}.attention.dense.weight"),
    ("layers.{i}.attn.q_norm.weight", "model.layers.{i}.attention.query_layernorm.weight"),
    ("layers.{i}.attn.k_norm.weight", "model.layers.{i}.attention.key_layernorm.weight"),
    ("layers.{i}.mlp_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    *[(f"layers.{{i}}.mlp.{p}_proj.weight", f"model.layers.{{i}}.mlp.{p}_proj.weight") for p in _MLP],
    ("layers.{i}.mlp.router.weight", "model.layers.{i}.mlp.gate.weight"),
    ("layers.{i}.mlp.router.expert_bias", "model.layers.{i}.mlp.gate.expert_bias"),
    *[(f"layers.{{i}}.mlp.experts.{{e}}.{p}_proj.weight", f"model.layers.{{i}}.mlp.experts.{{e}}.{p}_proj.weight")
      for p in _MLP],
    *[(f"layers.{{i}}.mlp.shared.{p}_proj.weight", f"model.layers.{{i}}.mlp.shared_experts.{p}_proj.weight")
      for p in _MLP],
    ("norm.weight", "model.norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
])
_QKV = re.compile(r"layers\.(\d+)\.attn\.[qkv]_proj\.(weight|bias)")


def _fused(i: int, w: str) -> str:
    return f"model.layers.{i}.attention.query_key_value.{w}"


def state_from_hf(reader: CheckpointReader, cfg: ModelConfig, shapes: Shapes) -> Iterator[tuple[str, torch.Tensor]]:
    yield from NAMES.state_from_hf(reader, cfg, {k: s for k, s in shapes.items() if not _QKV.fullmatch(k)})
    for i in range(cfg.n_layers):
        for w in ("weight", "bias") if cfg.qkv_bias else ("weight",):
            parts = [shapes[f"layers.{i}.attn.{p}_proj.{w}"] for p in "qkv"]
            rows = [s[0] for s in parts]
            fused = reader.get(_fused(i, w), (sum(rows), *parts[0][1:]))
            for p, t in zip("qkv", fused.split(rows)):
                yield f"layers.{i}.attn.{p}_proj.{w}", t


def state_to_hf(state: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out = NAMES.state_to_hf({k: v for k, v in state.items() if not _QKV.fullmatch(k)}, cfg)
    for i in range(cfg.n_layers):
        for w in ("weight", "bias") if cfg.qkv_bias else ("weight",):
            out[_fused(i, w)] = torch.cat([state[f"layers.{i}.attn.{p}_proj.{w}"] for p in "qkv"])
    return out


def config_from_hf(raw: dict, path: Path) -> ModelConfig:
    if raw.get("use_bias"):
        raise unsupported(path, "use_bias: true (biases on the output and MLP projections)")
    if raw.get("norm_head"):
        raise unsupported(path, "norm_head: true")
    if raw.get("hidden_act", "silu") != "silu":
        raise unsupported(path, f"hidden_act {raw.get('hidden_act')!r}")
    hidden = need(raw, "hidden_size", path)
    heads = need(raw, "num_attention_heads", path)
    head_dim = raw.get("head_dim") or hidden // heads
    if raw.get("partial_rotary_factor") is not None:
        rotary = int(head_dim * raw["partial_rotary_factor"])  # what the modeling code uses
    else:
        rotary = raw.get("rotary_dim") or head_dim
    max_pos = need(raw, "max_position_embeddings", path)
    moe = None
    if raw.get("num_experts"):
        moe = {
            "n_experts": raw["num_experts"],
            "top_k": need(raw, "num_experts_per_tok", path),
            "expert_hidden": need(raw, "moe_intermediate_size", path),
            "n_shared_experts": raw.get("num_shared_experts") or 0,
            "first_k_dense": raw.get("first_k_dense_replace") or 0,
            "n_group": raw.get("n_group") or 1,
            "topk_group": raw.get("topk_group") or 1,
            "score_function": raw.get("score_function", "sigmoid"),
            "norm_topk_prob": raw.get("norm_topk_prob", True),
            "routed_scaling_factor": raw.get("routed_scaling_factor") or 1.0,
            "expert_bias": True,  # the modeling code always has the buffer, whatever the config says
        }
    return model_config({
        "family": raw["model_type"],
        "d_model": hidden,
        "n_layers": need(raw, "num_hidden_layers", path),
        "n_heads": heads,
        "n_kv_heads": None if raw.get("num_key_value_heads") in (None, raw.get("num_attention_heads")) \
        else raw["num_key_value_heads"],
        "head_size": head_dim,
        "mlp_hidden": need(raw, "intermediate_size", path),
        "max_seq_len": max_pos,
        "rope_theta": raw.get("rope_theta", 10000.0),
        "rotary_dim": None if rotary == head_dim else rotary,
        "rope_scaling": rope_scaling_from_hf(raw, path, max_pos),
        "norm_eps": raw.get("rms_norm_eps", 1e-6),
        "tie_embeddings": bool(raw.get("tie_word_embeddings", False)),
        "qkv_bias": bool(raw.get("use_qkv_bias", False)),
        "qk_norm": True,
        "moe": moe,
        "block_size": 32,  # generate()'s block_length default; not in config.json
        "logit_shift": 0,
        "vocab_size": need(raw, "vocab_size", path),
        **attention_fields("block"),
        **special_ids(raw, path, ("<|mask|>",), NATIVE_IDS),
    }, path)


def config_to_hf(cfg: ModelConfig) -> dict:
    m = cfg.moe
    out = {
        "architectures": ["LLaDA2MoeModelLM"],
        "auto_map": {"AutoConfig": "configuration_llada2_moe.LLaDA2MoeConfig",
                     "AutoModel": "modeling_llada2_moe.LLaDA2MoeModel",
                     "AutoModelForCausalLM": "modeling_llada2_moe.LLaDA2MoeModelLM"},
        "model_type": cfg.family,
        "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "intermediate_size": cfg.hidden,
        "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len, "rope_theta": cfg.rope_theta,
        "rope_scaling": rope_scaling_to_hf(cfg),
        "partial_rotary_factor": (cfg.rotary_dim or cfg.head_dim) / cfg.head_dim,
        "rotary_dim": cfg.rotary_dim or cfg.head_dim,
        "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings, "use_qkv_bias": cfg.qkv_bias,
        "use_bias": False, "norm_head": False, "vocab_size": cfg.vocab_size, "pad_token_id": cfg.pad_token_id,
        "torch_dtype": "bfloat16",
    }
    if m is not None:
        out.update({
            "num_experts": m.n_experts, "num_experts_per_tok": m.top_k, "moe_intermediate_size": m.expert_hidden,
            "num_shared_experts": m.n_shared_experts, "first_k_dense_replace": m.first_k_dense,
            "n_group": m.n_group, "topk_group": m.topk_group, "score_function": m.score_function,
            "norm_topk_prob": m.norm_topk_prob, "routed_scaling_factor": m.routed_scaling_factor,
            "moe_router_enable_expert_bias": m.expert_bias, "router_dtype": "fp32",
        })
    return out


SPEC = FamilySpec(
    name="LLaDA2",
    model_types=("llada2_moe",),
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    state_from_hf=state_from_hf,
    state_to_hf=state_to_hf,
    # LLaDA2.0 generate(): block_length 32, threshold 0.95, greedy, gen_length 2048.
    generation={"policy": "threshold", "threshold": 0.95, "block_size": 32, "max_tokens": 2048, "temperature": 0.0},
    chat_template_files=("tokenizer_config.json", "chat_template.jinja"),
    end_of_turn="<|role_end|>",
    mask_token="<|mask|>",
)
