"""SDAR (1.7B/4B/8B Chat): Qwen3 weights (per-head q/k RMSNorm, explicit head_dim, no biases) with
block-causal attention over blocks of the config's `block_size` (4), aligned at position 0."""
from __future__ import annotations

from pathlib import Path

from ..config import ModelConfig
from .qwen import NAMES, qwen_config, qwen_config_to_hf
from .spec import FamilySpec, unsupported

NATIVE_IDS = {"mask": 151669, "eos": 151643, "pad": 151643}


def config_from_hf(raw: dict, path: Path) -> ModelConfig:
    if raw.get("attention_bias"):
        raise unsupported(path, "attention_bias: true (a bias on o_proj)")
    return qwen_config(raw, path, attention="block", block_size=int(raw.get("block_size") or 4), logit_shift=0,
                       qkv_bias=False, qk_norm=True, mask_tokens=("<|MASK|>", "<MASK>"), native_ids=NATIVE_IDS)


def config_to_hf(cfg: ModelConfig) -> dict:
    return {**qwen_config_to_hf(cfg, "SDARForCausalLM", {
        "AutoConfig": "configuration_sdar.SDARConfig", "AutoModel": "modeling_sdar.SDARModel",
        "AutoModelForCausalLM": "modeling_sdar.SDARForCausalLM"}),
        "head_dim": cfg.head_dim, "attention_bias": False, "block_size": cfg.block_size,
        "mask_token_id": cfg.mask_token_id}


SPEC = FamilySpec(
    name="SDAR",
    model_types=("sdar",),
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    state_from_hf=NAMES.state_from_hf,
    state_to_hf=NAMES.state_to_hf,
    # generate.py: block 4, low_confidence_dynamic with confidence_threshold 0.85; the card decodes greedily.
    generation={"policy": "threshold", "threshold": 0.85, "block_size": 4, "max_tokens": 512, "temperature": 0.0},
    chat_template_files=("chat_template.jinja", "tokenizer_config.json"),
    end_of_turn="<|im_end|>",
    mask_token="<|MASK|>",
)
