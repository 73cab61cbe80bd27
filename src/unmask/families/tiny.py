"""Tiny random checkpoints in each family's exact Hugging Face layout, for tests and demos.

`write_tiny("sdar", dir)` writes config.json in the family's field names, the weights through the
family's `state_to_hf` (sharded with an index for LLaDA, as the real directories are), a byte-level
BPE tokenizer.json with the family's special tokens, tokenizer_config.json and the chat template
where the family keeps it. It returns the network it wrote (its weights rounded to the stored dtype),
so a test can compare `load_network(dir)` against it exactly. Each tiny config switches on the
features of its family (biases, q/k norms, explicit head width, partial RoPE, experts).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer

from ..config import ModelConfig, MoEConfig
from ..model import Transformer
from ..tokenizer import train_tokenizer
from . import registry
from .spec import attention_fields

# Per model_type: the architecture of its tiny checkpoint, and how it is stored.
_QWEN = dict(tie_embeddings=False, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden=96, rope_theta=1e6,
             norm_eps=1e-6)
_TINY: dict[str, dict] = {
    "unmask": dict(d_model=32, n_layers=2, n_heads=4, tie_embeddings=True, **attention_fields("block"), block_size=4),
    "llada": dict(tie_embeddings=False, d_model=64, n_layers=2, n_heads=4, mlp_hidden=96, rope_theta=500000.0,
                  **attention_fields("full"), block_size=32),
    "Dream": dict(_QWEN, qkv_bias=True, logit_shift=1, **attention_fields("full"), block_size=32),
    "sdar": dict(_QWEN, head_size=24, qk_norm=True, **attention_fields("block"), block_size=4),  # q width 96 != 64
    "llada2_moe": dict(_QWEN, n_layers=3, head_size=16, rotary_dim=8, rope_theta=600000.0, qk_norm=True,
                       **attention_fields("block"), block_size=32,
                       moe=MoEConfig(n_experts=8, top_k=2, expert_hidden=32, n_shared_experts=1, first_k_dense=1,
                                     n_group=4, topk_group=2, routed_scaling_factor=2.5, expert_bias=True)),
    "Fast_dLLM_Qwen": dict(_QWEN, qkv_bias=True, logit_shift=1, **attention_fields("block"), block_size=32),
    # Plain AR families (families/llama.py): causal attention; the block size is a fixed placeholder.
    "llama": dict(_QWEN, rope_theta=500000.0, norm_eps=1e-5, logit_shift=1, **attention_fields("causal"),
                  block_size=32),
    "qwen2": dict(_QWEN, qkv_bias=True, logit_shift=1, **attention_fields("causal"), block_size=32),
    "qwen3": dict(_QWEN, head_size=24, qk_norm=True, tie_embeddings=True, logit_shift=1,
                  **attention_fields("causal"), block_size=32),
}
# Special tokens of each family's tokenizer (added after our own ten when they are not among them).
_TOKENS: dict[str, dict[str, str]] = {
    "unmask": {"eos": "<|endoftext|>", "pad": "<|pad|>"},
    "llada": {"eos": "<|endoftext|>", "pad": "<|endoftext|>", "bos": "<|startoftext|>",
              "extra": "<|start_header_id|> <|end_header_id|>"},
    "Dream": {"eos": "<|endoftext|>", "pad": "<|endoftext|>", "extra": "<|im_start|>"},
    "sdar": {"eos": "<|endoftext|>", "pad": "<|endoftext|>", "extra": "<|im_start|>"},
    "llada2_moe": {"eos": "<|endoftext|>", "pad": "<|endoftext|>", "extra": "<role> </role>"},
    "Fast_dLLM_Qwen": {"eos": "<|im_end|>", "pad": "<|endoftext|>", "extra": "<|im_start|>"},
    "llama": {"eos": "<|endoftext|>", "pad": "<|pad|>", "bos": "<|begin_of_text|>"},
    "qwen2": {"eos": "<|endoftext|>", "pad": "<|endoftext|>", "extra": "<|im_start|>"},
    "qwen3": {"eos": "<|endoftext|>", "pad": "<|endoftext|>", "extra": "<|im_start|> <think> </think>"},
}
# AR families have no [MASK]: their tokenizer_config.json names none (families/llama.py picks a placeholder).
_NO_MASK_TOKEN = {"llama", "qwen2", "qwen3"}
_SHARDS = {"llada": 2}
# A minimal chat template whose turns end with the family's end-of-turn token (END); the real ones
# differ, this is enough to exercise where a template is found.
_TEMPLATE = ("{% for m in messages %}{{ m['role'] + ':\\n' + m['content'] + END }}{% endfor %}"
             "{% if add_generation_prompt %}{{ 'assistant:\\n' }}{% endif %}")
_TEXT = "def add(a, b):\n    return a + b\n\nclass Stack:\n    def push(self, x):\n        self.items.append(x)\n"


def tiny_families() -> list[str]:
    """Every model_type `write_tiny` can write."""
    return list(_TINY)


def _tokenizer(model_type: str):
    """Our byte-level BPE plus the family's special tokens; returns (HF tokenizer, {role: id})."""
    spec = registry.get(model_type)
    hf = Tokenizer.from_str(train_tokenizer([_TEXT] * 10, vocab_size=300).to_str())
    roles = dict(_TOKENS[model_type], mask=spec.mask_token, eot=spec.end_of_turn or "<|end|>")
    texts = [t for k, v in roles.items() for t in (v.split() if k == "extra" else [v])]
    hf.add_special_tokens([t for t in texts if hf.token_to_id(t) is None])
    return hf, {k: hf.token_to_id(v) for k, v in roles.items() if k != "extra"}


