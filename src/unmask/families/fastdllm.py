"""Fast-dLLM v2 (7B, 1.5B): Qwen2.5 weights with q/k/v biases, block-causal attention with blocks of
`bd_size` (32) aligned at position 0, and AR-style logits (position i predicts token i + 1)."""
from __future__ import annotations

from pathlib import Path

from ..config import ModelConfig
from .qwen import NAMES, qwen_config, qwen_config_to_hf
from .spec import FamilySpec

NATIVE_IDS = {"mask": 151665, "eos": 151645, "pad": 151643}


def config_from_hf(raw: dict, path: Path) -> ModelConfig:
    # The config has no mask_token_id: the id is a code default, or found in the tokenizer files.
    return qwen_config(raw, path, attention="block", block_size=int(raw.get("bd_size") or 32), logit_shift=1,
                       qkv_bias=True, qk_norm=False, mask_tokens=("|<MASK>|",), native_ids=NATIVE_IDS)


def config_to_hf(cfg: ModelConfig) -> dict:
    return {**qwen_config_to_hf(cfg, "Fast_dLLM_QwenForCausalLM", {
        "AutoConfig": "configuration.Fast_dLLM_QwenConfig", "AutoModel": "modeling.Fast_dLLM_QwenModel",
        "AutoModelForCausalLM": "modeling.Fast_dLLM_QwenForCausalLM"}),
        "bd_size": cfg.block_size, "conplemenrary_mask": True}


SPEC = FamilySpec(
    name="Fast-dLLM v2",
    model_types=("Fast_dLLM_Qwen",),
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    state_from_hf=NAMES.state_from_hf,
    state_to_hf=NAMES.state_to_hf,
    # README / run_chatbot.py: block 32 (sub-blocks of 8, not modelled here), threshold 0.9, greedy.
    generation={"policy": "threshold", "threshold": 0.9, "block_size": 32, "max_tokens": 2048,
                "temperature": 0.0, "top_p": 0.95},
    chat_template_files=("chat_template.jinja", "tokenizer_config.json"),
    end_of_turn="<|im_end|>",
    mask_token="|<MASK>|",
)
