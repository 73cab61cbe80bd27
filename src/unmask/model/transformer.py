"""A decoder-style transformer (RMSNorm, RoPE, SwiGLU, optional GQA, no biases), nanoGPT-sized.

Other checkpoint families need a few more features, all off by default (config.py ArchConfig): an
explicit head width, q/k/v biases and per-head q/k norms (model/attention.py), partial and scaled
RoPE (model/rope.py), and mixture-of-experts layers (model/mlp.py).

The attention pattern comes from the config: `full` (MDLM/LLaDA), `block` (block-causal, BD3-LM) or
`causal` (AR). Callers that need something else (the doubled training sequence of block diffusion, a
query block against a KV cache) pass an explicit boolean `attn_mask` and absolute `positions`.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..config import ModelConfig
from .attention import Attention, KVCache  # noqa: F401  (KVCache: the protocol callers implement)
from .inputs import ForwardBatch
from .masks import block_causal_mask
from .mlp import MLP, MoE, Router, make_mlp  # noqa: F401
from .rope import apply_rope, rope_tables  # noqa: F401  (re-exported: callers import them from here)
from .shift import MAX_GAP, left_context


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = make_mlp(cfg, layer)

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
        cos, sin = self.rope_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init(m: nn.Module):
        if isinstance(m, (nn.Linear, nn.Embedding, Router)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    @staticmethod
    def rope_tables(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
        """The cos/sin tables this config implies (float32, (max_seq_len, rotary_dim / 2)). A net built
        on the meta device has none: assign them with `net.reset_rope(device)`."""
        return rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, cfg.rotary_dim, cfg.rope_scaling)

    def reset_rope(self, device: torch.device | str = "cpu") -> None:
        """Recompute the RoPE buffers on `device` (after meta-device construction or a load)."""
        self.rope_cos, self.rope_sin = (t.to(device) for t in self.rope_tables(self.config))

    def default_mask(self, positions: torch.Tensor) -> tuple[torch.Tensor | None, bool]:
        """The mask this model's attention mode implies for a self-contained sequence."""
        mode = self.config.attention
        if mode == "full":
            return None, False
        if mode == "causal":
            return None, True
        return block_causal_mask(positions, positions, self.config.block_size).unsqueeze(1), False

    def input_embeddings(self, idx: torch.Tensor, prev_idx: torch.Tensor | None = None,
                         prev_gap: torch.Tensor | None = None) -> torch.Tensor:
        """What the first layer reads: token embeddings, and for a token_shift model the [MASK]
        inputs' left context on top (prev_idx/prev_gap: model/shift.py)."""
        x = self.embed(idx)
        if self.prev_embed is not None:
            # Only [MASK] inputs get it: a clean token's own embedding is what an AR-style stream
            # reads, and adding its left neighbour on top measured worse for the AR twin.
            is_mask = (idx == self.config.mask_token_id).unsqueeze(-1)
            x = torch.where(is_mask, x + self.prev_embed(prev_idx) + self.gap_embed(prev_gap), x)
        return x

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
        if self.prev_embed is not None and (prev_idx is None or prev_gap is None):
            if kv_cache is not None:
                raise ValueError("prev_idx and prev_gap are required for a token_shift model when a "
                                 "kv_cache is used")
            prev_idx, prev_gap = left_context(idx, self.config.mask_token_id, self.config.pad_token_id)
        x = self.input_embeddings(idx, prev_idx, prev_gap)
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
