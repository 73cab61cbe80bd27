"""The model's input contract: one typed batch per forward.

Only `ids` is required. With nothing else set, a forward is a self-contained sequence starting at
position 0 under the model's own attention (full, block-causal aligned at 0, or causal), scoring
every position. The engine fills the rest: absolute positions, a mask against its KV cache, the
cache itself, which positions need logits, a token_shift model's left context, and the packing of a
ragged batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .attention import KVCache


@dataclass
class ForwardBatch:
    ids: torch.Tensor  # (B, T) token ids
    # (B, T) or (T,) absolute positions for RoPE (default 0..T-1)
    positions: torch.Tensor | None = None
    # boolean (True = may attend) or additive float, broadcastable to (B, heads, T, S), or a
    # FlexAttention BlockMask; None: the config's attention mode (required with a kv_cache)
    attn_mask: Any = None
    kv_cache: KVCache | None = None
    # Which positions are projected to the vocabulary (the LM head dominates a small model's cost):
    # a slice [logits_from, logits_to), or per row the (B, A) indices `logits_at` into T.
    logits_from: int = 0
    logits_to: int | None = None
    logits_at: torch.Tensor | None = None
    # (B, T) the nearest visible token left of each position and its distance (model/shift.py), for
    # token_shift models; None: computed from ids (right only for a sequence starting at position 0,
    # so they are required with a kv_cache).
    prev_idx: torch.Tensor | None = None
    prev_gap: torch.Tensor | None = None
    # (N,) indices into the flattened (B*T) positions that hold real tokens of a ragged batch padded
    # to T: norms, projections and the MLP run on those N rows only; attention still sees (B, T).
    # Padded positions' outputs are undefined, and `logits_at` must point at real tokens.
    packed: torch.Tensor | None = None

    def kwargs(self) -> dict:
        """The fields other than ids that differ from their defaults, as `net(ids, **kwargs)` takes them
        (what the engine passes: wrappers of `forward` then see only what a call sets)."""
        out = {f: getattr(self, f) for f in ("positions", "attn_mask", "kv_cache", "logits_to", "logits_at",
                                              "prev_idx", "prev_gap", "packed") if getattr(self, f) is not None}
        if self.logits_from:
            out["logits_from"] = self.logits_from
        return out
