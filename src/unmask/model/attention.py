"""Multi-head attention with optional GQA, q/k/v biases, per-head q/k RMSNorm and (partial) RoPE.

Everything that shapes a key (projection, bias, norm, rotation) happens before the KV cache sees it,
so cached keys are exactly those a whole-sequence forward would compute.
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig
from .rope import apply_rope

try:  # FlexAttention (torch >= 2.5): block-sparse masks, used for BD3-LM training on CUDA
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:  # pragma: no cover
    BlockMask, flex_attention = None, None
_compiled_flex = None


def _flex(q, k, v, block_mask, enable_gqa: bool):
    # Eager flex_attention materialises the full score matrix; compiled, it skips masked tiles.
    global _compiled_flex
    if q.device.type != "cuda":
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)


class KVCache(Protocol):
    """What the engine hands to `Transformer.forward`. The model only asks it for the keys and values
    to attend to; which positions they hold, and when they are kept, is the engine's business."""

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, self.n_kv * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, self.n_kv * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        if cfg.qk_norm:
            self.q_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps)
            self.k_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(..., d) -> q (..., H*D), k and v (..., KV*D), q and k normalised per head if configured."""
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.q_norm is not None:
            q = self.q_norm(q.unflatten(-1, (self.n_heads, self.head_dim))).flatten(-2)
            k = self.k_norm(k.unflatten(-1, (self.n_kv, self.head_dim))).flatten(-2)
        return q, k, v

    def forward(self, x, cos, sin, mask, is_causal, layer: int, kv_cache: KVCache | None, packed=None):
        """x: (B, T, d), or with `packed` (see Transformer.forward) the (N, d) rows of real tokens."""
        if packed is None:
            B, T, _ = x.shape
            q, k, v = self._project(x)
        else:
            B, T, idx = packed
            q, k, v = (_unpack(t, B * T, idx) for t in self._project(x))
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)
        if BlockMask is not None and isinstance(mask, BlockMask):
            y = _flex(q, k, v, mask, self.n_kv != self.n_heads)
        else:
            y = attend(q, k, v, mask, is_causal, self.n_kv != self.n_heads)
        y = y.transpose(1, 2).reshape(B, T, -1)
        return self.o_proj(y if packed is None else y.reshape(B * T, -1)[packed[2]])


# Inference forwards longer than this attend in query chunks of this many rows, so a long full-attention
# canvas (a LLaDA or Dream refresh over the whole prompt) never materialises one (T, S) score matrix
# per head: memory O(chunk * S) instead of O(T * S). Each query row's softmax is its own, so the result
# is the same. Training keeps one call (autograd would save every chunk anyway).
QUERY_CHUNK = 1024


def attend(q, k, v, mask, is_causal: bool, gqa: bool) -> torch.Tensor:
    """Scaled dot-product attention, in query chunks for long inference forwards (QUERY_CHUNK)."""
    T = q.shape[2]
    if is_causal or T <= QUERY_CHUNK or torch.is_grad_enabled():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=gqa)
    parts = []
    for c in range(0, T, QUERY_CHUNK):
        m = mask if mask is None or mask.shape[-2] == 1 else mask[..., c:c + QUERY_CHUNK, :]
        parts.append(F.scaled_dot_product_attention(q[:, :, c:c + QUERY_CHUNK], k, v, attn_mask=m, enable_gqa=gqa))
    return torch.cat(parts, dim=2)


def _unpack(rows: torch.Tensor, n: int, idx: torch.Tensor) -> torch.Tensor:
    """(N, C) rows of real tokens -> (n, C) with zeros at the padding positions."""
    return rows.new_zeros(n, rows.shape[-1]).index_copy_(0, idx, rows)
