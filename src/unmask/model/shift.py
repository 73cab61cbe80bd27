"""Left context for `token_shift` models: the nearest visible (non-[MASK]) token before each
position, and how far back it is.

A [MASK] position has no content of its own. An AR model's input at p already holds the previous
token, but a masked query must learn to find its neighbours through attention, and that was
measured to slow training a lot (see the `token_shift` note in config.py). Handing each position
the nearest visible token on its left and the distance to it gives the masked query an AR-like
start. Only [MASK] inputs use it (see `Transformer.forward`).
"""
from __future__ import annotations

import torch

MAX_GAP = 64  # distances beyond this share one embedding


def left_context(idx: torch.Tensor, mask_id: int, first: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids of a sequence that starts at position 0 -> (prev ids, gaps), each (B, T).

    Position 0, or a position with only [MASK] before it, gets `first` at distance p + 1.
    """
    B, T = idx.shape
    pos = torch.arange(T, device=idx.device).expand(B, T)
    last = torch.where(idx != mask_id, pos, -1).cummax(1).values  # last visible at or before p
    before = torch.cat([torch.full_like(last[:, :1], -1), last[:, :-1]], 1)
    prev = torch.where(before >= 0, idx.gather(1, before.clamp(min=0)), first)
    return prev, clip_gap(pos - before)


def block_left_context(xt: torch.Tensor, x0: torch.Tensor, mask_id: int, block_size: int, first: int):
    """Left context of each position of the noised sequence `xt` as block-wise decoding sees it:
    this block's own tokens as noised, every earlier block clean (`x0`). Equals `left_context` of
    `x0[:s] ⊕ xt[s:e]` on each block [s, e)."""
    B, L = xt.shape
    pos = torch.arange(L, device=xt.device)
    start = (pos // block_size) * block_size
    last = torch.where(xt != mask_id, pos.expand(B, L), -1)
    nb = -(-L // block_size)
    pad = nb * block_size - L
    last = torch.nn.functional.pad(last, (0, pad), value=-1).view(B, nb, block_size).cummax(-1).values
    last = last.view(B, -1)[:, :L]
    before = torch.cat([torch.full_like(last[:, :1], -1), last[:, :-1]], 1)
    in_block = before >= start  # a visible token of this block lies to the left
    clean_at = (start - 1).expand(B, L)  # else the last token of the previous (clean) block
    src = torch.where(in_block, before, clean_at)
    prev = torch.where(in_block, xt.gather(1, before.clamp(min=0)),
                       torch.where(clean_at >= 0, x0.gather(1, clean_at.clamp(min=0)), first))
    return prev, clip_gap(pos - src)


def clip_gap(gap: torch.Tensor) -> torch.Tensor:
    return gap.clamp(max=MAX_GAP)