def _randomize(net: Transformer, seed: int, dtype: torch.dtype) -> None:
    """Weights large enough for decisive logits and routing, rounded to the stored dtype."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("router.weight"):
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
            else:  # embeddings ~ N(0, 1), projections and biases ~ N(0, 0.3^2)
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 if name.startswith("embed") else 0.3))
            p.copy_(p.to(dtype).float())
        for name, b in net.named_buffers():
            if name.endswith("expert_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))


def _write_weights(state: dict[str, torch.Tensor], out: Path, shards: int) -> None:
    names = sorted(state)
    if shards <= 1:
        save_file(state, out / "model.safetensors", metadata={"format": "pt"})
        return
    per = math.ceil(len(names) / shards)
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in names[s * per:(s + 1) * per]}
        save_file(part, out / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    total = sum(t.numel() * t.element_size() for t in state.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def write_tiny(model_type: str, out: str | Path, *, seed: int = 0,
               dtype: torch.dtype = torch.bfloat16) -> tuple[Path, Transformer]:
    """Write a tiny random checkpoint of `model_type` into `out`; returns (out, the fp32 net written)."""
    spec = registry.get(model_type)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    hf, ids = _tokenizer(model_type)
    cfg = ModelConfig(family=model_type, max_seq_len=64, vocab_size=hf.get_vocab_size(with_added_tokens=True),
                      mask_token_id=ids["mask"], eos_token_id=ids["eos"], pad_token_id=ids["pad"],
                      **_TINY[model_type])
    torch.manual_seed(seed)
    net = Transformer(cfg).eval()
    _randomize(net, seed, dtype)
    state = {k: v.detach().to(torch.float32 if k.endswith("expert_bias") else dtype).contiguous()
             for k, v in net.state_dict().items()}
    _write_weights(spec.state_to_hf(state, cfg), out, _SHARDS.get(model_type, 1))
    (out / "config.json").write_text(json.dumps(spec.config_to_hf(cfg), indent=2) + "\n")
    (out / "tokenizer.json").write_text(hf.to_str())
    template = _TEMPLATE.replace("END", repr(spec.end_of_turn or "<|end|>"))
    tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": _TOKENS[model_type]["eos"],
               "pad_token": _TOKENS[model_type]["pad"], "mask_token": spec.mask_token}
    if model_type in _NO_MASK_TOKEN:
        del tok_cfg["mask_token"]
    if "bos" in _TOKENS[model_type]:
        tok_cfg["bos_token"] = _TOKENS[model_type]["bos"]
    where = spec.chat_template_files[:1]  # the template goes where the family looks first
    if where == ("chat_template.jinja",):
        (out / "chat_template.jinja").write_text(template)
    elif where == ("tokenizer_config.json",):
        tok_cfg["chat_template"] = template
    if model_type != "unmask":
        (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    if spec.generation:
        gen = {"bos_token_id": ids.get("bos", ids["eos"]), "eos_token_id": ids["eos"], "pad_token_id": ids["pad"]}
        (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return out, net
