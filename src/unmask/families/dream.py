"""Dream 7B (also Dream-Coder, DiffuCoder): Qwen2.5 weights with q/k/v biases, full bidirectional
attention, and AR-style logits (position i predicts token i + 1)."""
from __future__ import annotations

from pathlib import Path

from ..config import ModelConfig
from .qwen import NAMES, qwen_config, qwen_config_to_hf
from .spec import FamilySpec

NATIVE_IDS = {"mask": 151666, "eos": 151643, "pad": 151643}


def config_from_hf(raw: dict, path: Path) -> ModelConfig:
    # Full attention: block_size only sets the semi-autoregressive window a sampler may use.
    return qwen_config(raw, path, attention="full", block_size=32, logit_shift=1, qkv_bias=True, qk_norm=False,
                       mask_tokens=("<|mask|>",), native_ids=NATIVE_IDS)


def config_to_hf(cfg: ModelConfig) -> dict:
    return {**qwen_config_to_hf(cfg, "DreamModel", {"AutoConfig": "configuration_dream.DreamConfig",
                                                    "AutoModel": "modeling_dream.DreamModel"}),
            "mask_token_id": cfg.mask_token_id}


SPEC = FamilySpec(
    name="Dream",
    model_types=("Dream",),
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    state_from_hf=NAMES.state_from_hf,
    state_to_hf=NAMES.state_to_hf,
    # Dream's diffusion_generate has no blocks: the whole answer is one canvas (block = max_tokens),
    # one token per step by confidence (alg maskgit_plus / entropy; README: steps = answer length).
    generation={"policy": "topk", "steps": None, "block_size": 256, "max_tokens": 256, "temperature": 0.0},
    chat_template_files=("tokenizer_config.json",),
    end_of_turn="<|im_end|>",
    mask_token="<|mask|>",
)
