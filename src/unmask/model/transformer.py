"""A decoder-style transformer (RMSNorm, RoPE, SwiGLU, optional GQA, no biases), nanoGPT-sized.

The attention pattern comes from the config: `full` (MDLM/LLaDA), `block` (block-causal, BD3-LM) or
`causal` (AR). Callers that need something else (the doubled training sequence of block diffusion, a
query block against a KV cache) pass an explicit boolean `attn_mask` and absolute `positions`.
"""
from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig
from .inputs import ForwardBatch
from .masks import block_causal_mask
from .shift import MAX_GAP, left_context

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


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, H, T, D) with the rotated pairs in the two halves of D; cos/sin: (B, 1, T, D/2)
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, self.n_kv * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, self.n_kv * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def forward(self, x, cos, sin, mask, is_causal, layer: int, kv_cache: KVCache | None, packed=None):
        """x: (B, T, d), or with `packed` (see Transformer.forward) the (N, d) rows of real tokens."""
        if packed is None:
            B, T, _ = x.shape
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:
            B, T, idx = packed
            q, k, v = (_unpack(p(x), B * T, idx) for p in (self.q_proj, self.k_proj, self.v_proj))
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)
        if BlockMask is not None and isinstance(mask, BlockMask):
            y = _flex(q, k, v, mask, self.n_kv != self.n_heads)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=self.n_kv != self.n_heads
            )
        y = y.transpose(1, 2).reshape(B, T, -1)
        return self.o_proj(y if packed is None else y.reshape(B * T, -1)[packed[2]])


def _unpack(rows: torch.Tensor, n: int, idx: torch.Tensor) -> torch.Tensor:
    """(N, C) rows of real tokens -> (n, C) with zeros at the padding positions."""
    return rows.new_zeros(n, rows.shape[-1]).index_copy_(0, idx, rows)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.hidden, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.hidden, bias=False)
        self.down_proj = nn.Linear(cfg.hidden, cfg.d_model, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, is_causal, kv_cache, packed=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, is_causal, self.layer, kv_cache, packed)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.prev_embed = nn.Embedding(cfg.vocab_size, cfg.d_model) if cfg.token_shift else None
        self.gap_embed = nn.Embedding(MAX_GAP + 1, cfg.d_model) if cfg.token_shift else None
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init(m: nn.Module):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def default_mask(self, positions: torch.Tensor) -> tuple[torch.Tensor | None, bool]:
        """The mask this model's attention mode implies for a self-contained sequence."""
        mode = self.config.attention
        if mode == "full":
            return None, False
        if mode == "causal":
            return None, True
        return block_causal_mask(positions, positions, self.config.block_size).unsqueeze(1), False

    def forward(self, idx: ForwardBatch | torch.Tensor, positions: torch.Tensor | None = None, attn_mask=None,
                kv_cache: KVCache | None = None, logits_from: int = 0, logits_to: int | None = None,
                logits_at: torch.Tensor | None = None, prev_idx: torch.Tensor | None = None,
                prev_gap: torch.Tensor | None = None, packed: torch.Tensor | None = None) -> torch.Tensor:
        """One forward (model/inputs.py): a ForwardBatch, or its fields spelled out (`net(ids)`,
        `net(ids, positions=..., attn_mask=...)`; what nn.Module wrappers and older callers pass)
        -> logits (B, A, vocab), float32, at the positions the batch asks for (all T by default)."""
        spelled = ForwardBatch(idx, positions, attn_mask, kv_cache, logits_from, logits_to, logits_at, prev_idx,
                               prev_gap, packed) if not isinstance(idx, ForwardBatch) else None
        if spelled is None and any(v is not None for v in (positions, attn_mask, kv_cache, logits_to, logits_at,
                                                            prev_idx, prev_gap, packed)) | (logits_from != 0):
            raise TypeError("pass either a ForwardBatch or ids with keyword fields, not both")
        batch = spelled or idx
        idx, positions, attn_mask, kv_cache = batch.ids, batch.positions, batch.attn_mask, batch.kv_cache
        logits_from, logits_to, logits_at = batch.logits_from, batch.logits_to, batch.logits_at
        prev_idx, prev_gap, packed = batch.prev_idx, batch.prev_gap, batch.packed
        B, T = idx.shape
        if positions is None:
            if T > self.config.max_seq_len:
                raise ValueError(f"position {T - 1} exceeds max_seq_len {self.config.max_seq_len}")
            positions = torch.arange(T, device=idx.device)
        else:
            # The check is a host sync, which CUDA graph capture forbids and which would break a
            # torch.compile graph in two on every training step; the engine's graphed steps carry
            # positions of requests it already fitted into the context, and the trainer checks
            # seq_len against max_seq_len before it compiles.
            skip = torch.compiler.is_compiling() or (positions.is_cuda and torch.cuda.is_current_stream_capturing())
            if not skip and int(positions.max()) >= self.config.max_seq_len:
                raise ValueError(f"position {int(positions.max())} exceeds max_seq_len {self.config.max_seq_len}")
        if positions.dim() == 1:
            positions = positions.unsqueeze(0).expand(B, T)
        is_causal = False
        if attn_mask is None:
            if kv_cache is not None:
                raise ValueError("an explicit attn_mask is required when a kv_cache is used")
            attn_mask, is_causal = self.default_mask(positions)
        elif isinstance(attn_mask, torch.Tensor) and attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(1)
        cos = self.rope_cos[positions].unsqueeze(1)
        sin = self.rope_sin[positions].unsqueeze(1)
        x = self.embed(idx)
        if self.prev_embed is not None:
            if prev_idx is None or prev_gap is None:
                if kv_cache is not None:
                    raise ValueError("prev_idx and prev_gap are required for a token_shift model when a "
                                     "kv_cache is used")
                prev_idx, prev_gap = left_context(idx, self.config.mask_token_id, self.config.pad_token_id)
            # Only [MASK] inputs get it: a clean token's own embedding is what an AR-style stream
            # reads, and adding its left neighbour on top measured worse for the AR twin.
            is_mask = (idx == self.config.mask_token_id).unsqueeze(-1)
            x = torch.where(is_mask, x + self.prev_embed(prev_idx) + self.gap_embed(prev_gap), x)
        pk = None
        if packed is not None:
            # Padding costs as much as real tokens in every matmul; a ragged engine batch can be
            # half padding (rows at a block start carry two blocks, the others one).
            pk = (B, T, packed)
            x = x.reshape(B * T, -1)[packed]
        for layer in self.layers:
            x = layer(x, cos, sin, attn_mask, is_causal, kv_cache, pk)
        if pk is not None:
            where = torch.zeros(B * T, dtype=torch.long, device=x.device)
            where[packed] = torch.arange(packed.numel(), device=x.device)
            if logits_at is None:
                logits_at = torch.arange(T, device=x.device)[logits_from:logits_to].expand(B, -1)
            x = x[where.view(B, T).gather(1, logits_at)]
        elif logits_at is not None:
            x = x.gather(1, logits_at.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        else:
            x = x[:, logits_from:logits_to]
        return self.lm_head(self.norm(x)).float()

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        emb = self.embed.weight.numel()
        if self.prev_embed is not None:
            emb += self.prev_embed.weight.numel() + self.gap_embed.weight.numel()
        return n - emb if non_embedding else n
