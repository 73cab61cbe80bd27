"""The ModelConfig and FamilySpec of a GGUF file, from its metadata (and a few tensor shapes).

The config lives in metadata keys (`{arch}.embedding_length`, `.block_count`, `.attention.head_count`,
...), the head is absent when tied. A `rope_freqs` tensor (llama 3 RoPE scaling) is refused: our RoPE
has no per-frequency factors.

Special ids: mask from `tokenizer.ggml.mask_token_id` (llama.cpp writes it for LLaDA and Dream), else
the family's mask token in the vocabulary, else (AR families) the placeholder rule of
families/llama.py, else the family's native id; eos, pad and bos from their keys. The logit shift is the
family's (Dream 1, LLaDA 0), unless `diffusion.shift_logits` says otherwise.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ...config import ModelConfig
from ...errors import UserError
from ...tokenizer.hf_ids import MASK_NAMES
from .. import registry
from ..llama import placeholder_mask_id
from ..spec import FamilySpec
from .layout import ARCHITECTURES
from .tokenizer import added_tokens, special_id

if TYPE_CHECKING:
    from .read import _Tensors

_KNOWN_ELSEWHERE = {"llada-moe": "LLaDA-MoE has no unmask family yet"}
_CAUSAL = ("llama", "qwen2", "qwen3")


class _Meta:
    def __init__(self, meta: dict, arch: str, file: Path):
        self.meta, self.arch, self.file = meta, arch, file

    def get(self, key: str, default=None):
        v = self.meta.get(f"{self.arch}.{key}", default)
        if isinstance(v, list):  # per-layer values (some architectures): only uniform ones fit our network
            if len(set(v)) != 1:
                raise UserError(f"{self.file}: {self.arch}.{key} differs between layers ({v[:4]}...); "
                                "unmask's network has one value for every layer")
            v = v[0]
        return v

    def need(self, key: str):
        v = self.get(key)
        if v is None:
            raise UserError(f"{self.file}: GGUF metadata key {self.arch}.{key} is missing; the file is incomplete")
        return v


def _rope_scaling(m: _Meta, context: int) -> dict | None:
    kind = m.get("rope.scaling.type")
    if kind in (None, "none"):
        return None
    factor = _f32(m.get("rope.scaling.factor"))
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        out = {"rope_type": "yarn", "factor": factor,
               "original_max_position_embeddings": m.get("rope.scaling.original_context_length", context)}
        for key, hf in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow"),
                        ("yarn_attn_factor", "attention_factor")):
            if m.get(f"rope.scaling.{key}") is not None:
                out[hf] = _f32(m.get(f"rope.scaling.{key}"))
        return out
    raise UserError(f"{m.file}: {m.arch}.rope.scaling.type {kind!r} is not supported (supported: linear, yarn)")


def _f32(v):
    """A float GGUF stored as float32, back to the decimal it was written from (1e-06, not 9.99e-07)."""
    return None if v is None else float(str(np.float32(v)))


def _mask_id(meta: dict, spec: FamilySpec, causal: bool, exclude: set[int]) -> int | None:
    mask = special_id(meta, "mask_token_id")
    if mask is not None:
        return mask
    added = added_tokens(meta)
    by_text = {t: i for i, (t, _) in added.items()}
    for name in (spec.mask_token, *MASK_NAMES):
        if name in by_text and by_text[name] not in exclude:
            return by_text[name]
    if causal:
        return placeholder_mask_id(added, exclude, meta.get("tokenizer.chat_template"))
    return None  # the family's native id


def gguf_config(meta: dict, tensors: _Tensors, file: Path) -> tuple[ModelConfig, FamilySpec, bool]:
    """(ModelConfig, FamilySpec, whether q/k rows are permuted) of a GGUF file's metadata."""
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        why = f" ({_KNOWN_ELSEWHERE[arch]})" if arch in _KNOWN_ELSEWHERE else ""
        raise UserError(f"{file}: GGUF architecture {arch!r} is not supported{why}; supported: "
                        f"{', '.join(ARCHITECTURES)}")
    if int(meta.get("split.count") or 1) > 1:
        raise UserError(f"{file}: a split GGUF (part {int(meta.get('split.no', 0)) + 1} of {meta['split.count']}); "
                        "merge the parts first (llama-gguf-split --merge)")
    model_type, permuted = ARCHITECTURES[arch]
    spec = registry.get(model_type)
    m = _Meta(meta, arch, file)
    if "rope_freqs.weight" in tensors:
        raise UserError(f"{file}: tensor rope_freqs.weight (per-frequency RoPE factors, Llama 3 RoPE scaling) is "
                        "not supported by unmask's network")
    if "token_embd.weight" not in tensors:
        raise UserError(f"{file}: tensor token_embd.weight is missing; the file is incomplete")
    vocab, d = tensors.shape("token_embd.weight")
    hidden = m.need("embedding_length")
    heads = m.need("attention.head_count")
    kv = m.get("attention.head_count_kv", heads)
    head_dim = m.get("attention.key_length") or hidden // heads
    if m.get("attention.value_length", head_dim) != head_dim:
        raise UserError(f"{file}: {arch}.attention.value_length differs from key_length; not supported")
    if m.get("rope.dimension_count", head_dim) != head_dim:
        raise UserError(f"{file}: {arch}.rope.dimension_count {m.get('rope.dimension_count')} differs from the head "
                        f"size {head_dim} (partial RoPE); not supported for architecture {arch!r}")
    eps = _f32(m.get("attention.layer_norm_rms_epsilon"))
    if eps is None:
        raise UserError(f"{file}: no {arch}.attention.layer_norm_rms_epsilon (RMSNorm); the file is incomplete")
    context = m.need("context_length")
    eos, pad, bos = special_id(meta, "eos_token_id"), special_id(meta, "padding_token_id"), special_id(meta, "bos_token_id")
    causal = arch in _CAUSAL
    mask = _mask_id(meta, spec, causal, {i for i in (eos, pad, bos) if i is not None})
    common = {"rope_theta": _f32(m.get("rope.freq_base", 10000.0)), "rope_scaling": _rope_scaling(m, context),
              "vocab_size": vocab, "eos_token_id": eos, "pad_token_id": pad, "bos_token_id": bos,
              "mask_token_id": mask}
    qkv_bias = "blk.0.attn_q.bias" in tensors
    if arch == "llada":
        if head_dim * heads != hidden:
            raise UserError(f"{file}: a head size ({head_dim}) other than embedding_length / head_count is not "
                            "supported for architecture 'llada'")
        raw = {"model_type": model_type, "d_model": hidden, "n_layers": m.need("block_count"), "n_heads": heads,
               "n_kv_heads": kv, "mlp_hidden_size": m.need("feed_forward_length"), "max_sequence_length": context,
               "rms_norm_eps": eps, "weight_tying": "output.weight" not in tensors, "include_qkv_bias": qkv_bias,
               "embedding_size": vocab, **common}
    else:
        raw = {"model_type": model_type, "hidden_size": hidden, "num_hidden_layers": m.need("block_count"),
               "num_attention_heads": heads, "num_key_value_heads": kv,
               "intermediate_size": m.need("feed_forward_length"), "max_position_embeddings": context,
               "rms_norm_eps": eps, "tie_word_embeddings": "output.weight" not in tensors,
               "attention_bias": qkv_bias if arch == "llama" else False, **common}
        if arch == "qwen3" or head_dim * heads != hidden:
            raw["head_dim"] = head_dim
    raw = {k: v for k, v in raw.items() if v is not None}
    config_json = str(file / "config.json")
    try:
        cfg = spec.config_from_hf(raw, file)
    except UserError as e:
        raise UserError(str(e).replace(config_json, f"{file} (GGUF metadata)")) from None
    if d != cfg.d_model:
        raise UserError(f"{file}: tensor token_embd.weight has width {d} but {arch}.embedding_length is "
                        f"{cfg.d_model}; the metadata does not match the tensors")
    shift = meta.get("diffusion.shift_logits")
    if isinstance(shift, bool) and cfg.attention != "causal" and int(shift) != cfg.logit_shift:
        cfg = cfg.model_copy(update={"logit_shift": int(shift)})
    return cfg, spec, permuted
